"""The report runner's notebook parameters: what ``xattn report --set`` accepts and refuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xattn_utils import report


def test_parameters_declared_by_a_notebook_pass_through():
    assert report.check_parameters(["05_faithfulness"], {"max_tokens": 2}) == {"max_tokens": 2}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"n_masks": 4}, "set by the report's own arguments"),
        ({"max_tokens": 2}, r"no notebook of the report declares \['max_tokens'\]"),
        ({"no_such": 1}, "no notebook of the report declares"),
    ],
)
def test_study_settings_and_unknown_names_are_refused(parameters, message):
    with pytest.raises(ValueError, match=message):
        report.check_parameters(["01_head_level"], parameters)


@pytest.mark.parametrize(
    ("arg", "message"),
    [("max_tokens", "expected NAME=VALUE"), ("nope=1", "no notebook of the report declares")],
)
def test_the_command_names_a_bad_set(arg, message, tmp_path):
    cmd = [sys.executable, "-m", "xattn_utils.cli", "report", "--set", arg, "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert not any(tmp_path.iterdir())  # refused before anything ran

"""Every notebook runs headless (papermill) with its ``params/<nb>.ci.yaml`` on the random model,
renders to HTML and writes its headline CSV; ``xattn report`` runs on real tiny.en (slow).

All notebook runs of a session share one results store, as in a real report: the first
notebook explains the CI utterances, the others find them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xattn_utils import report
from xattn_utils.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
ANALYSES = [n for n in NOTEBOOKS if not n.startswith("9")]  # the explorer writes no CSV

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


# seconds per cell (the slowest takes about 20 here): a cell that hangs fails its test instead
# of stalling the suite
CELL_TIMEOUT = 300
# the notebooks' own smoke settings (fewer tokens, fractions, groups: seconds) from their CI
# parameter files, given to ``xattn report --set`` by the end-to-end tests
SMOKE = {
    k: v
    for stem in NOTEBOOKS
    for k, v in yaml.safe_load(
        (ROOT / "notebooks" / "params" / f"{stem}.ci.yaml").read_text()
    ).items()
    if k not in report.STUDY_PARAMETERS | {"task", "language"}
}
SMOKE_ARGS = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _errors(notebook: Path) -> list[str]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return [
        f"{o['ename']}: {o['evalue']}"
        for cell in nb["cells"]
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]


def _finite_numbers(csv: Path) -> pd.DataFrame:
    df = pd.read_csv(csv)
    assert len(df), f"{csv.name} is empty"
    value = "mean" if "mean" in df.columns else "r"
    assert all(math.isfinite(v) for v in df[value]), f"{csv.name}: non-finite {value}\n{df}"
    return df


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_runs_on_the_random_model(stem, workdir):
    params = yaml.safe_load((ROOT / "notebooks" / "params" / f"{stem}.ci.yaml").read_text())
    assert params["model"] == "random-tiny" and params["use_reference_text"] is True
    params |= {"out": str(workdir / "metrics"), "store": str(workdir / "store")}
    executed = report.run_notebook(stem, params, workdir / f"{stem}.ipynb", timeout=CELL_TIMEOUT)
    assert not _errors(executed)
    html = report.render_html(executed, workdir / f"{stem}.html")
    text = html.read_text(encoding="utf-8")
    assert len(text) > 10_000 and "Traceback" not in text
    assert "data:image/png;base64" in text, f"{stem} drew no figure"
    if stem in ANALYSES:
        name = stem if stem.startswith(("03", "07")) else f"{stem}.random-tiny"
        _finite_numbers(workdir / "metrics" / f"{name}_headline.csv")


def test_a_notebook_finds_what_the_report_precomputed(tmp_path):
    """The report's explain step and a notebook build the same Study from the same parameters:
    the notebook adds nothing to the store."""
    params = yaml.safe_load((ROOT / "notebooks" / "params" / "01_head_level.ci.yaml").read_text())
    params |= {"out": str(tmp_path / "metrics"), "store": str(tmp_path / "store")}
    study = report.Study(**{k: params[k] for k in ("data", "n_utterances", "method", "n_masks",
                            "seed", "language", "use_reference_text", "store")})  # fmt: skip
    [summary] = report.precompute([params["model"]], study, device=params["device"])
    keys = ResultStore(params["store"]).keys()
    assert len(summary.done) == params["n_utterances"] == len(keys)
    executed = report.run_notebook(
        "01_head_level", params, tmp_path / "01.ipynb", timeout=CELL_TIMEOUT
    )
    assert not _errors(executed) and ResultStore(params["store"]).keys() == keys


def test_xattn_report_on_random_tiny_s2t(tmp_path):
    """``xattn report`` end to end on the random Speech2Text model: every notebook works for the
    Speech2Text family too, with the index (2 utterances, 16 masks as in the notebooks' CI
    runs: fewer leave antithetic halves empty; the notebooks' smoke settings; about 2 minutes
    on CPU)."""
    out = tmp_path / "reports"
    cmd = [sys.executable, "-m", "xattn_utils.cli", "report", "--models", "random-tiny-s2t"]
    cmd += ["--data", "demo", "--out", str(out), "--n-utterances", "2", "--n-masks", "16"]
    cmd += ["--use-reference-text", "--store", str(tmp_path / "store"), "--device", "cpu"]
    done = subprocess.run(cmd + SMOKE_ARGS, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    index = (out / "index.html").read_text(encoding="utf-8")
    for stem, runs in report.NOTEBOOKS.items():
        name = stem if runs == "all" else f"{stem}.random-tiny-s2t"
        assert (out / f"{name}.html").is_file() and f'href="{name}.html"' in index
    for stem in ANALYSES:
        name = stem if report.NOTEBOOKS[stem] == "all" else f"{stem}.random-tiny-s2t"
        _finite_numbers(out / "metrics" / f"{name}_headline.csv")


def test_a_failing_cell_names_the_notebook(workdir):
    params = {"model": "no-such-model", "store": str(workdir / "store"), "out": str(workdir)}
    with pytest.raises(report.NotebookError, match="notebook 00_quickstart failed in cell"):
        report.run_notebook("00_quickstart", params, workdir / "failed.ipynb")


@pytest.mark.slow
def test_xattn_report_on_tiny_en(tmp_path):
    """The report command end to end on real tiny.en: 2 utterances, 16 masks, the notebooks'
    smoke settings (about 3 min); run again over the same store, it recomputes nothing and
    says so."""
    out = tmp_path / "reports"
    cmd = [sys.executable, "-m", "xattn_utils.cli", "report", "--models", "tiny.en"]
    cmd += ["--data", "demo", "--out", str(out), "--n-utterances", "2", "--n-masks", "16"]
    cmd += ["--store", str(tmp_path / "store"), "--device", "cpu", *SMOKE_ARGS]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "<figure id='headline'>" in index and "<table id='findings'>" in index
    assert "<th>max_tokens</th><td>2</td>" in index  # the --set parameters are on the index
    steps = len(report.NOTEBOOKS) + 2  # explain, each notebook, the index
    assert len(pd.read_csv(out / "metrics" / "timings.csv")) == steps + 1  # and the total
    assert f"[1/{steps}] explain tiny.en" in done.stdout and "xdg-open" in done.stdout
    assert "Kernel is running over TCP" not in done.stderr
    for stem, runs in report.NOTEBOOKS.items():
        name = stem if runs == "all" else f"{stem}.tiny.en"
        assert (out / f"{name}.html").is_file() and f'href="{name}.html"' in index
        assert (out / "code" / f"{name}.html").is_file()
    for stem in ANALYSES:
        name = stem if report.NOTEBOOKS[stem] == "all" else f"{stem}.tiny.en"
        df = _finite_numbers(out / "metrics" / f"{name}_headline.csv")
        assert name.split(".")[0] in index
        if stem in ("01_head_level", "02_layer_aggregated"):
            rows = df[df["aggregate"].isin(["best head", "best layer", "all heads"])]
            assert len(rows) == 6 and set(rows["model"]) == {"tiny.en"}
            assert (rows["low"] <= rows["mean"]).all() and (rows["mean"] <= rows["high"]).all()
    assert "0 utterances explained" not in done.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 utterances explained, 2 already in the store" in again.stdout
    assert "nothing recomputed" in again.stdout

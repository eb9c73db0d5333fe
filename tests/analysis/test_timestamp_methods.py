"""timestamp_methods: the named methods, the default, unknown names rejected."""

from __future__ import annotations

import pytest

from xattn_utils import timestamp_methods as M


def test_methods_are_named_and_unknown_ones_rejected():
    assert M.DEFAULT_METHOD in M.list_timestamp_methods()
    assert {"whisper", "all-heads", "select", "chars", "calibrated"} <= set(M.METHODS)
    assert M.get_method(None).name == M.DEFAULT_METHOD
    with pytest.raises(ValueError, match="unknown timestamp method 'nope'"):
        M.get_method("nope")

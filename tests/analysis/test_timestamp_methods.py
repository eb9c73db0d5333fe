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


def test_the_default_is_guided_chars_and_snaps_boundaries_to_the_audio():
    default = M.get_method(None)
    assert default.name == "chars-guided" and default.unit == "chars"
    assert default.guide_band_s is not None and default.snap is not None
    assert M.METHODS["all-heads-snap"].snap == default.snap  # the old default, same snap
    assert M.METHODS["all-heads-refined"].snap is None
    assert M.METHODS["calibrated"].snap == default.snap  # learned heads, then the same snap

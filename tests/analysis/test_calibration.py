"""calibration: heads and offsets learned from gold words, out of sample; the shipped files."""

from __future__ import annotations

import numpy as np
import pytest
from test_alignment import BOUNDS, planted_alignment  # a planted aligned head

from xattn_utils import calibration as C
from xattn_utils.data import Word

GOLD = [Word(w, BOUNDS[k] * 0.02, BOUNDS[k + 1] * 0.02) for k, w in enumerate("abcde")]


def test_calibration_learns_the_head_and_the_offset():
    items = [C.LabelledAlignment(f"u{i}", planted_alignment(shift=3), tuple(GOLD)) for i in (0, 1)]
    cal = C.fit_calibration(items, model="planted", method="whisper", max_heads=2)
    assert cal.heads[0] == (1, 1)
    np.testing.assert_allclose(cal.offsets, [-0.06, -0.06], atol=0.021)  # median error
    assert C.Calibration.from_json(cal.to_json()) == cal
    loo = C.leave_one_out(items, method="whisper", max_heads=2)
    assert all(s.rates(50)[1] >= 0.8 for s in loo.values())  # the first start stays at 0


def test_shipped_calibrations_load():
    for name in ("tiny.en", "base"):
        cal = C.load_calibration(name)
        assert cal.model == name and cal.heads and cal.fitted_on
    with pytest.raises(ValueError, match="xattn calibrate"):
        C.load_calibration("no-such-model")

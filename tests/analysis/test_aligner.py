"""word_timestamps: long audio cut into windows at pauses, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from xattn_utils import aligner as W
from xattn_utils.audio import SAMPLE_RATE, AudioError
from xattn_utils.cli import main
from xattn_utils.model.decode import DecodeError


def test_split_points_cut_long_audio_at_a_pause():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(70 * SAMPLE_RATE)).astype(np.float32)
    audio[int(24.0 * SAMPLE_RATE) : int(24.5 * SAMPLE_RATE)] = 0  # a pause
    cuts = W.split_points(audio)
    assert cuts[0] == 0 and len(cuts) == 3
    assert 24.0 <= cuts[1] / SAMPLE_RATE <= 24.5
    ends = [*cuts[1:], audio.size]
    assert all(b - a <= 30 * SAMPLE_RATE for a, b in zip(cuts, ends, strict=True))
    assert W.split_points(audio[: 10 * SAMPLE_RATE]) == [0]


def test_bad_input_gets_clear_errors(tiny, tone):
    with pytest.raises(DecodeError, match="empty"):
        W.word_timestamps(tiny, tone, text="  ")
    with pytest.raises(AudioError, match="silent"):
        W.word_timestamps(tiny, np.zeros(SAMPLE_RATE, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown timestamp method"):
        W.word_timestamps(tiny, tone, method="nope")
    with pytest.raises(DecodeError, match="does not match the audio"):  # it hears noise
        W.word_timestamps(tiny, tone, text="questo testo non corrisponde affatto")
    with pytest.raises(ValueError, match="no calibration"):
        W.word_timestamps(tiny, tone, method="calibrated")
    assert main(["timestamps", "--model", "random-tiny", "--method", "nope", "x.wav"]) == 2

"""word_timestamps: long audio cut into windows at pauses, character transcripts too long for
the decoder, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from xattn_utils import aligner as W
from xattn_utils.analysis.alignment import TranscriptTooLong, align_inputs
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


def test_character_transcripts_that_overflow_the_decoder(tiny, tone, monkeypatch):
    """The random model babbles ~1,000 characters: a clear error, not an index error; and
    windows whose characters overflow are halved at pauses until they fit."""
    with pytest.raises(TranscriptTooLong, match="characters"):
        align_inputs(tiny, tone, unit="chars")
    real, seen = align_inputs, []

    def fits_in_3_s(loaded, window, *, unit, text, language, guide):  # tokens where it fits
        assert not guide  # plain chars needs no token guide
        seen.append(window.size / SAMPLE_RATE)
        if window.size > 3 * SAMPLE_RATE:
            raise TranscriptTooLong("too many characters")
        return real(loaded, window, unit="tokens", text=text, language=language)

    monkeypatch.setattr(W, "align_inputs", fits_in_3_s)
    audio = np.tile(tone, 4)  # 10 s
    words = W.word_timestamps(tiny, audio, method="chars")
    fitted = [s for s in seen if s <= 3]
    assert seen[0] == pytest.approx(10.0) and sum(fitted) == pytest.approx(10.0)
    starts = [w.start for w in words]
    assert words[-1].end > 7.0 and starts == sorted(starts)
    with pytest.raises(TranscriptTooLong):  # text= is never cut
        W.word_timestamps(tiny, audio[: 5 * SAMPLE_RATE], method="chars", text="hello")

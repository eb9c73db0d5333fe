"""word_timestamps: methods, refinements, windows, calibration, output formats and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import xattn_utils as xu
from xattn_utils import aligner as W
from xattn_utils import calibration as C
from xattn_utils import timestamp_formats as F
from xattn_utils.audio import SAMPLE_RATE, AudioError
from xattn_utils.cli import main
from xattn_utils.data import Word
from xattn_utils.maps.attention import CrossAttention
from xattn_utils.model.decode import DecodeError

BOUNDS = [5, 20, 32, 50, 70, 90]  # word k spans enc frames [BOUNDS[k], BOUNDS[k+1])


def planted_alignment(good=(1, 1), shift: int = 0, n_frames: int = 100) -> W.Alignment:
    """tokens unit: prompt row, 5 one-row words, eot; head ``good`` attends to the true spans
    shifted by ``shift`` frames, every other head is noise."""
    tokens = ["<|notimestamps|>", " a", " b", " c", " d", " e", "<|endoftext|>"]
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(2, 3, len(tokens), n_frames)).astype(np.float32)
    m = np.full((len(tokens), n_frames), 1e-3, dtype=np.float32)
    m[0] = 1.0
    for k in range(5):
        m[k + 1, BOUNDS[k] + shift : BOUNDS[k + 1] + shift] = 1.0
    m[-1, BOUNDS[-1] + shift :] = 1.0
    scores[good] = m / m.sum(-1, keepdims=True)
    tr = xu.Transcript(
        input_ids=tuple(range(len(tokens))), output_ids=tuple(range(1, len(tokens) + 1)),
        tokens=tuple(tokens), special=(True, False, False, False, False, False, True),
        text="a b c d e", task="transcribe", language="en",
    )  # fmt: skip
    ca = CrossAttention(torch.from_numpy(scores), tr, "planted", ((0, 0),), n_frames * 0.02)
    owner = (-1, 0, 1, 2, 3, 4, -1)
    return W.Alignment(ca, ("a", "b", "c", "d", "e"), owner, np.zeros(n_frames), "tokens")


GOLD = [Word(w, BOUNDS[k] * 0.02, BOUNDS[k + 1] * 0.02) for k, w in enumerate("abcde")]


def test_methods_are_named_and_unknown_ones_rejected():
    assert W.DEFAULT_METHOD in W.list_timestamp_methods()
    assert {"whisper", "all-heads", "select", "chars", "calibrated"} <= set(W.METHODS)
    assert W.get_method(None).name == W.DEFAULT_METHOD
    with pytest.raises(ValueError, match="unknown timestamp method 'nope'"):
        W.get_method("nope")


def test_rank_heads_finds_the_planted_aligned_head():
    al = planted_alignment(good=(1, 2))
    assert W.rank_heads(al.ca.scores, [1, 2, 3, 4, 5])[0] == (1, 2)
    words = W.timings_from_alignment(al, W.METHODS["select"], heads=[(1, 2)])
    assert [w.word for w in words] == [" a", " b", " c", " d", " e"]
    starts = [w.start for w in words]  # DTW enters the first row at frame 0 (whisper too)
    np.testing.assert_allclose(starts[1:], np.array(BOUNDS[1:5]) * 0.02, atol=0.021)


def test_subframe_boundary_sits_where_the_rows_cross():
    m = np.zeros((2, 10))
    m[0, :5], m[1, 5:] = 1.0, 1.0
    m[0, 4], m[1, 4] = 0.5, 0.3  # frame 4 mostly row 0: boundary between frames 4 and 5
    m[0, 5], m[1, 5] = 0.2, 0.6
    whole = W.row_starts(m, [0, 1], subframe=False)
    sub = W.row_starts(m, [0, 1], subframe=True)
    assert whole[1] in (4, 5) and 4.5 <= sub[1] <= 5.5 and sub[1] != whole[1]
    assert sub[0] == 0 and sub[-1] == 10


def test_pauses_pull_word_ends_out_of_silence():
    silent = np.zeros(40, dtype=bool)
    silent[12:25] = True  # a pause inside the first span
    out = W.pull_out_of_pauses([[0, 25], [25, 40]], silent, min_frames=5)
    assert out == [[0, 12], [25, 40]]
    silent[:] = False
    silent[25:28] = True  # shorter than min_frames: kept
    assert W.pull_out_of_pauses([[25, 40]], silent, min_frames=5) == [[25, 40]]


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


def test_calibration_learns_the_head_and_the_offset():
    items = [C.LabelledAlignment(f"u{i}", planted_alignment(shift=3), tuple(GOLD)) for i in (0, 1)]
    cal = C.fit_calibration(items, model="planted", method="whisper", max_heads=2)
    assert cal.heads[0] == (1, 1)
    np.testing.assert_allclose(cal.offsets, [-0.06, -0.06], atol=0.021)  # median error
    assert W.Calibration.from_json(cal.to_json()) == cal
    loo = C.leave_one_out(items, method="whisper", max_heads=2)
    assert all(s.rates(50)[1] >= 0.8 for s in loo.values())  # the first start stays at 0


def test_shipped_calibrations_load():
    for name in ("tiny.en", "base"):
        cal = W.load_calibration(name)
        assert cal.model == name and cal.heads and cal.fitted_on
    with pytest.raises(ValueError, match="xattn calibrate"):
        W.load_calibration("no-such-model")


def test_char_ids_give_every_character_a_row(tiny):
    ids, owner, words = W.char_ids(tiny, "Hello,  world")
    assert words == ["Hello,", "world"]
    assert len(ids) == len(owner) == len(" Hello, world")
    assert owner == [-1, 0, 0, 0, 0, 0, -1, -1, 1, 1, 1, 1, 1]  # space and comma: no word
    with pytest.raises(DecodeError, match="empty"):
        W.char_ids(tiny, "   ")


@pytest.mark.parametrize("unit", ["tokens", "chars"])
def test_forced_alignment_on_the_random_model(tiny, tone, unit):
    al = W.align_inputs(tiny, tone, unit=unit, text="hello world, fine.")
    for method in ("whisper", "all-heads", "chars-refined"):
        words = W.timings_from_alignment(al, W.METHODS[method], probabilities=al.probabilities)
        assert [w.word for w in words] == [" hello", " world,", " fine."]
        assert all(0 <= w.start <= w.end <= al.ca.duration + 1e-9 for w in words)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:], strict=False))
        assert all(0 < w.probability <= 1 for w in words)


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


def test_formats_round_trip():
    words = [W.WordTiming(" hi", 0.5, 0.9, ("hi",), (1,), 0.9), W.WordTiming(" you", 1.0, 1.4,
             ("you",), (2,))]  # fmt: skip
    data = json.loads(F.to_json({"a.wav": words}))
    assert data[0]["file"] == "a.wav" and data[0]["words"][1]["word"] == "you"
    assert F.to_csv({"a.wav": words}).splitlines()[1] == "a.wav,0,hi,0.5,0.9,0.9"
    srt = F.to_srt(words)
    assert srt.startswith("1\n00:00:00,500 --> 00:00:01,400\nhi you")
    grid = F.to_textgrid(words, 2.0)
    assert "intervals: size = 5" in grid and 'text = "you"' in grid and "xmax = 2.0000" in grid
    assert F.to_textgrid([replace(words[0], start=0.0)], 1.0).count("intervals [") == 2

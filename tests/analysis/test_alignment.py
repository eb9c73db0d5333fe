"""alignment: head ranking, sub-frame boundaries, pauses, snapping, character rows, forced
alignment."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import xattn_utils as xu
from xattn_utils import alignment as A
from xattn_utils import timestamp_methods as M
from xattn_utils.analysis import heads as H
from xattn_utils.analysis.boundaries import envelope_db
from xattn_utils.maps.attention import CrossAttention
from xattn_utils.model.decode import DecodeError

BOUNDS = [5, 20, 32, 50, 70, 90]  # word k spans enc frames [BOUNDS[k], BOUNDS[k+1])


def planted_alignment(good=(1, 1), shift: int = 0, n_frames: int = 100) -> A.Alignment:
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
    return A.Alignment(ca, ("a", "b", "c", "d", "e"), owner, np.zeros(n_frames), "tokens")


def test_rank_heads_finds_the_planted_aligned_head():
    al = planted_alignment(good=(1, 2))
    assert H.rank_heads(al.ca.scores, [1, 2, 3, 4, 5])[0] == (1, 2)
    words = A.timings_from_alignment(al, M.METHODS["select"], heads=[(1, 2)])
    assert [w.word for w in words] == [" a", " b", " c", " d", " e"]
    starts = [w.start for w in words]  # DTW enters the first row at frame 0 (whisper too)
    np.testing.assert_allclose(starts[1:], np.array(BOUNDS[1:5]) * 0.02, atol=0.021)


def test_rank_heads_orders_heads_without_a_monotone_trend_by_peakedness():
    """Heads whose peaks run backwards all score 0; among them the more peaked comes first, and
    every one comes after a head with a forward trend, however flat."""
    rows, frames = 6, 12
    scores = torch.full((2, 3, rows, frames), 1.0)
    for r in range(rows):
        scores[0, 0, r, 2 * r] += 0.2  # forward, barely peaked
        scores[1, 1, r, frames - 1 - 2 * r] += 50.0  # backward, very peaked
        scores[0, 2, r, frames - 1 - 2 * r] += 5.0  # backward, less peaked
    ranked = H.rank_heads(scores, range(rows))
    assert ranked[:3] == [(0, 0), (1, 1), (0, 2)]
    assert ranked[3:] == [(0, 1), (1, 0), (1, 2)]  # flat maps: same score, same peak, by index


def test_an_end_offset_past_the_next_start_never_makes_words_overlap():
    """Calibrated offsets that lengthen words (end offset > start offset) make the two words of
    a shared boundary meet halfway between their shifted times instead of overlapping."""
    al = planted_alignment(good=(1, 2))
    method, heads = M.METHODS["select"], [(1, 2)]
    plain = A.timings_from_alignment(al, method, heads=heads)
    words = A.timings_from_alignment(al, method, heads=heads, offsets=(-0.01, 0.05))
    for a, b in zip(words, words[1:], strict=False):
        assert a.start <= a.end <= b.start <= b.end
    for k in range(1, len(words)):  # each shared boundary: halfway between -10 ms and +50 ms
        assert words[k].start == pytest.approx(plain[k].start + 0.02, abs=1e-9)


def test_subframe_boundary_sits_where_the_rows_cross():
    m = np.zeros((2, 10))
    m[0, :5], m[1, 5:] = 1.0, 1.0
    m[0, 4], m[1, 4] = 0.5, 0.3  # frame 4 mostly row 0: boundary between frames 4 and 5
    m[0, 5], m[1, 5] = 0.2, 0.6
    whole = A.row_starts(m, [0, 1], subframe=False)
    sub = A.row_starts(m, [0, 1], subframe=True)
    assert whole[1] in (4, 5) and 4.5 <= sub[1] <= 5.5 and sub[1] != whole[1]
    assert sub[0] == 0 and sub[-1] == 10


def test_pauses_pull_word_ends_out_of_silence():
    silent = np.zeros(40, dtype=bool)
    silent[12:25] = True  # a pause inside the first span
    out = A.pull_out_of_pauses([[0, 25], [25, 40]], silent, min_frames=5)
    assert out == [[0, 12], [25, 40]]
    silent[:] = False
    silent[25:28] = True  # shorter than min_frames: kept
    assert A.pull_out_of_pauses([[25, 40]], silent, min_frames=5) == [[25, 40]]


def test_char_ids_give_every_character_a_row(tiny):
    ids, owner, words = A.char_ids(tiny, "Hello,  world")
    assert words == ["Hello,", "world"]
    assert len(ids) == len(owner) == len(" Hello, world")
    assert owner == [-1, 0, 0, 0, 0, 0, -1, -1, 1, 1, 1, 1, 1]  # space and comma: no word
    with pytest.raises(DecodeError, match="empty"):
        A.char_ids(tiny, "   ")


@pytest.mark.parametrize("unit", ["tokens", "chars"])
def test_forced_alignment_on_the_random_model(tiny, tone, unit):
    al = A.align_inputs(tiny, tone, unit=unit, text="hello world, fine.")
    for method in ("whisper", "all-heads", "chars-refined"):
        words = A.timings_from_alignment(al, M.METHODS[method], probabilities=al.probabilities)
        assert [w.word for w in words] == [" hello", " world,", " fine."]
        assert all(0 <= w.start <= w.end <= al.ca.duration + 1e-9 for w in words)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:], strict=False))
        assert all(0 < w.probability <= 1 for w in words)


def test_snapped_words_end_and_start_at_a_planted_pause():
    """The default method snaps the boundary the planted map puts at 1.0 s to the edges of a
    pause planted at 0.9-1.2 s; no boundary lands inside the pause; same input, same times."""
    audio = 0.1 * np.random.default_rng(1).standard_normal(2 * 16000)
    audio[int(0.9 * 16000) : int(1.2 * 16000)] = 0
    al = planted_alignment()
    al = replace(al, envelope_db=envelope_db(audio))
    method = M.get_method(None)
    assert method.snap is not None
    words = A.timings_from_alignment(al, method, heads=[(1, 1)])
    assert words == A.timings_from_alignment(al, method, heads=[(1, 1)])
    c, d = words[2], words[3]
    assert c.end == pytest.approx(0.9, abs=0.015) and d.start == pytest.approx(1.2, abs=0.015)
    assert not any(0.91 < t < 1.19 for w in words for t in (w.start, w.end))
    plain = A.timings_from_alignment(al, M.METHODS["all-heads-refined"], heads=[(1, 1)])
    assert plain[2].end == pytest.approx(1.0, abs=0.021)  # without snapping: the map's 1.0 s


def spaced_alignment(n_frames: int = 120) -> A.Alignment:
    """chars unit: prompt, "ab", space, "cd", eot; one clean head (0, 0): a [0, 20), b [20, 40),
    the space [40, 60), c [60, 75), d [75, 90), eot [90, 120)."""
    tokens = ["<|notimestamps|>", " ", "a", "b", " ", "c", "d", "<|endoftext|>"]
    spans = [(0, 1), (0, 1), (0, 20), (20, 40), (40, 60), (60, 75), (75, 90), (90, n_frames)]
    m = np.full((len(tokens), n_frames), 1e-3, dtype=np.float32)
    for r, (a, b) in enumerate(spans):
        m[r, a:b] = 1.0
    scores = torch.from_numpy(m / m.sum(-1, keepdims=True))[None, None]
    special = (True, False, False, False, False, False, False, True)
    tr = xu.Transcript(
        input_ids=tuple(range(len(tokens))), output_ids=tuple(range(1, len(tokens) + 1)),
        tokens=tuple(tokens), special=special, text="ab cd", task="transcribe", language="en",
    )  # fmt: skip
    ca = CrossAttention(scores, tr, "planted", ((0, 0),), n_frames * 0.02)
    owner = (-1, -1, 0, 0, -1, 1, 1, -1)
    return A.Alignment(ca, ("ab", "cd"), owner, np.zeros(n_frames), "chars")


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.75, 1.0])
def test_a_word_ends_that_far_into_the_row_after_it(frac):
    al = spaced_alignment()
    method = replace(M.METHODS["all-heads"], unit="chars", end_into_next_row=frac)
    ab, cd = A.timings_from_alignment(al, method, heads=[(0, 0)])
    assert ab.start == pytest.approx(0.0) and cd.start == pytest.approx(1.2, abs=0.021)
    assert ab.end == pytest.approx(0.8 + frac * 0.4, abs=0.021)  # the space: [0.8, 1.2) s
    assert cd.end == pytest.approx(1.8 + frac * 0.6, abs=0.021)  # end of text: [1.8, 2.4) s
    assert ab.end <= cd.start

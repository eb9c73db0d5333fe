"""guide: the character DTW kept near the token alignment (chars-guided), and the aggregation and
head filter of arXiv 2509.09987 it runs on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import xattn_utils as xu
from xattn_utils import alignment as A
from xattn_utils import timestamp_methods as M
from xattn_utils.analysis import heads as H
from xattn_utils.analysis.guide import band_matrix, guide_spans
from xattn_utils.analysis.timing import (
    WordTiming,
    dtw,
    median_filter,
    softmax_matrix,
    timing_matrix,
)
from xattn_utils.maps.attention import CrossAttention

DT = 0.02
TRUE = [(0.10, 0.40), (0.40, 0.64), (0.70, 1.00), (1.00, 1.40), (1.50, 1.80)]


def char_alignment(*, decoy: bool, n_frames: int = 120) -> A.Alignment:
    """chars unit: prompt row, then per word a space row and 3 letter rows, then eot. Head (0, 0)
    attends to the true spans (spaces to the gap before each word); with ``decoy`` it has lost its
    place from word d on: d and e (and the gap before d) sit 400 ms late, as a derailed head."""
    rows, owner = ["<|notimestamps|>"], [-1]
    for k in range(5):
        rows += [" ", "x", "y", "z"]
        owner += [-1, k, k, k]
    rows.append("<|endoftext|>")
    owner.append(-1)
    m = np.full((len(rows), n_frames), 1e-4, dtype=np.float32)
    m[0] = 1.0
    prev_end = 0
    for k, (a, b) in enumerate(TRUE):
        late = 0.4 if decoy and k >= 3 else 0.0
        fa, fb = round((a + late) / DT), round((b + late) / DT)
        base = 1 + 4 * k
        m[base, prev_end : max(fa, prev_end + 1)] = 1.0
        thirds = np.linspace(fa, fb, 4).round().astype(int)
        for j in range(3):
            m[base + 1 + j, thirds[j] : thirds[j + 1]] = 1.0
        prev_end = fb
    m[-1, prev_end:] = 1.0
    scores = np.random.default_rng(0).uniform(size=(1, 2, len(rows), n_frames)).astype(np.float32)
    scores[0, 0] = m / m.sum(-1, keepdims=True)
    scores[0, 1] /= scores[0, 1].sum(-1, keepdims=True)
    special = tuple(r.startswith("<|") for r in rows)
    tr = xu.Transcript(
        input_ids=tuple(range(len(rows))), output_ids=tuple(range(1, len(rows) + 1)),
        tokens=tuple(rows), special=special, text="a b c d e", task="transcribe", language="en",
    )  # fmt: skip
    ca = CrossAttention(torch.from_numpy(scores), tr, "planted", (), n_frames * DT)
    return A.Alignment(ca, ("a", "b", "c", "d", "e"), tuple(owner), np.zeros(n_frames), "chars")


def test_softmax_matrix_on_weights_equals_the_papers_recipe_on_scores():
    """Median filter on the pre-softmax scores, softmax, unit column norms, head mean: the
    weights' log differs from the scores by a per-row constant, so both give the same matrix."""
    logits = torch.randn(3, 7, 40) * 4
    expected = median_filter(logits, 3).softmax(-1)
    expected = (expected / expected.norm(dim=-2, keepdim=True)).mean(0)
    got = softmax_matrix(logits.softmax(-1), medfilt_width=3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    one = softmax_matrix(logits[0].softmax(-1), medfilt_width=1)
    torch.testing.assert_close(one.norm(dim=0), torch.ones(40))
    with pytest.raises(ValueError, match="non-negative"):
        softmax_matrix(logits)


def test_rank_heads_by_norms_puts_the_peaked_head_first():
    al = char_alignment(decoy=False)
    rows = [r for r, w in enumerate(al.word_of_row) if w >= 0]
    assert H.rank_heads_by_norms(al.ca.scores, rows)[0] == (0, 0)
    heads = A.choose_heads(al, M.METHODS["chars-guided"])
    assert heads == [(0, 0)]


def test_guide_spans_match_words_by_normalised_text():
    guide = [WordTiming(" Hello,", 0.1, 0.4, (), ()), WordTiming(" world", 0.5, 0.9, (), ())]
    spans = guide_spans(["hello", "big", "World!"], guide)
    assert spans == ((0.1, 0.4), None, (0.5, 0.9))


def test_band_keeps_a_derailing_character_dtw_near_the_guide():
    """Unguided, the derailed head puts word c's end and d, e 400 ms late; guided by spans 60 ms
    off the truth with a 100 ms band, every boundary stays within the band of its guide."""
    al = char_alignment(decoy=True)
    method = replace(
        M.METHODS["chars-guided"], snap=None, pauses=False, guide_band_s=0.1, end_into_next_row=0
    )  # the DTW's own boundaries
    loose = A.timings_from_alignment(al, method, heads=[(0, 0)])
    assert loose[3].start - TRUE[3][0] > 0.3 and loose[4].end - TRUE[4][1] > 0.3
    guide = tuple((a + 0.06, b + 0.06) for a, b in TRUE)
    guided = A.timings_from_alignment(replace(al, guide=guide), method, heads=[(0, 0)])
    slack = 0.1 + 2 * DT  # the band, its edges rounded out to whole frames, sub-frame refined
    for w, (a, b) in zip(guided, guide, strict=True):
        assert a - slack <= w.start <= w.end <= b + slack
    assert abs(guided[3].start - TRUE[3][0]) <= 0.1 + 0.06 + DT
    clean = A.timings_from_alignment(char_alignment(decoy=False), method, heads=[(0, 0)])
    err = [abs(w.start - a) for w, (a, _) in zip(clean[1:], TRUE[1:], strict=True)]
    assert max(err) <= DT  # not derailed: the character map alone is right


@pytest.mark.parametrize("seed", range(10))
def test_a_path_through_the_band_always_exists(seed):
    """Random monotone guide spans, some words unmatched, a zero band: the DTW path through
    the banded random matrix never takes a masked cell."""
    rng = np.random.default_rng(seed)
    n_words, n_frames = 6, 120
    edges = np.sort(rng.choice(np.arange(1, n_frames), 2 * n_words, replace=False)) * DT
    spans = [(float(edges[2 * k]), float(edges[2 * k + 1])) for k in range(n_words)]
    spans = [None if rng.random() < 0.3 else s for s in spans]
    owner = [-1]
    for k in range(n_words):
        owner += [-1] + [k] * int(rng.integers(1, 4))
    owner.append(-1)
    rows = list(range(1, len(owner)))
    matrix = rng.uniform(size=(len(owner), n_frames))
    banded = band_matrix(matrix, rows, owner, spans, band_s=0.0, enc_frame_seconds=DT)
    text, time = dtw(-banded[rows])
    assert (banded[rows][text, time] >= 0).all()
    assert (banded[rows] < 0).any()


def test_guided_alignment_on_the_random_model(tiny, tone):
    al = A.align_inputs(tiny, tone, unit="chars", text="hello world, fine.", guide=True)
    assert al.guide is not None and len(al.guide) == len(al.words) == 3
    assert all(s is not None and s[0] <= s[1] for s in al.guide)
    words = A.timings_from_alignment(al, M.METHODS["chars-guided"])
    assert [w.word for w in words] == [" hello", " world,", " fine."]
    assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:], strict=False))
    assert words == A.timings_from_alignment(al, M.METHODS["chars-guided"])
    unguided = A.align_inputs(tiny, tone, unit="chars", text="hello world, fine.")
    assert unguided.guide is None
    assert timing_matrix(al.ca.scores[0]).shape == al.ca.scores.shape[-2:]

"""A character alignment kept near the token alignment: the DTW band of ``chars-guided``.

Character-level teacher forcing (arXiv 2509.09987) times words more finely than BPE tokens, but
with a single head on a small model its DTW can lose its place on noisy, disfluent speech: one word
swallows a second or more and the next dozen words land that much late (tiny.en on the demo's
recorded ``mfa_cold_corpus3``). The token alignment over every head is coarser but does not
derail. :func:`guide_spans` matches the two transcripts' words; :func:`band_matrix` then keeps the
character DTW within ``band_s`` of each word's token span (spaces and punctuation between the two
words' spans), so the characters refine the token boundaries and cannot drift away from them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from .timestamps import normalize_word

Span = tuple[float, float]


def guide_spans(words: Sequence[str], guide: Sequence) -> tuple[Span | None, ...]:
    """Per word of ``words``, the (start, end) seconds of the same word in ``guide`` (objects with
    ``word, start, end``, e.g. the token alignment's :class:`~.timing.WordTiming`), matched by
    normalised text; ``None`` where the guide has no such word."""
    ours = [normalize_word(w) for w in words]
    theirs = [normalize_word(g.word) for g in guide]
    out: list[Span | None] = [None] * len(words)
    matcher = difflib.SequenceMatcher(None, ours, theirs, False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            g = guide[block.b + k]
            out[block.a + k] = (float(g.start), float(g.end))
    return tuple(out)


def band_matrix(
    matrix: np.ndarray,
    rows: Sequence[int],
    word_of_row: Sequence[int],
    spans: Sequence[Span | None],
    *,
    band_s: float,
    enc_frame_seconds: float,
) -> np.ndarray:
    """``matrix`` (shape = (rows, enc_frames), larger = more attention) with every cell of
    ``rows`` further than ``band_s`` from its allowed interval set far below the matrix minimum.

    A word's rows may sit in its guide span, a space or punctuation row (``word_of_row`` -1, and
    end-of-text) between the previous word's end and the next word's start. A word without a guide
    span may sit between its neighbours' spans. The intervals never decrease from row to row and
    consecutive ones overlap, so a monotone path through the band always exists."""
    n_words, n_frames = len(spans), matrix.shape[1]
    total = n_frames * enc_frame_seconds
    known_end, edge = [0.0] * n_words, 0.0  # the last known end up to word k
    for k, span in enumerate(spans):
        edge = known_end[k] = span[1] if span else edge
    known_start, edge = [total] * n_words, total  # the first known start from word k on
    for k in range(n_words - 1, -1, -1):
        edge = known_start[k] = spans[k][0] if spans[k] else edge
    prev_word = np.maximum.accumulate([w if w >= 0 else -1 for w in word_of_row])
    out = np.array(matrix, dtype=np.float64, copy=True)
    floor = float(out.min()) - 1e4 * (1.0 + float(np.ptp(out)))
    for r in rows:
        w = word_of_row[r]
        if w >= 0 and spans[w]:
            a, b = spans[w]
        else:  # between words, or a word without a span: from the last known end to the next
            p = w - 1 if w >= 0 else int(prev_word[r])  # known start after it
            a = known_end[p] if p >= 0 else 0.0
            b = known_start[p + 1 + (w >= 0)] if p + 1 + (w >= 0) < n_words else total
        first = max(0, int(np.floor((a - band_s) / enc_frame_seconds)))
        last = min(n_frames, int(np.ceil((b + band_s) / enc_frame_seconds)))
        out[r, :first] = floor
        out[r, last:] = floor
    return out

"""Word timestamps from cross-attention, or from any (tokens, enc_frames) map, the Whisper way.

:func:`word_timings` follows openai-whisper's ``timing.find_alignment`` (release 20250625):

1. maps of the chosen heads, shape = (heads, tokens, enc_frames), each row a distribution over
   the speech frames. Whisper softmaxes the logits over the first ``num_frames // 2`` enc frames;
   our CA was softmaxed over all 1500 and cropped, so rows are renormalised to sum 1
   (``row_norm="sum"``): the same numbers;
2. z-normalise each head **per enc frame, over the tokens** (whisper's ``std_mean(dim=-2)``; the
   issue and study notes say "over frames", the code says otherwise and we follow the code);
   all rows take part, prompt outputs included;
3. median filter along time, width 7, torch "reflect" padding (= scipy.ndimage "mirror");
4. mean over heads;
5. keep the rows of the text tokens and of the ``eot`` after them (it marks where the last word
   ends) and run :func:`dtw` on the negated matrix;
6. a token starts at the first enc frame where the path enters its row; tokens join into words
   (a token that starts with a space, is punctuation or is special starts a word: whisper's
   ``split_tokens_on_spaces``, done on decoded token strings); a word ends where the next starts;
7. punctuation joins its neighbour (:func:`merge_punctuations`), which keeps its own times.

Not reproduced, on purpose: ``transcribe()``'s heuristics in ``add_word_timestamps`` (clipping
words longer than twice the median duration next to sentence ends and after pauses, snapping the
first and last words to the segment timestamps of a timestamp-mode decode, rounding to 10 ms).
Against openai-whisper on the same weights, tests/analysis/test_timing.py measures the remaining
gap. :mod:`xattn_utils.analysis.timestamps` scores the timings against gold word boundaries.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..audio import ENC_FRAME_SECONDS
from ..maps.attention import CrossAttention
from ..maps.views import View
from ..maps.views import stack as stack_heads
from ..model.decode import Transcript

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
MapLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class TimingOptions:
    """Knobs of :func:`word_timings`; the defaults are openai-whisper's."""

    medfilt_width: int = 7
    row_norm: Literal["sum"] | None = "sum"  # None for signed maps
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    split_on_spaces: bool = True  # False: every token is a word (whisper's zh/ja/th/lo/my/yue)
    enc_frame_seconds: float = ENC_FRAME_SECONDS


@dataclass(frozen=True)
class WordTiming:
    """One word: text as decoded (leading space kept, like whisper), start and end in seconds,
    its tokens and their rows in the map, mean token probability when given. Punctuation merged
    into a word does not change its times (whisper): " cat," ends where "," starts."""

    word: str
    start: float
    end: float
    tokens: tuple[str, ...]
    rows: tuple[int, ...]
    probability: float | None = None

    def to_frame(self) -> pd.DataFrame:
        return timings_frame([self])


def timings_frame(words: Iterable[WordTiming], **labels) -> pd.DataFrame:
    """Tidy frame, one row per word: ``index, word, start, end, duration, n_tokens,
    probability`` and the constant ``labels`` columns (``utterance=..., map=...``)."""
    cols = ["index", "word", "start", "end", "duration", "n_tokens", "probability"]
    rows = [(i, w.word.strip(), w.start, w.end, w.end - w.start, len(w.tokens), w.probability)
            for i, w in enumerate(words)]  # fmt: skip
    return pd.DataFrame(rows, columns=cols).assign(**labels)


# -- the algorithm ------------------------------------------------------------------------------


def median_filter(x: MapLike, width: int = 7) -> MapLike:
    """Whisper's median filter along the last axis: reflect padding without repeating the edge
    (torch ``"reflect"``, scipy ``"mirror"``); inputs no longer than ``width // 2`` come back
    unchanged, as in whisper. Returns the input's type."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"the filter width must be a positive odd number, got {width}")
    t = torch.as_tensor(x)
    pad = width // 2
    if t.shape[-1] <= pad or width == 1:
        return x
    flat = t.reshape(-1, 1, t.shape[-1])
    out = F.pad(flat, (pad, pad), mode="reflect").unfold(-1, width, 1).sort()[0][..., pad]
    out = out.reshape(t.shape)
    return out.numpy() if isinstance(x, np.ndarray) else out


def dtw(cost: MapLike) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotone path through ``cost`` shape = (tokens, frames), from (0, 0) to the
    last cell, with diagonal, down and right steps. Returns (text_indices, time_indices), one entry
    per path cell. A numpy port of whisper's ``dtw_cpu`` with its tie-breaking (diagonal or down
    only when strictly cheaper), vectorised over anti-diagonals. Costs accumulate in float64: the
    numba-compiled original types ``np.ones(..., float32) * np.inf`` as float64 (plain numpy would
    keep float32), and paths through exact ties differ between the two."""
    x = np.asarray(cost, dtype=np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"cost must be a non-empty (tokens, frames) matrix, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("cost holds NaN or infinite values")
    n, m = x.shape
    acc = np.full((n + 1, m + 1), np.inf)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    acc[0, 0] = 0
    for k in range(2, n + m + 1):  # cells (i, j) with i + j = k depend only on k-1 and k-2
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        acc[i, j] = x[i - 1, j - 1] + np.choose(t, (c0, c1, c2))
        trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    text, time = np.array(path[::-1]).T
    return text, time


def timing_matrix(
    maps: MapLike, *, medfilt_width: int = 7, row_norm: Literal["sum"] | None = "sum"
) -> torch.Tensor:
    """Steps 1-4: row normalisation, z-score per frame over tokens, median filter, mean over heads.

    ``maps`` shape = (heads, tokens, enc_frames) or (tokens, enc_frames) -> (tokens, enc_frames),
    float32. Constant frames (std 0) become 0 where whisper would give NaN.
    """
    w = torch.as_tensor(maps).detach().float().cpu()
    w = w[None] if w.ndim == 2 else w
    if w.ndim != 3 or 0 in w.shape:
        raise ValueError(f"need (heads, tokens, enc_frames) maps, got {tuple(w.shape)}")
    if row_norm == "sum":
        if (w < 0).any():
            raise ValueError("row_norm='sum' needs a non-negative map; use row_norm=None")
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.zeros_like(w))
    elif row_norm is not None:
        raise ValueError(f"row_norm must be 'sum' or None, got {row_norm!r}")
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, correction=0)
    w = torch.where(std > 0, (w - mean) / std, torch.zeros_like(w))
    return median_filter(w, medfilt_width).mean(0)


def softmax_matrix(maps: MapLike, *, medfilt_width: int = 3) -> torch.Tensor:
    """The aggregation of "Whisper Has an Internal Word Aligner" (arXiv 2509.09987, its code):
    median filter on the pre-softmax scores, softmax over enc frames, each head's columns scaled
    to unit L2 norm over tokens, mean over heads.

    ``maps`` shape = (heads, tokens, enc_frames) or (tokens, enc_frames): attention weights (rows
    sum to 1). Their log is the pre-softmax score minus a per-row constant, which the median filter
    along frames and the softmax both ignore, so the weights give the same matrix as the scores.
    Returns (tokens, enc_frames), float32.
    """
    w = torch.as_tensor(maps).detach().float().cpu()
    w = w[None] if w.ndim == 2 else w
    if w.ndim != 3 or 0 in w.shape:
        raise ValueError(f"need (heads, tokens, enc_frames) maps, got {tuple(w.shape)}")
    if (w < 0).any():
        raise ValueError("softmax_matrix needs attention weights (non-negative)")
    w = filtered_softmax(w, medfilt_width)
    return (w / w.norm(dim=-2, keepdim=True).clamp_min(1e-12)).mean(0)


def filtered_softmax(weights: torch.Tensor, medfilt_width: int = 3) -> torch.Tensor:
    """Attention weights (any shape ending in enc_frames) back to log scores, median-filtered along
    enc frames and softmaxed again: the per-head step of :func:`softmax_matrix`, float32."""
    w = torch.log(weights.float().clamp_min(1e-30))
    return median_filter(w, medfilt_width).softmax(-1)


def split_words(tokens: Sequence[str], special: Sequence[bool], *, on_spaces: bool = True):
    """Group tokens into words like whisper's ``split_tokens_on_spaces``: a token starts a new
    word if it is special, starts with a space or is punctuation. Returns [(word, [indices])].
    Multi-byte characters split over tokens keep their U+FFFD pieces (no tokenizer here)."""
    words: list[tuple[str, list[int]]] = []
    for i, (tok, sp) in enumerate(zip(tokens, special, strict=True)):
        new = sp or not on_spaces or tok.startswith(" ") or tok.strip() in string.punctuation
        if new or not words:
            words.append((tok, [i]))
        else:
            words[-1] = (words[-1][0] + tok, words[-1][1] + [i])
    return words


def merge_punctuations(words: list[str], tokens: list[list], prepended: str, appended: str) -> None:
    """Whisper's ``merge_punctuations``, in place on parallel lists of word texts and token lists:
    opening punctuation joins the following word, closing punctuation the previous one. The word
    joined keeps its times; the emptied entry is left as ``""`` with no tokens."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i].startswith(" ") and words[i].strip() in prepended:
            words[j], tokens[j] = words[i] + words[j], tokens[i] + tokens[j]
            words[i], tokens[i] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i].endswith(" ") and words[j] in appended:
            words[i], tokens[i] = words[i] + words[j], tokens[i] + tokens[j]
            words[j], tokens[j] = "", []
        else:
            i = j
        j += 1


def _stack(scores, heads) -> torch.Tensor:
    """Maps (tokens, enc_frames) or (maps, tokens, enc_frames), or the ``heads`` of a CA."""
    if isinstance(scores, CrossAttention) or torch.as_tensor(scores).ndim == 4:
        view = View.all() if heads is None else View.alignment() if heads == "alignment" else heads
        return stack_heads(scores, view).float().cpu()  # whisper's (layer, head) order
    t = torch.as_tensor(scores).detach().float().cpu()
    if t.ndim not in (2, 3):
        raise ValueError(f"need CA (layers, heads, tokens, enc_frames) or maps, got {t.shape}")
    return t


def word_timings(
    scores: CrossAttention | MapLike,
    transcript: Transcript | Sequence[str] | None = None,
    *,
    heads: Iterable[tuple[int, int]] | str | None = "alignment",
    special: Sequence[bool] | None = None,
    probabilities: Sequence[float] | None = None,
    options: TimingOptions = TimingOptions(),  # noqa: B008 (frozen)
) -> list[WordTiming]:
    """Word start and end times from cross-attention or any (tokens, enc_frames) map.

    ``scores``: a :class:`CrossAttention` (its transcript is used; ``heads``: ``"alignment"``,
    ``None`` for all, (layer, head) pairs or a :class:`~xattn_utils.maps.views.View` or its label,
    each head normalised and filtered on its own, as whisper does), a CA tensor (layers, heads,
    tokens, enc_frames) with explicit ``heads``, or a map (tokens, enc_frames) such as a CA
    view, SM_H or ``compare.pool_to_enc(SM_X)``, or a stack of maps (maps, tokens, enc_frames).
    Rows are output tokens (see :mod:`xattn_utils.model.decode`); the time axis starts at 0 s and
    should stop at the end of the speech (crop padding frames). ``transcript`` is a
    :class:`Transcript` or token strings with ``special`` flags (default: tokens written
    ``<|...|>``). Special rows are left out of the DTW, except the special row right after the
    text (``eot``), which ends the last word; without one the last word ends at the end of the
    map. All rows take part in the z-normalisation. ``probabilities`` (one per row) give each
    word the mean of its tokens' (before punctuation is merged, as in whisper).
    """
    if isinstance(scores, CrossAttention):
        transcript = scores.transcript if transcript is None else transcript
        options = replace(options, enc_frame_seconds=scores.enc_frame_seconds)
    if transcript is None:
        raise ValueError("give the transcript (or token strings) the map's rows belong to")
    tokens = list(transcript.tokens if isinstance(transcript, Transcript) else transcript)
    if special is None and isinstance(transcript, Transcript):
        special = transcript.special
    elif special is None:
        special = [t.startswith("<|") and t.endswith("|>") for t in tokens]
    stack = _stack(scores, heads)
    if not (stack.shape[-2] == len(tokens) == len(special)):
        raise ValueError(
            f"the map has {stack.shape[-2]} token rows but there are {len(tokens)} tokens and "
            f"{len(special)} special flags (SM_X must be pooled first: compare.pool_to_enc)"
        )
    o = options
    matrix = timing_matrix(stack, medfilt_width=o.medfilt_width, row_norm=o.row_norm).numpy()
    rows = [i for i, s in enumerate(special) if not s]
    if not rows:
        return []
    has_eot = rows[-1] + 1 < len(tokens) and bool(special[rows[-1] + 1])
    rows += [rows[-1] + 1] if has_eot else []
    text_idx, time_idx = dtw(-matrix[rows].astype(np.float64))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    starts = list(time_idx[jumps] * o.enc_frame_seconds)
    if not has_eot:
        starts.append(matrix.shape[1] * o.enc_frame_seconds)
    pieces = split_words(
        [tokens[r] for r in rows], [special[r] for r in rows], on_spaces=o.split_on_spaces
    )[: -1 if has_eot else None]
    texts = [text for text, _ in pieces]
    groups = [[rows[k] for k in idx] for _, idx in pieces]
    times = [(float(starts[idx[0]]), float(starts[idx[-1] + 1])) for _, idx in pieces]
    probs = [None if probabilities is None else float(np.mean([probabilities[r] for r in g]))
             for g in groups]  # fmt: skip
    merge_punctuations(texts, groups, o.prepend_punctuations, o.append_punctuations)
    return [
        WordTiming(text, start, end, tuple(tokens[r] for r in g), tuple(g), p)
        for text, g, (start, end), p in zip(texts, groups, times, probs, strict=True)
        if text
    ]

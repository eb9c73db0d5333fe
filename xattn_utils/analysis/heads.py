"""Heads ranked without labels, per utterance: which cross-attention heads align this transcript.

Both rankings read one utterance's maps, shape = (layers, heads, tokens, enc_frames), on the rows
of its words, and return every (layer, head), best first:
:func:`rank_heads` (peaked and monotone maps: the ``select`` methods) and
:func:`rank_heads_by_norms` (the head filter of arXiv 2509.09987: ``chars-guided``).
:func:`~xattn_utils.analysis.alignment.choose_heads` keeps the top ``k`` of either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .timing import filtered_softmax


def rank_heads(scores: torch.Tensor, rows: Sequence[int]) -> list[tuple[int, int]]:
    """Every (layer, head), best first, by an unsupervised alignment score of its map on
    ``rows``: peakedness (mean over rows of the row's largest share after normalising the row to
    sum 1, times the number of frames) times monotonicity (Spearman correlation of the row
    index with the row's peak frame, floored at 0); heads without a monotone trend (score 0)
    follow, by peakedness. No labels: usable per utterance."""
    w = scores[:, :, list(rows)].float()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    peak = w.amax(-1).mean(-1) * w.shape[-1]  # (layers, heads)
    argmax = w.argmax(-1).float()  # (layers, heads, rows)
    r_time = argmax.argsort(-1).argsort(-1).float()
    r_row = torch.arange(len(rows), dtype=torch.float32, device=w.device)
    if len(rows) > 1:
        rt, rr = r_time - r_time.mean(-1, keepdim=True), r_row - r_row.mean()
        denom = (rt.norm(dim=-1) * rr.norm()).clamp_min(1e-12)
        mono = ((rt * rr).sum(-1) / denom).clamp_min(0)
    else:
        mono = torch.ones_like(peak)
    return _best_first(torch.log(peak.clamp_min(1e-12)) * mono, then=peak)


def rank_heads_by_norms(
    scores: torch.Tensor, rows: Sequence[int], *, medfilt_width: int = 3
) -> list[tuple[int, int]]:
    """Every (layer, head), best first, by the filter of arXiv 2509.09987 (its code): the sum of
    the row L2 norms plus the sum of the column L2 norms of the head's map on ``rows``, after the
    median filter and softmax of :func:`~xattn_utils.analysis.timing.softmax_matrix`. Peaked rows
    and columns that each hold one row score high. No labels: usable per utterance."""
    w = filtered_softmax(scores[:, :, list(rows)], medfilt_width)
    return _best_first(w.norm(dim=-1).sum(-1) + w.norm(dim=-2).sum(-1))


def _best_first(score: torch.Tensor, then: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(layer, head) pairs ordered by ``score`` shape = (layers, heads), largest first; ties by
    ``then`` (same shape), largest first, then the lower layer and head."""
    keys = [-score.flatten().double().cpu().numpy()]
    keys = keys if then is None else [-then.flatten().double().cpu().numpy(), *keys]
    n_heads = score.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in np.lexsort(keys)]

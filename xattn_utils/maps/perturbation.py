"""SPES-style perturbation: its options, the batched masked-forward loop and the scores.

The estimator (Fucci et al., SPES): draw masks that occlude each *unit* (a SLIC superpixel of
the spectrogram, or a group of encoder frames) independently with probability ``p``; score every
output token of every masked forward at once; the saliency of token ``i`` at cell ``c`` is the
mean score of token ``i`` over the masks that occluded ``c`` (0 where ``c`` was never occluded).

Everything here is model-agnostic: a ``score_fn`` maps a batch of boolean cell masks
``(batch, *cells)`` to scores ``(batch, tokens)``. Accumulators are kept per fold (two halves of
the masks) so that the reliability of a map can be estimated from the same forwards. The masks
themselves (units, :class:`~xattn_utils.maps.masks.MaskSampler`) are in
:mod:`xattn_utils.maps.masks`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .masks import MaskSampler

log = logging.getLogger(__name__)

DESIGNS = ("iid", "antithetic", "control", "antithetic-control")
ESTIMATORS = (  # see xattn_utils.maps.estimators
    "mean", "grid", "grid-adjusted", "ridge", "ridge-adjusted", "bins", "bins-adjusted",
    "lasso", "lasso-adjusted",
)  # fmt: skip
FILLS = ("padding", "zero", "mean")  # value of occluded spectrogram cells
PRECISIONS = ("fp32", "bf16", "fp16")
PAIRED = ("antithetic", "antithetic-control")  # each mask followed by its complement
CONTROLLED = ("control", "antithetic-control")  # scores corrected by a control variate
N_FOLDS = 2  # halves of the masks, for split-half reliability
N_PARTS = 4  # control variate: each half in two parts, each fitted on the other
N_BINS = 16  # time bins of the control variate's surrogate
SPEED_ONLY = ("batch_size",)  # options that change no number, only the time it takes


class PerturbationError(ValueError):
    """Bad perturbation parameters."""


@dataclass(frozen=True)
class PerturbationOptions:
    """Knobs of the SPES-style estimator (defaults sized for a 2-core CPU).

    - ``n_masks``: masks per SM_X map (the reference uses 20,000, a GPU job).
    - ``enc_mask_factor``: SM_H runs ``n_masks * enc_mask_factor`` masks. Its decoder-only
      forwards cost a fraction of a full one, and its map needs them: on tiny.en 128 masks
      give SM_H a reliability of about 0.2, 512 about 0.4-0.6 (see ``06_convergence``).
    - ``p``: probability that a unit is occluded.
    - ``granularities``: SLIC segment counts for a 5 s utterance; scaled by
      :func:`segment_counts` with the utterance length (SM_X).
    - ``enc_groups``: widths in encoder frames of the contiguous groups masked for SM_H.
    - ``scorer``: ``"kl"`` (KL(P_orig || P_masked) per token) or ``"prob_drop"``
      (drop in the reference token's probability).
    - ``design``: ``"iid"`` Bernoulli masks, ``"antithetic"`` (each mask then its complement),
      ``"control"`` (i.i.d. masks, scores corrected by a cross-fitted control variate, see
      :func:`control_variate`) or ``"antithetic-control"`` (both; the default: on tiny.en it
      matched i.i.d. masks' reliability with 1.2x fewer SM_H forwards, see
      ``benchmarks/convergence.py``; it needs ``p = 0.5``).
    - ``estimator``: how the SM_X map is estimated from its masks' scores (see
      :mod:`xattn_utils.maps.estimators`): ``"grid"`` (default: on tiny.en it matched the held-out
      reference as closely as about twice as many i.i.d. masks do, ``benchmarks/estimators.py``),
      ``"ridge"``, ``"bins"``, ``"lasso"`` (sparse), their unbiased ``"-adjusted"`` forms, or
      ``"mean"`` (SPES's mean over occluding masks, with ``design``). All but ``"mean"`` model
      the scores of i.i.d. masks, so SM_X then runs i.i.d. masks (every estimator estimates the
      same map) and ``design`` governs SM_H only. SM_H keeps the mean estimator.
    - ``fill``: value of occluded spectrogram cells: ``"padding"`` (Whisper's clamp floor, the
      digital silence that pads every short utterance; default), ``"zero"`` (0 in the model's
      input space, as the SPES reference code after its normalisation) or ``"mean"``.
    - ``encoder_window``: ``None`` (default, faithful): SM_X's encoder reads the whole 30 s
      window; a number: only the speech region plus that many seconds (cheaper, approximate).
    - ``precision``: ``"fp32"`` (the reference) or ``"bf16"``/``"fp16"`` autocast of the masked
      forwards (for CUDA).
    - ``batch_size``: masks per forward; ``None`` picks one from the device's free memory.
    """

    n_masks: int = 200
    enc_mask_factor: int = 4
    p: float = 0.5
    granularities: tuple[int, ...] = (2000, 2500, 3000)
    enc_groups: tuple[int, ...] = (1, 2, 4)
    scorer: str = "kl"
    design: str = "antithetic-control"
    estimator: str = "grid"
    fill: str = "padding"
    encoder_window: float | None = None
    precision: str = "fp32"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n_masks, int) or self.n_masks < 1:
            raise PerturbationError(f"n_masks must be a positive integer, got {self.n_masks!r}")
        if not isinstance(self.enc_mask_factor, int) or self.enc_mask_factor < 1:
            raise PerturbationError(
                f"enc_mask_factor must be a positive integer, got {self.enc_mask_factor!r}"
            )
        if not 0 < self.p < 1:
            raise PerturbationError(f"p must lie strictly between 0 and 1, got {self.p!r}")
        if self.scorer not in ("kl", "prob_drop"):
            raise PerturbationError(f"unknown scorer {self.scorer!r}: use 'kl' or 'prob_drop'")
        if self.design not in DESIGNS:
            raise PerturbationError(f"unknown mask design {self.design!r}: use one of {DESIGNS}")
        if self.design in PAIRED and self.p != 0.5:
            raise PerturbationError(
                f"design {self.design!r} pairs each mask with its complement and needs p = 0.5 "
                f"(a complement occludes 1 - p); use design='control' or 'iid' for p = {self.p}"
            )
        if self.estimator not in ESTIMATORS:
            raise PerturbationError(
                f"unknown estimator {self.estimator!r}: use one of {ESTIMATORS}"
            )
        if self.fill not in FILLS:
            raise PerturbationError(f"unknown fill {self.fill!r}: use one of {FILLS}")
        if self.precision not in PRECISIONS:
            raise PerturbationError(
                f"unknown precision {self.precision!r}: use one of {PRECISIONS}"
            )
        if self.encoder_window is not None and not 0 <= self.encoder_window <= 30:
            raise PerturbationError(
                f"encoder_window must be None (all 30 s) or 0..30 seconds past the speech, "
                f"got {self.encoder_window!r}"
            )
        if not self.granularities or min(self.granularities) < 1:
            raise PerturbationError(f"granularities must be positive, got {self.granularities}")
        if not self.enc_groups or min(self.enc_groups) < 1:
            raise PerturbationError(f"enc_groups must be positive, got {self.enc_groups}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PerturbationError(f"batch_size must be positive, got {self.batch_size}")

    def params(self) -> dict:
        """The settings a map depends on, JSON-able: every field but the speed-only ones
        (:data:`SPEED_ONLY`), which change how fast the masks run, not which masks or scores."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SPEED_ONLY}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class MaskStatistics:
    """Accumulated sums per fold: ``num`` (folds, tokens, cells), ``occluded`` (folds, cells),
    ``total`` (folds, tokens) and ``count`` (folds,); ``scores`` (masks, tokens): the score of
    every mask, kept so that maps of fewer masks, or with a control variate, need no forwards."""

    num: torch.Tensor
    occluded: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor
    scores: torch.Tensor | None = None

    def saliency(self, folds: Sequence[int] | None = None) -> torch.Tensor:
        """SPES estimate: mean score over the masks that occluded each cell. shape =
        (tokens, cells)."""
        sel = list(range(self.num.shape[0])) if folds is None else list(folds)
        num, occ = self.num[sel].sum(0), self.occluded[sel].sum(0)
        return torch.where(occ > 0, num / occ.clamp(min=1), torch.zeros_like(num))

    def occlusion_rate(self) -> torch.Tensor:
        """Share of masks that occluded each cell. shape = (cells,)."""
        return self.occluded.sum(0) / self.count.sum().clamp(min=1)


def run_masks(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    sampler: MaskSampler,
    n_tokens: int,
    *,
    batch_size: int,
    progress: bool | str = True,
) -> MaskStatistics:
    """Run every mask through ``score_fn`` in batches and accumulate the estimator's sums
    (:func:`accumulate`; with the control variate when the sampler's design asks for it).

    On out-of-memory the batch is halved and retried (logged), down to one mask.
    """
    desc = progress if isinstance(progress, str) else "masks"
    bar = tqdm(total=sampler.n_masks, desc=desc, disable=not progress, leave=False)
    scores = torch.zeros(sampler.n_masks, n_tokens, dtype=torch.float64)
    start = 0
    while start < sampler.n_masks:
        stop = min(start + batch_size, sampler.n_masks)
        try:
            scores[start:stop] = score_fn(sampler.masks(start, stop)).double().cpu()
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            log.warning("out of memory: retrying with batch_size=%d", batch_size)
            _empty_cache()
            continue
        bar.update(stop - start)
        start = stop
    bar.close()
    return accumulate(sampler, scores, control=sampler.design in CONTROLLED)


def accumulate(
    sampler: MaskSampler,
    scores: torch.Tensor,
    *,
    stop: int | None = None,
    control: bool = False,
    n_bins: int = N_BINS,
    chunk: int = 256,
) -> MaskStatistics:
    """The estimator's sums over the first ``stop`` masks of ``sampler`` from their ``scores``
    (masks, tokens), without forwards. With ``control`` the scores are corrected by a
    cross-fitted control variate first (:func:`control_variate`)."""
    stop = sampler.n_masks if stop is None else stop
    raw = scores = scores[:stop].double()
    correction = None
    if control:  # the sums use the residual scores; the raw ones are kept for replays
        scores, correction = control_variate(sampler, raw, n_bins=n_bins)
    n_cells = int(np.prod(sampler.cells_shape))
    n_tokens = scores.shape[1]
    num = torch.zeros(N_FOLDS, n_tokens, n_cells, dtype=torch.float64)
    occluded = torch.zeros(N_FOLDS, n_cells, dtype=torch.float64)
    total = torch.zeros(N_FOLDS, n_tokens, dtype=torch.float64)
    count = torch.zeros(N_FOLDS, dtype=torch.float64)
    for start in range(0, stop, chunk):
        end = min(start + chunk, stop)
        flat = sampler.masks(start, end).reshape(end - start, n_cells).double()
        fold = torch.as_tensor(sampler.fold(np.arange(start, end)))
        for f in range(N_FOLDS):
            rows = fold == f
            if rows.any():
                num[f] += scores[start:end][rows].T @ flat[rows]
                occluded[f] += flat[rows].sum(0)
                total[f] += scores[start:end][rows].sum(0)
                count[f] += int(rows.sum())
    if correction is not None:
        num += correction
    return MaskStatistics(num=num, occluded=occluded, total=total, count=count, scores=raw)


# -- the control variate ----------------------------------------------------------------------


def time_bins(n_time: int, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each time step (the first cell axis): ``n_bins`` contiguous, near-equal bins."""
    n_bins = max(1, min(n_bins, n_time))
    return np.arange(n_time) * n_bins // n_time


def bin_features(masks: torch.Tensor, bins: np.ndarray) -> torch.Tensor:
    """Occluded share of each time bin, shape = (masks, bins), of cell masks (masks, time, ...)."""
    per_time = masks.reshape(masks.shape[0], masks.shape[1], -1).sum(-1).double()
    per_time /= max(1, int(np.prod(masks.shape[2:])))
    index = torch.as_tensor(bins)
    out = torch.zeros(masks.shape[0], int(bins.max()) + 1, dtype=torch.float64)
    out.index_add_(1, index, per_time)
    return out / torch.bincount(index).double()


def ridge_gcv(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ridge coefficients (features, tokens) of centred ``y`` (n, tokens) on centred ``x`` (n,
    features), one penalty for all tokens chosen by generalised cross-validation."""
    x, y = x - x.mean(0), y - y.mean(0)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    n = x.shape[0]
    best, coef = math.inf, torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    scale = float(s.max()) ** 2 if s.numel() else 1.0
    for lam in scale * 10.0 ** np.arange(-4.0, 2.5, 0.5):
        shrink = s**2 / (s**2 + lam)
        resid = ((y - u @ (shrink[:, None] * uty)) ** 2).sum()
        gcv = float(resid) / max(n * (1 - float(shrink.sum()) / n) ** 2, 1e-12)
        if gcv < best:
            best, coef = gcv, vh.T @ ((s / (s**2 + lam))[:, None] * uty)
    return coef


def control_variate(
    sampler: MaskSampler, scores: torch.Tensor, *, n_bins: int = N_BINS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-fitted linear control variate for the SPES estimator.

    The score of a mask is mostly explained by *how much* of each stretch of time it occludes.
    A surrogate ``h(m) = (x(m) - p) . g`` on the occluded share ``x`` of ``N_BINS`` time bins is
    fitted (ridge, :func:`ridge_gcv`) on the masks of one part and applied to the masks of its
    partner part in the same half (:meth:`MaskSampler.part`: 0 with 2, 1 with 3), so each half's
    map stays independent of the other half and split-half reliability stays honest. The
    estimator becomes ``mean_{m_c = 1}(f - h) + E[h | m_c = 1]``: the same expectation as SPES for
    any ``g`` (``E[h | m_c = 1]`` is known in closed form: with unit ``u`` of ``c`` occluded,
    bin ``b`` is occluded at ``p + (1 - p) |u & b| / |b|``), with the variance of ``f - h``.

    Returns the residual scores (masks, tokens) and the summed corrections ``sum_{m_c=1}
    E[h | m_c = 1, granularity of m]`` per fold, shape = (folds, tokens, cells)."""
    n = scores.shape[0]
    masks = sampler.masks(0, n)
    bins = time_bins(masks.shape[1], n_bins)
    x = bin_features(masks, bins) - sampler.p
    parts = sampler.part(np.arange(n))
    n_cells, n_tokens = int(np.prod(sampler.cells_shape)), scores.shape[1]
    cell_bins = torch.tensor(np.broadcast_to(
        bins.reshape(-1, *[1] * (len(sampler.cells_shape) - 1)), sampler.cells_shape
    ).reshape(-1))  # fmt: skip
    bin_size = torch.bincount(cell_bins).double()
    residual = scores.clone()
    correction = torch.zeros(N_FOLDS, n_tokens, n_cells, dtype=torch.float64)
    flat = masks.reshape(n, n_cells)
    for part in range(N_PARTS):
        rows = np.flatnonzero(parts == part)
        partner = np.flatnonzero(parts == (part + N_FOLDS) % N_PARTS)
        if rows.size == 0 or partner.size < 4:
            continue  # too few masks to fit on: these masks keep their plain scores
        coef = ridge_gcv(x[partner], scores[partner])  # (bins, tokens)
        residual[rows] -= x[rows] @ coef
        for g, labels in enumerate(sampler.label_maps):
            sel = rows[sampler.granularity[rows] == g]
            if sel.size == 0:
                continue
            lab = labels.reshape(-1)
            overlap = torch.zeros(int(lab.max()) + 1, len(bin_size), dtype=torch.float64)
            overlap.index_put_((lab, cell_bins), torch.ones(n_cells, dtype=torch.float64),
                               accumulate=True)  # fmt: skip
            k = (1 - sampler.p) * (overlap / bin_size) @ coef  # (units, tokens)
            times = flat[sel].sum(0).double()  # masks of this part and granularity occluding c
            correction[part % N_FOLDS] += k[lab].T * times
    return residual, correction


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def auto_batch_size(device: torch.device, bytes_per_mask: int, *, cap: int = 256) -> int:
    """Masks per forward: 4 on CPU (larger batches do not raise throughput on a few cores);
    on CUDA as many as fit in half the free memory, up to ``cap``."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(cap, free // 2 // max(bytes_per_mask, 1))))


def kl_scores(log_p0: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_orig || P_masked) per token. log_p0 shape = (tokens, vocab); logits = (batch,
    tokens, vocab); returns (batch, tokens)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return (log_p0.exp() * (log_p0 - log_p)).sum(-1).clamp(min=0)


def prob_drop_scores(p0_ref: torch.Tensor, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Drop of the reference token's probability per token. p0_ref shape = (tokens,), ref =
    (tokens,) ids; returns (batch, tokens)."""
    p = torch.softmax(logits.float(), dim=-1)
    return p0_ref - p.gather(-1, ref.expand(p.shape[0], -1).unsqueeze(-1)).squeeze(-1)

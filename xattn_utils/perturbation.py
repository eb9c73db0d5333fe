"""Random occlusion masks and the batched masked-forward loop behind SPES-style saliency.

The estimator (Fucci et al., SPES): draw masks that occlude each *unit* (a SLIC superpixel of
the spectrogram, or a group of encoder frames) independently with probability ``p``; score every
output token of every masked forward at once; the saliency of token ``i`` at cell ``c`` is the
mean score of token ``i`` over the masks that occluded ``c`` (0 where ``c`` was never occluded).

Everything here is model-agnostic: a ``score_fn`` maps a batch of boolean cell masks
``(batch, *cells)`` to scores ``(batch, tokens)``. Accumulators are kept per fold (two halves of
the masks) so that the reliability of a map can be estimated from the same forwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DESIGNS = ("iid", "antithetic")
N_FOLDS = 2


class PerturbationError(ValueError):
    """Bad perturbation parameters."""


@dataclass(frozen=True)
class PerturbationOptions:
    """Knobs of the SPES-style estimator (defaults sized for a 2-core CPU).

    - ``n_masks``: masks per map (the reference uses 20,000, a GPU job).
    - ``p``: probability that a unit is occluded.
    - ``granularities``: SLIC segment counts for a 5 s utterance; scaled by
      :func:`segment_counts` with the utterance length (SM_X).
    - ``enc_groups``: widths in encoder frames of the contiguous groups masked for SM_H.
    - ``scorer``: ``"kl"`` (KL(P_orig || P_masked) per token) or ``"prob_drop"``
      (drop in the reference token's probability).
    - ``design``: ``"iid"`` Bernoulli masks, or ``"antithetic"`` (each mask then its complement).
    - ``batch_size``: masks per forward; ``None`` picks one from the device's free memory.
    """

    n_masks: int = 200
    p: float = 0.5
    granularities: tuple[int, ...] = (2000, 2500, 3000)
    enc_groups: tuple[int, ...] = (1, 2, 4)
    scorer: str = "kl"
    design: str = "iid"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n_masks, int) or self.n_masks < 1:
            raise PerturbationError(f"n_masks must be a positive integer, got {self.n_masks!r}")
        if not 0 < self.p < 1:
            raise PerturbationError(f"p must lie strictly between 0 and 1, got {self.p!r}")
        if self.scorer not in ("kl", "prob_drop"):
            raise PerturbationError(f"unknown scorer {self.scorer!r}: use 'kl' or 'prob_drop'")
        if self.design not in DESIGNS:
            raise PerturbationError(f"unknown mask design {self.design!r}: use one of {DESIGNS}")
        if self.design == "antithetic" and self.p != 0.5:
            raise PerturbationError("antithetic masks need p = 0.5 (a complement occludes 1 - p)")
        if not self.granularities or min(self.granularities) < 1:
            raise PerturbationError(f"granularities must be positive, got {self.granularities}")
        if not self.enc_groups or min(self.enc_groups) < 1:
            raise PerturbationError(f"enc_groups must be positive, got {self.enc_groups}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PerturbationError(f"batch_size must be positive, got {self.batch_size}")


def segment_counts(mel_frames: int, granularities: Sequence[int]) -> list[int]:
    """SPES's scaling: ``round(n0 * min(T, 750) / 500)`` segments for ``T`` mel frames.

    The counts grow linearly with duration up to 7.5 s, as in the reference implementation.
    """
    return [max(2, round(n0 * min(mel_frames, 750) / 500)) for n0 in granularities]


def slic_segments(spectrogram: np.ndarray, n_segments: int) -> np.ndarray:
    """SLIC superpixels of a ``(mel_frames, mels)`` spectrogram, as SPES: min-max normalised,
    single channel, compactness 0.1, sigma 0. Returns labels 0..K-1, shape = (mel_frames, mels).
    """
    from skimage.segmentation import slic

    spec = spectrogram.astype(np.float64)
    spec = (spec - spec.min()) / max(spec.max() - spec.min(), 1e-12)
    labels = slic(
        spec, n_segments=n_segments, compactness=0.1, sigma=0, channel_axis=None, start_label=0
    )
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def frame_groups(enc_frames: int, width: int) -> np.ndarray:
    """Contiguous groups of ``width`` encoder frames as labels, shape = (enc_frames,)."""
    return np.arange(enc_frames) // width


def distinct_label_maps(label_maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Drop label maps identical to an earlier one (SLIC can return the same segmentation for
    nearby segment counts); the remaining granularities really differ."""
    out: list[np.ndarray] = []
    for labels in label_maps:
        if not any(np.array_equal(labels, seen) for seen in out):
            out.append(labels)
    return out


class MaskSampler:
    """Deterministic masks over unit label maps (one map per granularity).

    Mask ``m`` uses granularity ``(m // 2) % G`` (pairs stay together for antithetic designs).
    All unit draws are made up front from ``seed``, so a mask does not depend on the batch size.
    """

    def __init__(
        self,
        label_maps: Sequence[np.ndarray],
        n_masks: int,
        *,
        p: float = 0.5,
        design: str = "iid",
        seed: int = 0,
    ) -> None:
        self.label_maps = [torch.as_tensor(lm, dtype=torch.long) for lm in label_maps]
        self.n_masks = n_masks
        self.granularity = (np.arange(n_masks) // 2) % len(self.label_maps)
        gen = torch.Generator().manual_seed(seed)
        self.units: list[torch.Tensor] = []
        for g, labels in enumerate(self.label_maps):
            n_units = int(labels.max()) + 1
            count = int((self.granularity == g).sum())
            draws = torch.rand(count, n_units, generator=gen) < p
            if design == "antithetic":
                draws[1::2] = ~draws[0::2][: draws[1::2].shape[0]]
            self.units.append(draws)
        self._row = np.zeros(n_masks, dtype=np.int64)  # row of mask m inside its granularity
        for g in range(len(self.label_maps)):
            idx = np.flatnonzero(self.granularity == g)
            self._row[idx] = np.arange(idx.size)

    @property
    def cells_shape(self) -> tuple[int, ...]:
        return tuple(self.label_maps[0].shape)

    def masks(self, start: int, stop: int) -> torch.Tensor:
        """Cell masks of masks ``start..stop-1``, True = occluded. shape = (batch, *cells)."""
        out = torch.empty((stop - start, *self.cells_shape), dtype=torch.bool)
        for j, m in enumerate(range(start, stop)):
            g = self.granularity[m]
            out[j] = self.units[g][self._row[m]][self.label_maps[g]]
        return out


@dataclass(frozen=True)
class MaskStatistics:
    """Accumulated sums per fold: ``num`` (folds, tokens, cells), ``occluded`` (folds, cells),
    ``total`` (folds, tokens) and ``count`` (folds,)."""

    num: torch.Tensor
    occluded: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor

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
    """Run every mask through ``score_fn`` in batches and accumulate the estimator's sums.

    On out-of-memory the batch is halved and retried (logged), down to one mask.
    """
    n_cells = int(np.prod(sampler.cells_shape))
    num = torch.zeros(N_FOLDS, n_tokens, n_cells, dtype=torch.float64)
    occluded = torch.zeros(N_FOLDS, n_cells, dtype=torch.float64)
    total = torch.zeros(N_FOLDS, n_tokens, dtype=torch.float64)
    count = torch.zeros(N_FOLDS, dtype=torch.float64)
    desc = progress if isinstance(progress, str) else "masks"
    bar = tqdm(total=sampler.n_masks, desc=desc, disable=not progress, leave=False)
    start = 0
    while start < sampler.n_masks:
        stop = min(start + batch_size, sampler.n_masks)
        masks = sampler.masks(start, stop)
        try:
            scores = score_fn(masks).double().cpu()  # (batch, tokens)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            log.warning("out of memory: retrying with batch_size=%d", batch_size)
            _empty_cache()
            continue
        flat = masks.reshape(masks.shape[0], n_cells).double()
        fold = torch.as_tensor((np.arange(start, stop) // 2) % N_FOLDS)
        for f in range(N_FOLDS):
            rows = fold == f
            if rows.any():
                num[f] += scores[rows].T @ flat[rows]
                occluded[f] += flat[rows].sum(0)
                total[f] += scores[rows].sum(0)
                count[f] += int(rows.sum())
        bar.update(stop - start)
        start = stop
    bar.close()
    return MaskStatistics(num=num, occluded=occluded, total=total, count=count)


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

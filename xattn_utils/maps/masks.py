"""Occlusion masks for SPES: the units a mask occludes and the deterministic mask sampler.

SM_X's units are SLIC superpixels of the spectrogram (:func:`slic_segments`, as many as
:func:`segment_counts` gives for the utterance's length, one label map per granularity, repeats
dropped by :func:`distinct_label_maps`); SM_H's are groups of encoder frames
(:func:`frame_groups`). :class:`MaskSampler` draws every mask up front from a seed, so a mask
never depends on the batch size, and splits the masks into halves (:meth:`MaskSampler.fold`)
for split-half reliability. The batched loop that scores the masks is in
:mod:`xattn_utils.maps.perturbation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .perturbation import DESIGNS, N_FOLDS, N_PARTS, PAIRED, PerturbationError


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
    Masks come in blocks of ``2 G`` (one pair per granularity); the halves used for split-half
    reliability are alternate blocks (:meth:`fold`), so each half holds every granularity
    equally and the two halves' maps estimate the same map.
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
        if design not in DESIGNS:
            raise PerturbationError(f"unknown mask design {design!r}: use one of {DESIGNS}")
        self.n_masks, self.p, self.design = n_masks, p, design
        self.granularity = (np.arange(n_masks) // 2) % len(self.label_maps)
        gen = torch.Generator().manual_seed(seed)
        self.units: list[torch.Tensor] = []
        for g, labels in enumerate(self.label_maps):
            n_units = int(labels.max()) + 1
            count = int((self.granularity == g).sum())
            draws = torch.rand(count, n_units, generator=gen) < p
            if design in PAIRED:
                draws[1::2] = ~draws[0::2][: draws[1::2].shape[0]]
            self.units.append(draws)
        self._row = np.zeros(n_masks, dtype=np.int64)  # row of mask m inside its granularity
        for g in range(len(self.label_maps)):
            idx = np.flatnonzero(self.granularity == g)
            self._row[idx] = np.arange(idx.size)

    def part(self, m: np.ndarray, n_parts: int = N_PARTS) -> np.ndarray:
        """Part of masks ``m`` among ``n_parts`` (alternate blocks of ``2 G`` masks); part
        ``k`` lies in half ``k % 2``."""
        return (np.asarray(m) // (2 * len(self.label_maps))) % n_parts

    def fold(self, m: np.ndarray) -> np.ndarray:
        """Half (0 or 1) of masks ``m``: alternate blocks of ``2 G`` masks."""
        return self.part(m, N_FOLDS)

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

"""SPES saliency runs: the masked forwards of SM_X and SM_H for one prepared utterance.

- SM_X, over the speech region of the log-mel spectrogram: masks of SLIC superpixels at several
  granularities. Occluded cells take the value that padding (digital silence) has in this
  utterance's normalised log-mel input, i.e. Whisper's clamp floor ``(max_log - 8 + 4) / 4``
  (``PerturbationOptions.fill`` offers others). shape = (tokens, mel_frames, mel_bins).
- SM_H, over the encoder output: masks of contiguous groups of enc_frames. Occluded frames take
  the encoder's output at the same position for an all-silence input; the encoder runs once and
  only the decoder reruns. shape = (tokens, enc_frames).

A run keeps every mask's score (:class:`MaskRun`), so maps of fewer masks, of another design's
correction or of another estimator are replayed without forwards. The masks and the batched loop
are :mod:`xattn_utils.maps.perturbation`; the estimators :mod:`xattn_utils.maps.estimators`; the
masked forwards :mod:`xattn_utils.maps.forwards`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..model.loading import LoadedModel, attention_implementation
from .estimators import fold_maps
from .forwards import encoder_score_fn, forward_batch_size, mel_score_fn
from .masks import MaskSampler, distinct_label_maps, frame_groups, segment_counts, slic_segments
from .perturbation import CONTROLLED, MaskStatistics, PerturbationOptions, accumulate, run_masks
from .prepare import Prepared


@dataclass(frozen=True)
class MaskRun:
    """The masks and per-mask scores of one SPES map: ``stats`` (with ``scores``), the
    ``sampler`` that replays the masks, and the map's ``shape`` (tokens, *cells)."""

    sampler: MaskSampler
    stats: MaskStatistics
    shape: tuple[int, ...]
    estimator: str = "mean"

    def maps(
        self, n_masks: int | None = None, design: str | None = None, estimator: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(map, fold maps (2, *map)) from the first ``n_masks`` masks, without forwards;
        ``design`` ``"control"`` adds the control variate to the same masks and scores (see
        :func:`~xattn_utils.maps.perturbation.control_variate`); ``estimator`` (default the run's)
        re-estimates the map from the same scores (:mod:`xattn_utils.maps.estimators`)."""
        estimator = estimator or self.estimator
        if estimator != "mean":
            full, folds = fold_maps(self.sampler, self.stats.scores, estimator=estimator,
                                    stop=n_masks)  # fmt: skip
            return (full.reshape(self.shape).float().contiguous(),
                    folds.reshape(2, *self.shape).float().contiguous())  # fmt: skip
        if n_masks is None and design is None:
            return _maps(self.stats, self.shape)
        control = (design or self.sampler.design) in CONTROLLED
        stats = accumulate(self.sampler, self.stats.scores, stop=n_masks, control=control)
        return _maps(stats, self.shape)


@torch.no_grad()
def input_spes_run(
    loaded: LoadedModel,
    prepared: Prepared,
    *,
    options: PerturbationOptions,
    seed: int = 0,
    progress: bool = True,
) -> MaskRun:
    """The masked forwards of SPES SM_X over the speech's mel_frames (i.i.d. masks when
    ``options.estimator`` models them)."""
    if options.estimator != "mean":
        options = replace(options, design="iid")
    p = prepared
    spec = p.mel[0, :, : p.n_mel].T.float().cpu().numpy()  # (mel_frames, mel_bins)
    counts = segment_counts(p.n_mel, options.granularities)
    label_maps = distinct_label_maps([slic_segments(spec, k) for k in counts])
    score_fn = mel_score_fn(
        loaded, p.mel, p.transcript, p.logits, p.n_mel, scorer=options.scorer,
        fill=options.fill, encoder_window=options.encoder_window, precision=options.precision,
    )  # fmt: skip
    return _spes(
        loaded, label_maps, score_fn, shape=(len(p.transcript), p.n_mel, spec.shape[1]),
        options=options, seed=seed, batch_size=_batch_size(loaded, options, len(p.transcript)),
        progress=progress, name="SM_X",
    )  # fmt: skip


@torch.no_grad()
def encoder_spes_run(
    loaded: LoadedModel,
    prepared: Prepared,
    *,
    options: PerturbationOptions,
    seed: int = 0,
    progress: bool = True,
) -> MaskRun:
    """The masked forwards of SPES SM_H over the speech's enc_frames
    (``options.n_masks * options.enc_mask_factor`` masks, seeded ``seed + 1``)."""
    p = prepared
    label_maps = [frame_groups(p.n_enc, w) for w in options.enc_groups]
    options = replace(options, n_masks=options.n_masks * options.enc_mask_factor, estimator="mean")
    score_fn = encoder_score_fn(loaded, p.mel, p.transcript, p.logits, p.n_enc,
                                scorer=options.scorer)  # fmt: skip
    batch_size = 4 * _batch_size(loaded, options, len(p.transcript))  # decoder-only: light
    return _spes(
        loaded, label_maps, score_fn, shape=(len(p.transcript), p.n_enc), options=options,
        seed=seed + 1, batch_size=batch_size, progress=progress, name="SM_H",
    )  # fmt: skip


def _batch_size(loaded: LoadedModel, options: PerturbationOptions, n_tokens: int) -> int:
    if options.batch_size is not None:
        return options.batch_size
    return forward_batch_size(loaded, n_tokens)


def _spes(
    loaded: LoadedModel,
    label_maps: list[np.ndarray],
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    shape: tuple[int, ...],
    options: PerturbationOptions,
    seed: int,
    batch_size: int,
    progress: bool,
    name: str,
) -> MaskRun:
    """Draw the masks and run them (sdpa attention)."""
    sampler = MaskSampler(
        label_maps, options.n_masks, p=options.p, design=options.design, seed=seed
    )
    with attention_implementation(loaded, "sdpa"):
        stats = run_masks(
            score_fn,
            sampler,
            shape[0],
            batch_size=batch_size,
            progress=f"{name} masks" if progress else False,
        )
    return MaskRun(sampler=sampler, stats=stats, shape=shape, estimator=options.estimator)


def _maps(stats: MaskStatistics, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    full = stats.saliency().reshape(shape).float()
    folds = torch.stack([stats.saliency([f]).reshape(shape) for f in range(stats.num.shape[0])])
    return full.contiguous(), folds.float().contiguous()

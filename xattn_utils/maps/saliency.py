"""Saliency maps of every output token, and :func:`explain`, which bundles them with CA.

- SM_X, input saliency: shape = (tokens, mel_frames, mel_bins), over the speech region of the
  log-mel spectrogram.
- SM_H, encoder-output saliency: shape = (tokens, enc_frames), on cross-attention's time axis.

Methods (see :func:`list_methods`), each with its options dataclass:

- ``"spes"``: SPES-style perturbation (:mod:`xattn_utils.maps.spes`), :class:`PerturbationOptions`.
- ``"saliency"``, ``"input_x_gradient"``, ``"integrated_gradients"``: gradient maps
  (:mod:`xattn_utils.maps.gradients`), :class:`GradientOptions`.

:func:`run_params` names the settings a run uses; it is both :attr:`Explanation.params` and what
the store keys hash, so a run and its stored copy are found by what they computed.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import torch

from ..model.loading import LoadedModel
from .explanation import Explanation
from .gradients import GRADIENT_METHODS, GradientOptions, gradient_maps
from .perturbation import PerturbationError, PerturbationOptions
from .prepare import Prepared, prepare
from .spes import encoder_spes_run, input_spes_run

PERTURBATION_METHODS = ("spes",)
Options = PerturbationOptions | GradientOptions


def list_methods() -> list[str]:
    """Names accepted by ``explain(method=...)``."""
    return [*PERTURBATION_METHODS, *GRADIENT_METHODS]


def method_options(method: str, options: Options | None = None, **overrides) -> Options:
    """The options of ``method`` (its defaults when ``options`` is None) with ``overrides``
    replaced, e.g. ``method_options("spes", n_masks=512)``."""
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}: use one of {list_methods()}")
    kind = PerturbationOptions if method in PERTURBATION_METHODS else GradientOptions
    options = kind() if options is None else options
    if not isinstance(options, kind):
        raise TypeError(f"method {method!r} takes {kind.__name__}, got {type(options).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in fields(kind)})
    if unknown:
        raise PerturbationError(
            f"{kind.__name__} has no setting {', '.join(map(repr, unknown))}: "
            f"use some of {[f.name for f in fields(kind)]}"
        )
    return replace(options, **overrides) if overrides else options


def run_params(
    method: str,
    options: Options,
    *,
    seed: int,
    task: str,
    language: str | None,
    text: str | None,
) -> dict:
    """The settings of one :func:`explain` run, JSON-able: ``method``, ``task``, ``language``
    and ``text`` as requested (``text`` None: the model's own transcript), ``seed`` and the
    options the method uses, without speed-only settings (``batch_size``)."""
    used = options.params() if isinstance(options, PerturbationOptions) else options.params(method)
    return {"method": method, "task": task, "language": language, "text": text, "seed": seed,
            **used}  # fmt: skip


def explain(
    loaded: LoadedModel,
    audio: np.ndarray | str | Prepared,
    *,
    text: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
    method: str = "spes",
    options: Options | None = None,
    seed: int = 0,
    utterance: str = "",
    progress: bool = True,
    **overrides,
) -> Explanation:
    """Cross-attention, SM_X and SM_H of every output token of one utterance.

    The model's greedy transcript (or ``text``) is explained under teacher forcing; ``audio``
    may also be a :class:`~xattn_utils.maps.prepare.Prepared` (whose ``text``, ``task`` and
    ``language`` are then used). ``options`` are the method's (:class:`PerturbationOptions`
    for ``spes``, :class:`GradientOptions` otherwise; defaults when None) and ``overrides``
    replace their fields (``n_masks=512``, ``n_steps=64``). Same ``seed``, same maps.
    """
    options = method_options(method, options, **overrides)
    if isinstance(audio, Prepared):
        p = audio
        text, task, language = p.text, p.task, p.language
    else:
        p = prepare(loaded, audio, text=text, task=task, language=language)
    folds: dict[str, torch.Tensor | None] = {"input": None, "encoder": None}
    if isinstance(options, PerturbationOptions):
        run = {"options": options, "seed": seed, "progress": progress}
        sm_x, folds["input"] = input_spes_run(loaded, p, **run).maps()
        sm_h, folds["encoder"] = encoder_spes_run(loaded, p, **run).maps()
    else:
        sm_x, sm_h = gradient_maps(loaded, p.mel, p.transcript, p.n_mel, p.n_enc, method=method,
                                   n_steps=options.n_steps)  # fmt: skip
    params = run_params(method, options, seed=seed, task=task, language=language, text=text)
    return Explanation(
        transcript=p.transcript,
        cross_attention=p.cross_attention,
        input_saliency=sm_x,
        encoder_saliency=sm_h,
        input_saliency_folds=folds["input"],
        encoder_saliency_folds=folds["encoder"],
        model=loaded.name,
        method=method,
        params=params,
        alignment_heads=loaded.alignment_heads,
        duration=p.duration,
        utterance=utterance,
        enc_frame_seconds=loaded.family.enc_frame_seconds,
    )

"""SPES as a Captum attribution: ``SPES(forward_func).attribute(inputs, target=...)``.

Any model Captum takes (images, text embeddings, tabular data, speech), with Captum's
conventions: ``inputs`` a tensor or a tuple of tensors whose first dimension is the example,
``target`` as in :class:`captum.attr.FeatureAblation`, ``baselines`` the value an occluded
feature takes (default 0), ``feature_mask`` integer labels grouping elements into features,
``additional_forward_args`` passed after the inputs. The attribution has the input's shape.

**The quantity.** Masks occlude every feature (segment) independently with probability ``p``
(several segmentations, one per mask, in turn: SPES's granularities); the *score* of a mask is
the drop of the target output, ``f(x)[target] - f(x_masked)[target]``; the attribution of an
element is the mean score of the masks that occluded it (0 where none did), estimated by
``estimator`` from the masks' scores (:mod:`xattn_utils.maps.estimators`) under the mask
``design`` (:class:`~xattn_utils.maps.masks.MaskSampler`). On Whisper the package scores a
masked forward by KL(P_orig || P_masked) per token: a forward that returns ``-KL(P_orig ||
P(x))`` per token (:func:`mel_forward` with ``output="kl"``) makes the drop exactly that score,
and Captum SPES gives the package's SM_X row; ``output="probability"`` gives its
``"prob_drop"`` scorer.

**Segments.** ``feature_mask=None``: an example whose input is 2-D (e.g. a spectrogram
(mel_frames, mel_bins) or a grey image) is cut into SLIC superpixels at each count of
``n_segments`` (default SPES's counts for a spectrogram of that many mel frames,
:func:`~xattn_utils.maps.masks.segment_counts`); any other input makes each element its
own feature. A given ``feature_mask`` is one segmentation.

**Cost.** One forward per mask, in batches of ``perturbations_per_eval`` masks, plus one clean
forward, per distinct example: examples with equal inputs, baselines, feature masks and
additional arguments (e.g. one utterance repeated with ``target=[0, 1, ...]``, one token each)
share the same masks and forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from captum._utils.common import _format_additional_forward_args
from captum.attr import PerturbationAttribution
from tqdm.auto import tqdm

from .maps.estimators import estimate
from .maps.masks import MaskSampler, distinct_label_maps, segment_counts, slic_segments
from .maps.perturbation import CONTROLLED, PerturbationError, PerturbationOptions, accumulate

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
Target = int | tuple[int, ...] | torch.Tensor | list | None


class SPES(PerturbationAttribution):
    """SPES (Fucci et al.): the mean drop of the target output over random masks that occlude
    each feature. ``forward_func`` is a model or any function of the inputs (and
    ``additional_forward_args``) whose output's first dimension is the example."""

    def __init__(self, forward_func: Callable) -> None:
        super().__init__(forward_func)

    @torch.no_grad()
    def attribute(
        self,
        inputs: Inputs,
        target: Target = None,
        *,
        baselines: float | torch.Tensor | tuple | None = None,
        additional_forward_args: object = None,
        feature_mask: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        n_masks: int = 500,
        p: float = 0.5,
        design: str = "iid",
        estimator: str = "mean",
        n_segments: int | Sequence[int] | None = None,
        seed: int = 0,
        perturbations_per_eval: int = 4,
        show_progress: bool = False,
    ) -> Inputs:
        """Attributions with the shape of ``inputs`` (a tuple when ``inputs`` is one).

        - ``target``: Captum's: an output index (int or tuple) for every example, or a list /
          1-D tensor of one per example; ``None`` when the forward returns one value per
          example.
        - ``n_masks``, ``p``, ``design`` (``"iid"``, ``"antithetic"``, ``"control"``,
          ``"antithetic-control"``) and ``estimator`` (``"mean"``, ``"grid"``, ``"ridge"``,
          ``"bins"`` or their ``"-adjusted"`` forms; all but ``"mean"`` need ``design="iid"``):
          as :class:`~xattn_utils.maps.perturbation.PerturbationOptions`.
        - ``n_segments``: SLIC segment counts, one granularity each (only without
          ``feature_mask``, for 2-D examples).
        - ``seed``: the unit draws; every example draws the same ones.
        - ``perturbations_per_eval``: masks per forward call.
        """
        PerturbationOptions(n_masks=n_masks, p=p, design=design, estimator=estimator)
        if estimator != "mean" and design != "iid":
            raise PerturbationError(
                f"estimator {estimator!r} models i.i.d. masks: use design='iid' with it, "
                f"or estimator='mean' with design {design!r}"
            )
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise PerturbationError(
                f"perturbations_per_eval must be a positive integer, got {perturbations_per_eval!r}"
            )
        is_tuple = isinstance(inputs, tuple)
        xs = _as_tuple(inputs, "inputs")
        n = xs[0].shape[0]
        if any(x.ndim < 2 or x.shape[0] != n for x in xs):
            raise PerturbationError(
                "inputs need a first (example) dimension, the same in every tensor, and at least "
                f"one more; got shapes {[tuple(x.shape) for x in xs]}"
            )
        bases = _baselines(baselines, xs)
        masks = _feature_masks(feature_mask, xs)
        if masks is not None and n_segments is not None:
            raise PerturbationError("n_segments sets SLIC segments: give it or feature_mask")
        args = _format_additional_forward_args(additional_forward_args)
        targets = _targets(target, n)
        out = [torch.zeros(x.shape, dtype=torch.float64) for x in xs]
        runs: dict[int, tuple[MaskSampler, torch.Tensor, torch.Tensor]] = {}  # by first example
        bar = tqdm(total=n, desc="SPES", disable=not show_progress, leave=False)
        for i in range(n):
            example = [x[i : i + 1] for x in xs]
            first = next((j for j in runs if _same(j, i, xs, bases, masks, args)), None)
            if first is None:
                labels = _label_maps(example, None if masks is None else [m[i] for m in masks],
                                     n_segments)  # fmt: skip
                sampler = MaskSampler(labels, n_masks, p=p, design=design, seed=seed)
                clean, outputs = self._outputs(
                    example, [b[i : i + 1] for b in bases], _example_args(args, i, n),
                    sampler, perturbations_per_eval,
                )  # fmt: skip
                first, runs[i] = i, (sampler, clean, outputs)
            sampler, clean, outputs = runs[first]
            scores = (_select(clean, targets[i]) - _select(outputs, targets[i]))[:, None]
            if estimator == "mean":
                stats = accumulate(sampler, scores, control=design in CONTROLLED)
                cells = stats.saliency()[0]
            else:
                cells = estimate(sampler, scores, estimator=estimator)[0]
            for k, part in enumerate(_split(cells, example)):
                out[k][i] = part
            bar.update(1)
        bar.close()
        result = tuple(o.to(x.dtype if x.is_floating_point() else torch.float32).to(x.device)
                       for o, x in zip(out, xs, strict=True))  # fmt: skip
        return result if is_tuple else result[0]

    def _outputs(
        self,
        example: list[torch.Tensor],
        bases: list[torch.Tensor],
        args: tuple | None,
        sampler: MaskSampler,
        batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's outputs on the clean example (1, ...) and on every mask (masks, ...)."""
        clean = self._forward(tuple(example), args, 1)
        outputs = []
        for start in range(0, sampler.n_masks, batch):
            stop = min(start + batch, sampler.n_masks)
            occluded = sampler.masks(start, stop).reshape(stop - start, -1)
            parts = _split(occluded, example)
            perturbed = tuple(torch.where(m.to(x.device), b, x)
                              for m, x, b in zip(parts, example, bases, strict=True))  # fmt: skip
            outputs.append(self._forward(perturbed, args, stop - start))
        return clean, torch.cat(outputs)

    def _forward(self, xs: tuple[torch.Tensor, ...], args: tuple | None, b: int) -> torch.Tensor:
        if args is not None:
            args = tuple(a.expand(b, *a.shape[1:]) if isinstance(a, torch.Tensor) else a
                         for a in args)  # fmt: skip
        out = self.forward_func(*xs, *(args or ()))
        out = torch.as_tensor(out)
        if out.ndim == 0 or out.shape[0] != b:
            raise PerturbationError(
                f"forward_func returned shape {tuple(out.shape)} for {b} inputs: SPES needs one "
                "output (or one row of outputs) per input"
            )
        return out.detach().double().cpu()


# -- the pieces ---------------------------------------------------------------------------------


def _as_tuple(value, name: str) -> tuple[torch.Tensor, ...]:
    values = value if isinstance(value, tuple) else (value,)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise PerturbationError(f"{name} must be a tensor or a tuple of tensors")
    return values


def _baselines(baselines, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """One baseline per input, broadcast to its shape (Captum: scalar, tensor or a tuple)."""
    values = (0.0,) * len(xs) if baselines is None else baselines
    values = values if isinstance(values, tuple) else (values,)
    if len(values) != len(xs):
        raise PerturbationError(f"{len(values)} baselines for {len(xs)} inputs")
    out = []
    for b, x in zip(values, xs, strict=True):
        b = torch.as_tensor(b, dtype=x.dtype, device=x.device)
        try:
            out.append(torch.broadcast_to(b, x.shape))
        except RuntimeError as err:
            raise PerturbationError(
                f"baseline of shape {tuple(b.shape)} does not broadcast to input {tuple(x.shape)}"
            ) from err
    return out


def _feature_masks(feature_mask, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | None:
    """Feature masks broadcast to the inputs' shapes (Captum: first dimension 1 or examples)."""
    if feature_mask is None:
        return None
    masks = feature_mask if isinstance(feature_mask, tuple) else (feature_mask,)
    if len(masks) != len(xs):
        raise PerturbationError(f"{len(masks)} feature masks for {len(xs)} inputs")
    out = []
    for m, x in zip(masks, xs, strict=True):
        m = torch.as_tensor(m)
        if m.is_floating_point() or m.dtype == torch.bool:
            raise PerturbationError(f"feature_mask must hold integer labels, got {m.dtype}")
        try:
            out.append(torch.broadcast_to(m.cpu(), x.shape))
        except RuntimeError as err:
            raise PerturbationError(
                f"feature_mask of shape {tuple(m.shape)} does not broadcast to input "
                f"{tuple(x.shape)}"
            ) from err
    return out


def _targets(target: Target, n: int) -> list[tuple[int, ...]]:
    """Captum's target per example, as an index tuple into one example's output (``()``: the
    output itself)."""
    if isinstance(target, torch.Tensor):
        target = target.item() if target.numel() == 1 else target.tolist()
    if target is None:
        return [()] * n
    if isinstance(target, int):
        return [(target,)] * n
    if isinstance(target, tuple):
        return [tuple(int(t) for t in target)] * n
    if isinstance(target, list):
        if len(target) != n:
            raise PerturbationError(f"{len(target)} targets for {n} examples")
        return [tuple(int(x) for x in t) if isinstance(t, tuple | list) else (int(t),)
                for t in target]  # fmt: skip
    raise PerturbationError(f"target must be an int, a tuple, a list or a tensor, got {target!r}")


def _select(outputs: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """The target output of every row (rows,)."""
    if outputs.ndim - 1 != len(target) and not (outputs.ndim == 2 and outputs.shape[1] == 1):
        raise PerturbationError(
            f"the forward returns shape {tuple(outputs.shape[1:])} per example and target "
            f"{target or None} selects {len(target)} indices: give a target that picks one value"
        )
    picked = outputs[(slice(None), *target)]
    return picked.reshape(outputs.shape[0])


def _example_args(args: tuple | None, i: int, n: int) -> tuple | None:
    """Example ``i``'s additional arguments: tensors whose first dimension is the example count
    are sliced, everything else is passed as it is."""
    if args is None:
        return None
    return tuple(a[i : i + 1] if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == n
                 else a for a in args)  # fmt: skip


def _same(j: int, i: int, xs, bases, masks, args) -> bool:
    """Whether examples ``j`` and ``i`` have equal inputs, baselines, masks and arguments."""
    tensors = [*xs, *bases, *(masks or [])]
    tensors += [a for a in (args or ()) if isinstance(a, torch.Tensor) and a.ndim
                and a.shape[0] == xs[0].shape[0]]  # fmt: skip
    return all(torch.equal(t[j], t[i]) for t in tensors)


def _label_maps(
    example: list[torch.Tensor],
    masks: list[torch.Tensor] | None,
    n_segments: int | Sequence[int] | None,
) -> list[np.ndarray]:
    """The unit label maps of one example, one per granularity, over its cells: the input's own
    shape for a single input, all inputs' elements in a row for several (labels numbered across
    inputs, as Captum)."""
    if masks is not None:
        per_input = [[m.numpy()] for m in masks]
    else:
        per_input = [_segment(x[0], n_segments) for x in example]
    n_gran = max(len(g) for g in per_input)
    maps = []
    for g in range(n_gran):
        offset, parts = 0, []
        for grans in per_input:
            lab = np.unique(grans[min(g, len(grans) - 1)], return_inverse=True)[1]
            parts.append(lab.reshape(-1) + offset)
            offset += int(lab.max()) + 1
        flat = np.concatenate(parts)
        maps.append(flat.reshape(example[0].shape[1:]) if len(example) == 1 else flat)
    return distinct_label_maps(maps)


def _segment(x: torch.Tensor, n_segments: int | Sequence[int] | None) -> list[np.ndarray]:
    """SLIC superpixels of a 2-D example at each segment count (SPES's counts for its first
    axis by default); each element its own feature otherwise."""
    if x.ndim != 2:
        if n_segments is not None:
            raise PerturbationError(
                f"n_segments applies to 2-D examples (SLIC); this one has shape {tuple(x.shape)}"
            )
        return [np.arange(x.numel()).reshape(tuple(x.shape))]
    if n_segments is None:
        counts = segment_counts(x.shape[0], PerturbationOptions().granularities)
    else:
        counts = [n_segments] if isinstance(n_segments, int) else list(n_segments)
        if not counts or any(not isinstance(k, int) or k < 1 for k in counts):
            raise PerturbationError(f"n_segments must be positive integers, got {n_segments!r}")
    spec = x.detach().float().cpu().numpy()
    return [slic_segments(spec, min(k, x.numel())) for k in counts]


def _split(flat: torch.Tensor, example: list[torch.Tensor]) -> list[torch.Tensor]:
    """Values (..., cells), cells flattened, cut back into each input's per-example shape."""
    parts = torch.split(flat, [x[0].numel() for x in example], dim=-1)
    return [p.reshape(*flat.shape[:-1], *x.shape[1:]) for p, x in zip(parts, example, strict=True)]


# -- Whisper -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MelForward:
    """What Captum needs to explain Whisper's SM_X: ``forward_func`` maps speech-region cells
    (batch, mel_frames, mel_bins) to one value per output token (batch, tokens); ``inputs`` the
    utterance's cells (1, mel_frames, mel_bins); ``baselines`` the value occluded cells take
    (the padding value, as the package's SPES); ``transcript`` the teacher-forced tokens;
    ``logits`` (tokens, vocab) the clean input's, from ``forward_func``'s own forward (the KL
    reference, so the clean input scores exactly 0)."""

    forward_func: Callable[[torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    baselines: float
    transcript: object
    logits: torch.Tensor


def mel_forward(loaded, audio, *, text: str | None = None, task: str = "transcribe",
                language: str | None = None, output: str = "kl") -> MelForward:  # fmt: skip
    """Whisper as a Captum forward over its input spectrogram's speech region.

    ``output="kl"``: ``-KL(P_orig || P(x))`` per token, so SPES's score (the drop) is the
    package's KL score; ``"probability"``: the reference token's probability (the drop is the
    ``"prob_drop"`` score). The encoder reads the whole 30 s window; forwards use sdpa."""
    from .audio import load_audio, n_mel_frames
    from .model.decode import decode, features
    from .model.loading import attention_implementation

    if output not in ("kl", "probability"):
        raise PerturbationError(f"unknown output {output!r}: use 'kl' or 'probability'")
    audio = load_audio(audio)
    tr = decode(loaded, audio, text=text, task=task, language=language)
    mel = features(loaded, audio)
    n_mel = n_mel_frames(audio)
    ids = torch.tensor([tr.input_ids], device=mel.device)
    ref = torch.tensor(tr.output_ids, device=mel.device)

    @torch.no_grad()
    def logits_of(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or tuple(x.shape[1:]) != (n_mel, mel.shape[1]):
            raise PerturbationError(
                f"expected cells (batch, mel_frames, mel_bins) = (batch, {n_mel}, "
                f"{mel.shape[1]}), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        full = mel.expand(b, -1, -1).clone()
        full[:, :, :n_mel] = x.transpose(1, 2).to(full)
        with attention_implementation(loaded, "sdpa"):
            out = loaded.model(input_features=full, decoder_input_ids=ids.expand(b, -1),
                               use_cache=False)  # fmt: skip
        return out.logits.float()

    inputs = mel[0, :, :n_mel].T[None].contiguous()
    logits = logits_of(inputs)[0]
    log_p0 = torch.log_softmax(logits, dim=-1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        masked = logits_of(x)
        if output == "kl":
            log_p = torch.log_softmax(masked, dim=-1)
            return -(log_p0.exp() * (log_p0 - log_p)).sum(-1).clamp(min=0)
        p = torch.softmax(masked, dim=-1)
        return p.gather(-1, ref.expand(x.shape[0], -1).unsqueeze(-1)).squeeze(-1)

    return MelForward(forward_func=forward, inputs=inputs, baselines=float(mel.min()),
                      transcript=tr, logits=logits)  # fmt: skip

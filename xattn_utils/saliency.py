"""Saliency maps of every output token, and :func:`explain`, which bundles them with CA.

- SM_X, input saliency: shape = (tokens, mel_frames, mel_bins), over the speech region of the
  log-mel spectrogram.
- SM_H, encoder-output saliency: shape = (tokens, enc_frames), on cross-attention's time axis.

Methods (see :func:`list_methods`):

- ``"spes"``: SPES-style perturbation (:mod:`xattn_utils.perturbation`). Occluded spectrogram
  cells take the value that padding (digital silence) has in this utterance's normalised log-mel
  input, i.e. Whisper's clamp floor ``(max_log - 8 + 4) / 4``: occluding a cell makes it look like
  the padding that follows every short utterance. Occluded encoder frames take the encoder's
  output at the same position for an all-silence input, i.e. what the decoder would read there
  had that stretch been silent. The encoder runs once for SM_H; only the decoder reruns.
- ``"saliency"``, ``"input_x_gradient"``, ``"integrated_gradients"``: gradient maps
  (:mod:`xattn_utils.gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from .attention import forward_attention
from .audio import ENC_FRAME_SECONDS, MEL_FRAME_SECONDS, duration, load_audio
from .decode import Transcript, decode, features
from .estimators import fold_maps
from .forwards import encoder_score_fn, forward_batch_size, mel_score_fn
from .gradients import GRADIENT_METHODS, gradient_maps
from .models import LoadedModel, attention_implementation
from .perturbation import (
    CONTROLLED,
    MaskSampler,
    MaskStatistics,
    PerturbationOptions,
    accumulate,
    distinct_label_maps,
    frame_groups,
    run_masks,
    segment_counts,
    slic_segments,
)
from .store import ResultStore

PERTURBATION_METHODS = ("spes",)


def list_methods() -> list[str]:
    """Names accepted by ``explain(method=...)``."""
    return [*PERTURBATION_METHODS, *GRADIENT_METHODS]


@dataclass(frozen=True, eq=False)
class Explanation:
    """Cross-attention and saliency of one utterance, with their labels.

    Shapes: ``cross_attention`` (layers, heads, tokens, enc_frames); ``input_saliency``
    (tokens, mel_frames, mel_bins); ``encoder_saliency`` (tokens, enc_frames). ``*_folds`` hold
    the same maps from two disjoint halves of the masks (perturbation methods only), for
    reliability estimates.
    """

    transcript: Transcript
    cross_attention: torch.Tensor
    input_saliency: torch.Tensor
    encoder_saliency: torch.Tensor
    model: str
    method: str
    params: dict
    alignment_heads: tuple[tuple[int, int], ...]
    duration: float
    utterance: str = ""
    input_saliency_folds: torch.Tensor | None = field(default=None, repr=False)
    encoder_saliency_folds: torch.Tensor | None = field(default=None, repr=False)
    mel_frame_seconds: float = MEL_FRAME_SECONDS
    enc_frame_seconds: float = ENC_FRAME_SECONDS

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.transcript.tokens

    @property
    def special(self) -> tuple[bool, ...]:
        return self.transcript.special

    @property
    def enc_subsampling(self) -> int:
        """Mel frames per encoder frame: the ``factor`` of ``compare.pool_to_enc``."""
        return round(self.enc_frame_seconds / self.mel_frame_seconds)

    @property
    def n_masks(self) -> int | None:
        return self.params.get("n_masks")

    def to_frame(self, which: str = "encoder") -> pd.DataFrame:
        """Tidy frame of a saliency map: ``which="encoder"`` (token, enc_frame, time_s, value)
        or ``"input"`` (token, mel_frame, mel_bin, time_s, value)."""
        sm = self.encoder_saliency if which == "encoder" else self.input_saliency
        step = self.enc_frame_seconds if which == "encoder" else self.mel_frame_seconds
        axes = ["enc_frame"] if which == "encoder" else ["mel_frame", "mel_bin"]
        index = np.indices(sm.shape).reshape(sm.ndim, -1)
        frame = pd.DataFrame({name: index[i + 1] for i, name in enumerate(axes)})
        frame.insert(0, "token_index", index[0])
        frame.insert(1, "token", np.array(self.tokens, dtype=object)[index[0]])
        frame["time_s"] = index[1] * step
        frame["value"] = sm.reshape(-1).numpy()
        frame["method"] = self.method
        return frame

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and a JSON-able record, for :mod:`xattn_utils.store`."""
        tensors = {
            "cross_attention": self.cross_attention,
            "input_saliency": self.input_saliency,
            "encoder_saliency": self.encoder_saliency,
        }
        if self.input_saliency_folds is not None:
            tensors["input_saliency_folds"] = self.input_saliency_folds
        if self.encoder_saliency_folds is not None:
            tensors["encoder_saliency_folds"] = self.encoder_saliency_folds
        tr = self.transcript
        record = {
            "utterance": self.utterance,
            "model": self.model,
            "method": self.method,
            "params": self.params,
            "alignment_heads": [list(h) for h in self.alignment_heads],
            "duration": self.duration,
            "enc_frame_seconds": self.enc_frame_seconds,
            "transcript": {
                "input_ids": list(tr.input_ids),
                "output_ids": list(tr.output_ids),
                "tokens": list(tr.tokens),
                "special": list(tr.special),
                "text": tr.text,
                "task": tr.task,
                "language": tr.language,
            },
        }
        return {k: v.contiguous() for k, v in tensors.items()}, record

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], record: dict) -> Explanation:
        t = record["transcript"]
        tr = Transcript(
            input_ids=tuple(t["input_ids"]),
            output_ids=tuple(t["output_ids"]),
            tokens=tuple(t["tokens"]),
            special=tuple(t["special"]),
            text=t["text"],
            task=t["task"],
            language=t["language"],
        )
        return cls(
            transcript=tr,
            cross_attention=tensors["cross_attention"],
            input_saliency=tensors["input_saliency"],
            encoder_saliency=tensors["encoder_saliency"],
            input_saliency_folds=tensors.get("input_saliency_folds"),
            encoder_saliency_folds=tensors.get("encoder_saliency_folds"),
            model=record["model"],
            method=record["method"],
            params=record["params"],
            alignment_heads=tuple(tuple(h) for h in record["alignment_heads"]),
            duration=record["duration"],
            utterance=record.get("utterance", ""),
            enc_frame_seconds=record.get("enc_frame_seconds", ENC_FRAME_SECONDS),
        )


def explain(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    *,
    text: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
    method: str = "spes",
    n_masks: int | None = None,
    seed: int = 0,
    options: PerturbationOptions | None = None,
    n_steps: int = 32,
    utterance: str = "",
    progress: bool = True,
) -> Explanation:
    """Cross-attention, SM_X and SM_H of every output token of one utterance.

    The model's greedy transcript (or ``text``) is explained under teacher forcing. For
    ``method="spes"``, ``n_masks`` overrides ``options.n_masks``; same ``seed``, same maps.
    ``n_steps`` is the number of integration steps of ``integrated_gradients``.
    """
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}: use one of {list_methods()}")
    audio = load_audio(audio)
    tr = decode(loaded, audio, text=text, task=task, language=language)
    mel = features(loaded, audio)
    with torch.no_grad():
        ca_full, logits = forward_attention(loaded, mel, tr)
    n_mel, n_enc = loaded.family.n_mel_frames(audio), loaded.family.n_enc_frames(audio)
    params: dict = {"task": task, "language": tr.language, "seed": seed}
    folds: dict[str, torch.Tensor | None] = {"input": None, "encoder": None}
    if method in PERTURBATION_METHODS:
        options = options or PerturbationOptions()
        if n_masks is not None:
            options = replace(options, n_masks=n_masks)
        sm_x, folds["input"] = input_saliency_spes(
            loaded, mel, tr, logits, n_mel, options=options, seed=seed, progress=progress
        )
        sm_h, folds["encoder"] = encoder_saliency_spes(
            loaded, mel, tr, logits, n_enc, options=options, seed=seed, progress=progress
        )
        params |= {
            "n_masks": options.n_masks,
            "enc_mask_factor": options.enc_mask_factor,
            "p": options.p,
            "granularities": list(options.granularities),
            "enc_groups": list(options.enc_groups),
            "scorer": options.scorer,
            "design": options.design,
            "estimator": options.estimator,
            "fill": options.fill,
            "encoder_window": options.encoder_window,
        }
    else:
        sm_x, sm_h = gradient_maps(loaded, mel, tr, n_mel, n_enc, method=method, n_steps=n_steps)
        params |= {"n_steps": n_steps} if method == "integrated_gradients" else {}
    return Explanation(
        transcript=tr,
        cross_attention=ca_full[..., :n_enc].contiguous(),
        input_saliency=sm_x,
        encoder_saliency=sm_h,
        input_saliency_folds=folds["input"],
        encoder_saliency_folds=folds["encoder"],
        model=loaded.name,
        method=method,
        params=params,
        alignment_heads=loaded.alignment_heads,
        duration=duration(audio),
        utterance=utterance,
        enc_frame_seconds=loaded.family.enc_frame_seconds,
    )


def _batch_size(loaded: LoadedModel, options: PerturbationOptions, n_tokens: int) -> int:
    if options.batch_size is not None:
        return options.batch_size
    return forward_batch_size(loaded, n_tokens)


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
    ):
        """(map, fold maps) from the first ``n_masks`` masks, without forwards; ``design``
        ``"control"`` adds the control variate to the same masks and scores (see
        :func:`~xattn_utils.perturbation.control_variate`); ``estimator`` (default the run's)
        re-estimates the map from the same scores (:mod:`xattn_utils.estimators`)."""
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
    mel: torch.Tensor,
    tr: Transcript,
    logits: torch.Tensor,
    n_mel: int,
    *,
    options: PerturbationOptions,
    seed: int = 0,
    progress: bool = True,
) -> MaskRun:
    """The masked forwards of SPES SM_X over the first ``n_mel`` mel frames (i.i.d. masks
    when ``options.estimator`` models them)."""
    if options.estimator != "mean":
        options = replace(options, design="iid")
    spec = mel[0, :, :n_mel].T.float().cpu().numpy()  # (mel_frames, mel_bins)
    counts = segment_counts(n_mel, options.granularities)
    label_maps = distinct_label_maps([slic_segments(spec, k) for k in counts])
    score_fn = mel_score_fn(
        loaded, mel, tr, logits, n_mel, scorer=options.scorer, fill=options.fill,
        encoder_window=options.encoder_window, precision=options.precision,
    )  # fmt: skip
    shape = (len(tr), n_mel, spec.shape[1])
    batch_size = _batch_size(loaded, options, len(tr))
    return _spes(loaded, label_maps, score_fn, shape, options, seed, batch_size, progress, "SM_X")


@torch.no_grad()
def encoder_spes_run(
    loaded: LoadedModel,
    mel: torch.Tensor,
    tr: Transcript,
    logits: torch.Tensor,
    n_enc: int,
    *,
    options: PerturbationOptions,
    seed: int = 0,
    progress: bool = True,
) -> MaskRun:
    """The masked forwards of SPES SM_H over the first ``n_enc`` encoder frames
    (``options.n_masks * options.enc_mask_factor`` masks)."""
    label_maps = [frame_groups(n_enc, w) for w in options.enc_groups]
    options = replace(options, n_masks=options.n_masks * options.enc_mask_factor, estimator="mean")
    score_fn = encoder_score_fn(loaded, mel, tr, logits, n_enc, scorer=options.scorer)
    batch_size = 4 * _batch_size(loaded, options, len(tr))  # decoder-only forwards are light
    shape = (len(tr), n_enc)
    return _spes(
        loaded, label_maps, score_fn, shape, options, seed + 1, batch_size, progress, "SM_H"
    )


def input_saliency_spes(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """SPES SM_X (:func:`input_spes_run`'s arguments). Returns the map (tokens, mel_frames,
    mel_bins) and the two fold maps (2, tokens, mel_frames, mel_bins)."""
    return input_spes_run(*args, **kwargs).maps()


def encoder_saliency_spes(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """SPES SM_H (:func:`encoder_spes_run`'s arguments). Returns the map (tokens, enc_frames)
    and the two fold maps (2, tokens, enc_frames)."""
    return encoder_spes_run(*args, **kwargs).maps()


def _spes(
    loaded: LoadedModel,
    label_maps: list[np.ndarray],
    score_fn,
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


def explain_corpus(
    loaded: LoadedModel,
    utterances: list,
    *,
    store=None,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
    progress: bool = True,
    **kwargs,
) -> list[Explanation]:
    """:func:`explain` every utterance (``xattn_utils.data.Utterance``), reusing results found
    in ``store`` (a :class:`xattn_utils.store.ResultStore`) and saving new ones as soon as each
    finishes, so a killed run loses no finished utterance. ``language=None`` takes each
    utterance's own language; ``use_reference_text`` teacher-forces the reference transcripts
    (the reference translations for ``task="translate"``) instead of the model's own (for the
    random test model, whose outputs mean nothing).
    ``kwargs`` go to :func:`explain` (``method``, ``n_masks``, ``seed``, ``options`` ...)."""
    from tqdm.auto import tqdm

    results = []
    for utt in tqdm(utterances, desc=f"explain {loaded.name}", disable=not progress):
        key, lang, text = corpus_entry(
            loaded,
            utt,
            task=task,
            language=language,
            use_reference_text=use_reference_text,
            **kwargs,
        )
        if store is not None and store.has(key):
            results.append(Explanation.from_tensors(*store.get(key)))
            continue
        result = explain(
            loaded,
            utt.load(),
            text=text,
            task=task,
            language=lang,
            utterance=utt.id,
            progress=progress,
            **kwargs,
        )
        if store is not None:
            store.put(key, *result.to_tensors())
        results.append(result)
    return results


def corpus_entry(
    loaded: LoadedModel,
    utt,
    *,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
    **kwargs,
) -> tuple[str, str | None, str | None]:
    """``(store key, language, teacher-forced text)`` under which :func:`explain_corpus` files
    utterance ``utt`` for these arguments (``kwargs`` as for :func:`explain`)."""
    lang = (language or utt.language) if loaded.multilingual else None
    reference = utt.translation if task == "translate" else utt.text
    text = reference if use_reference_text else None
    params = {k: _jsonable(v) for k, v in kwargs.items()} | {
        "task": task,
        "language": lang,
        "text": text,
    }
    method = kwargs.get("method", "spes")
    key = ResultStore.key(model=loaded.name, utterance=utt.id, method=method, params=params)
    return key, lang, text


def _jsonable(value):
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) else value

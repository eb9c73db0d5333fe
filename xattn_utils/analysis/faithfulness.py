"""Deletion and insertion curves: does an explanation point at the input the prediction needs?

For every text token and every explanation, the speech region's **encoder frames** (each covers
2 mel frames, 20 ms of input) are ranked by the token's map, most relevant first. Explanations
are maps over encoder frames, shape = (tokens, enc_frames): CA views and SM_H as they are, SM_X
and gradient maps pooled over their mel bins and frame pairs (:func:`time_maps`).

- **Deletion**: occlude the top fraction ``f`` of those frames in the input spectrogram (all mel
  bins take the padding value, as perturbation saliency does) and record the probability of the
  token's reference under teacher forcing. A faithful map makes it fall fast: small area.
- **Insertion**: occlude everything in the speech region *except* the top fraction ``f`` (the
  exact complement of deletion's occlusion at the same ``f``). A faithful map makes the
  probability come back fast: large area.

Curves are sampled at ``fractions`` plus both ends (``f = 0`` and ``1``: the original and the
fully occluded input, i.e. digital silence, shared by every map). The area under each curve is
the trapezoid over the fractions actually used (``round(f * frames) / frames``), in units of
probability. ``"random"``, a random frame order (``n_random`` orders shared by all tokens), is
the floor every explanation should beat. :func:`faithfulness_table` reports, per map, the
deletion and insertion areas, their difference ``gain`` (how much more probability the frames
the map ranks first carry than the rest) and ``gain_vs_random`` (the same minus random's).

**Cost.** Every (map, token) pair has its own frame order, so every point of its curves is its
own full forward (the encoder always reads the whole 30 s window; nothing is shared between
inputs). One utterance costs at most ``2 * len(fractions) * (len(maps) * tokens + n_random) + 2``
forwards, batched; identical occlusions are run once. ``max_tokens`` evaluates a seeded sample of
that many text tokens per utterance (the same tokens for every map and the random floor), which
bounds the cost per utterance; the other tokens get NaN, like special tokens.

Rows are output tokens (see :mod:`xattn_utils.model.decode`); special tokens get NaN and no
forwards. The occlusion machinery (frame orders, occlusion masks, the probability functions, the
curves' options) is :mod:`xattn_utils.analysis.occlusion`; this module holds the maps to rank
by, the :class:`Curves` of a model and a corpus, and their summaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..audio import load_audio
from ..maps.forwards import forward_batch_size
from ..maps.views import ALIGNMENT, ALL, select
from ..model.decode import Transcript, features
from ..model.loading import LoadedModel, attention_implementation
from .compare import pool_to_enc
from .occlusion import (
    MODES,
    RANDOM,
    FaithfulnessError,
    FaithfulnessOptions,
    curve_probabilities,
    probability_fn,
)
from .stats import bootstrap_ci

# map labels of curves stored before the one view vocabulary (xattn_utils.maps.views)
_LEGACY = {"CA (all heads)": ALL, "CA (alignment heads)": ALIGNMENT}
MEASURES = ("deletion", "insertion", "gain", "gain_vs_random")


@dataclass(frozen=True, eq=False)
class Curves:
    """Deletion and insertion curves of one utterance.

    ``probabilities``: reference-token probability, shape = (maps, modes, tokens, steps),
    NaN for special tokens and tokens not evaluated (``max_tokens``); ``fractions``: the share
    of speech frames occluded (deletion) or revealed (insertion) at each step, shape =
    (steps,), from 0 to 1. ``params["fractions"]`` holds the requested interior fractions.
    """

    transcript: Transcript
    maps: tuple[str, ...]
    fractions: tuple[float, ...]
    probabilities: torch.Tensor
    model: str
    utterance: str = ""
    params: dict = field(default_factory=dict)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.transcript.tokens

    @property
    def evaluated(self) -> tuple[bool, ...]:
        """Per token: whether it has curves (text tokens, within the ``max_tokens`` sample)."""
        return tuple(bool(v) for v in torch.isfinite(self.probabilities[0, 0, :, 0]))

    def auc(self, mode: str = "deletion") -> np.ndarray:
        """Area under each token's curve, shape = (maps, tokens); NaN where not evaluated."""
        if mode not in MODES:
            raise FaithfulnessError(f"unknown mode {mode!r}: use one of {MODES}")
        y = self.probabilities[:, MODES.index(mode)].double().numpy()
        return np.trapezoid(y, np.asarray(self.fractions, dtype=np.float64), axis=-1)

    def auc_frame(self) -> pd.DataFrame:
        """One row per (map, evaluated token): ``deletion``, ``insertion`` areas, ``gain`` =
        insertion - deletion, ``p`` (the token's probability on the original input) and
        ``p_occluded`` (on the fully occluded input)."""
        dele, ins = self.auc("deletion"), self.auc("insertion")
        p0 = self.probabilities[0, 0, :, 0].double().numpy()
        p1 = self.probabilities[0, 0, :, -1].double().numpy()
        keep = [t for t, e in enumerate(self.evaluated) if e]
        rows = [
            {"map": m, "token_index": t, "token": self.tokens[t], "deletion": dele[i, t],
             "insertion": ins[i, t], "gain": ins[i, t] - dele[i, t], "p": p0[t],
             "p_occluded": p1[t]}
            for i, m in enumerate(self.maps)
            for t in keep
        ]  # fmt: skip
        columns = ["map", "token_index", "token", "deletion", "insertion", "gain", "p"]
        frame = pd.DataFrame(rows, columns=[*columns, "p_occluded"])
        frame.insert(0, "utterance", self.utterance)
        frame.insert(1, "model", self.model)
        frame.insert(2, "task", self.transcript.task)
        return frame

    def to_frame(self) -> pd.DataFrame:
        """Tidy curves: one row per (map, mode, evaluated token, step) with ``fraction``
        (used), ``target`` (requested: 0, ``params["fractions"]``, 1) and ``probability``."""
        p = self.probabilities.double().numpy()
        targets = [0.0, *self.params.get("fractions", self.fractions[1:-1]), 1.0]
        if len(targets) != len(self.fractions):
            targets = list(self.fractions)
        keep = [t for t, e in enumerate(self.evaluated) if e]
        rows = [
            (m, mode, t, self.tokens[t], f, target, p[i, j, t, s])
            for i, m in enumerate(self.maps)
            for j, mode in enumerate(MODES)
            for t in keep
            for s, (f, target) in enumerate(zip(self.fractions, targets, strict=True))
        ]
        columns = ["map", "mode", "token_index", "token", "fraction", "target", "probability"]
        frame = pd.DataFrame(rows, columns=columns)
        frame.insert(0, "utterance", self.utterance)
        frame.insert(1, "model", self.model)
        frame.insert(2, "task", self.transcript.task)
        return frame

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and a JSON-able record, for :mod:`xattn_utils.store`."""
        tr = self.transcript
        record = {
            "kind": "faithfulness",
            "utterance": self.utterance,
            "model": self.model,
            "maps": list(self.maps),
            "fractions": list(self.fractions),
            "params": self.params,
            "transcript": tr.to_record(),
        }
        return {"probabilities": self.probabilities.contiguous()}, record

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], record: dict) -> Curves:
        return cls(
            transcript=Transcript.from_record(record["transcript"]),
            maps=tuple(_LEGACY.get(m, m) for m in record.get("maps", record.get("methods"))),
            fractions=tuple(record["fractions"]),
            probabilities=tensors["probabilities"],
            model=record["model"],
            utterance=record["utterance"],
            params=record["params"],
        )


# -- maps to rank by ----------------------------------------------------------------------------


def time_maps(explanation, *, gradient=None) -> dict[str, torch.Tensor]:
    """The maps to rank by, each (tokens, enc_frames), from an
    :class:`~xattn_utils.maps.saliency.Explanation`: ``"CA all heads"``, ``"CA alignment heads"``
    (:mod:`xattn_utils.maps.views`), SM_X (max over its mel bins and frame pairs, as the comparison
    pools it) and SM_H; with a gradient ``Explanation`` also its SM_X (magnitude, pooled the
    same way). SM names carry the attribution method unless it is ``spes``."""
    ca = explanation.cross_attention
    maps = {ALL: select(ca, ALL).float()}
    if explanation.alignment_heads:
        heads = explanation.alignment_heads
        maps[ALIGNMENT] = select(ca, ALIGNMENT, alignment_heads=heads).float()
    suffix = "" if explanation.method == "spes" else f" {explanation.method}"
    maps[f"SM_X{suffix}"] = pool_to_enc(
        explanation.input_saliency, factor=explanation.enc_subsampling
    ).float()
    maps[f"SM_H{suffix}"] = explanation.encoder_saliency.float()
    if gradient is not None:
        maps[f"SM_X {gradient.method}"] = pool_to_enc(
            gradient.input_saliency.abs(), factor=gradient.enc_subsampling
        ).float()
    return maps


# -- the curves ---------------------------------------------------------------------------------


@torch.no_grad()
def curves(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    transcript: Transcript,
    maps: Mapping[str, torch.Tensor],
    *,
    options: FaithfulnessOptions = FaithfulnessOptions(),  # noqa: B008 (frozen)
    seed: int = 0,
    utterance: str = "",
    progress: bool = True,
) -> Curves:
    """Deletion and insertion curves of every text token of ``transcript`` (or a seeded sample
    of ``options.max_tokens`` of them) for each map in ``maps`` (name -> (tokens, enc_frames),
    e.g. :func:`time_maps`), plus ``"random"``. Forwards use sdpa attention.

    Cost: at most ``2 * len(fractions) * (len(maps) * text_tokens + n_random) + 2`` forwards.
    """
    audio = load_audio(audio)
    n_enc, n_tok = loaded.family.n_enc_frames(audio), len(transcript)
    for name, m in maps.items():
        if tuple(m.shape) != (n_tok, n_enc):
            raise FaithfulnessError(
                f"map {name!r} has shape {tuple(m.shape)}, expected (tokens, enc_frames) = "
                f"{(n_tok, n_enc)} for this transcript and audio "
                "(pool SM_X with compare.pool_to_enc first)"
            )
    mel = features(loaded, audio)
    probs = probability_fn(loaded, mel, transcript, loaded.family.n_mel_frames(audio))
    batch = options.batch_size or forward_batch_size(loaded, n_tok)
    with attention_implementation(loaded, "sdpa"):
        fractions, p, n_inputs = curve_probabilities(
            probs, maps, transcript.special, options=options, seed=seed, batch_size=batch,
            progress=progress,
        )  # fmt: skip
    return Curves(
        transcript=transcript,
        maps=(*maps, RANDOM),
        fractions=fractions,
        probabilities=p.float(),
        model=loaded.name,
        utterance=utterance,
        params=options.params() | {"seed": seed, "forwards": n_inputs},
    )


def curves_corpus(
    loaded: LoadedModel,
    explanations: Sequence,
    utterances: Sequence,
    *,
    store=None,
    gradients: Sequence | None = None,
    options: FaithfulnessOptions = FaithfulnessOptions(),  # noqa: B008 (frozen)
    seed: int = 0,
    progress: bool = True,
) -> list[Curves]:
    """:func:`curves` for each explanation (maps from :func:`time_maps`, with the matching
    gradient explanation when ``gradients`` is given), reusing and filling ``store`` (a
    :class:`~xattn_utils.store.ResultStore`) one utterance at a time."""
    from ..store import ResultStore, cached

    by_id = {u.id: u for u in utterances}
    if gradients is not None and len(gradients) != len(explanations):
        raise FaithfulnessError(
            f"{len(gradients)} gradient explanations for {len(explanations)} explanations"
        )
    out = []
    for k, e in enumerate(tqdm(explanations, desc="faithfulness", disable=not progress)):
        grad = gradients[k] if gradients is not None else None
        if grad is not None and grad.utterance != e.utterance:
            raise FaithfulnessError(f"gradient of {grad.utterance!r} given for {e.utterance!r}")
        params = {
            "kind": "faithfulness",
            "explained": dict(e.params, method=e.method, text=e.transcript.text),
            "gradient": None if grad is None else dict(grad.params, method=grad.method),
            **options.params(),
            "seed": seed,
        }
        key = ResultStore.key(model=e.model, utterance=e.utterance, method="faithfulness",
                              params=params)  # fmt: skip
        if e.utterance not in by_id:
            raise FaithfulnessError(f"no utterance {e.utterance!r} among the utterances given")

        def compute(e=e, grad=grad) -> Curves:
            return curves(
                loaded, by_id[e.utterance].load(), e.transcript, time_maps(e, gradient=grad),
                options=options, seed=seed, utterance=e.utterance, progress=progress,
            )  # fmt: skip

        out.append(cached(store, key, compute, Curves))
    return out


# -- summaries ----------------------------------------------------------------------------------


def auc_table(results: Sequence[Curves], utterances: Sequence = ()) -> pd.DataFrame:
    """Per-token areas of every result (:meth:`Curves.auc_frame`) with ``subset`` labels."""
    subsets = {u.id: getattr(u, "subset", None) for u in utterances}
    frame = pd.concat([c.auc_frame() for c in results], ignore_index=True)
    frame.insert(3, "subset", frame["utterance"].map(subsets).fillna("unknown"))
    return frame


def curves_table(results: Sequence[Curves], utterances: Sequence = ()) -> pd.DataFrame:
    """Every result's tidy curves (:meth:`Curves.to_frame`) with ``subset`` labels."""
    subsets = {u.id: getattr(u, "subset", None) for u in utterances}
    frame = pd.concat([c.to_frame() for c in results], ignore_index=True)
    frame.insert(3, "subset", frame["utterance"].map(subsets).fillna("unknown"))
    return frame


def faithfulness_table(
    aucs: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "map"),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Corpus means per group of ``deletion``, ``insertion``, ``gain`` and ``gain_vs_random``
    (gain minus the random floor's on the same utterances and tokens), with 95% bootstrap CIs
    over utterances (tokens are averaged within each utterance first).

    ``aucs`` is an :func:`auc_table`; ``by`` must include ``"map"``. Tidy: one row per
    (group, ``measure``) with ``mean``, ``low``, ``high``, ``n`` (utterances) and ``tokens``.
    """
    by = list(by)
    if "map" not in by:
        raise FaithfulnessError(f"by must include 'map', got {by}")
    grouped = aucs.groupby([*by, "utterance"], sort=False)
    per_utt = grouped[["deletion", "insertion", "gain"]].mean()
    per_utt = per_utt.join(grouped.size().rename("tokens")).reset_index()
    keys = [c for c in by if c != "map"] + ["utterance"]
    floor = per_utt.loc[per_utt["map"] == RANDOM, [*keys, "gain"]]
    per_utt = per_utt.merge(floor.rename(columns={"gain": "random_gain"}), on=keys, how="left")
    per_utt["gain_vs_random"] = per_utt["gain"] - per_utt["random_gain"]
    rows = []
    for group, g in per_utt.groupby(by, sort=False):
        labels = dict(zip(by, group, strict=True))
        tokens = int(g["tokens"].sum())
        for measure in MEASURES:
            est = bootstrap_ci(g[measure].to_numpy(), n_boot=n_boot, seed=seed)
            row = {"measure": measure, "mean": est.mean, "low": est.low, "high": est.high}
            rows.append(labels | row | {"n": est.n, "tokens": tokens})
    return pd.DataFrame(rows, columns=[*by, "measure", "mean", "low", "high", "n", "tokens"])

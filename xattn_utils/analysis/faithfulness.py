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
forwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..audio import load_audio
from ..maps.forwards import forward_batch_size, masked_mel_logits
from ..maps.views import ALIGNMENT, ALL, select
from ..model.decode import Transcript, features
from ..model.loading import LoadedModel, attention_implementation
from .compare import pool_to_enc
from .stats import bootstrap_ci

MODES = ("deletion", "insertion")
RANDOM = "random"
# map labels of curves stored before the one view vocabulary (xattn_utils.maps.views)
_LEGACY = {"CA (all heads)": ALL, "CA (alignment heads)": ALIGNMENT}
MEASURES = ("deletion", "insertion", "gain", "gain_vs_random")

# probabilities of the reference tokens, (batch, tokens), for occlusions (batch, enc_frames)
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]


class FaithfulnessError(ValueError):
    """Bad faithfulness parameters or maps."""


def _positive_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class FaithfulnessOptions:
    """Knobs of the curves.

    - ``fractions``: interior points of the curves, increasing, in (0, 1); 0 and 1 are added.
    - ``n_random``: random frame orders averaged for the floor.
    - ``max_tokens``: evaluate at most this many text tokens per utterance, a seeded sample
      (``None``: all of them).
    - ``batch_size``: inputs per forward (``None``: automatic, 4 on CPU).
    """

    fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    n_random: int = 2
    max_tokens: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        try:
            f = tuple(float(x) for x in self.fractions)
        except (TypeError, ValueError) as err:
            raise FaithfulnessError(f"fractions must be numbers, got {self.fractions!r}") from err
        if not f or any(not 0 < x < 1 for x in f) or list(f) != sorted(set(f)):
            raise FaithfulnessError(
                f"fractions must be strictly increasing and in (0, 1), got {self.fractions!r}"
            )
        object.__setattr__(self, "fractions", f)
        if not _positive_int(self.n_random):
            raise FaithfulnessError(f"n_random must be a positive integer, got {self.n_random!r}")
        if self.max_tokens is not None and not _positive_int(self.max_tokens):
            raise FaithfulnessError(
                f"max_tokens must be None or a positive integer, got {self.max_tokens!r}"
            )
        if self.batch_size is not None and not _positive_int(self.batch_size):
            raise FaithfulnessError(
                f"batch_size must be None or a positive integer, got {self.batch_size!r}"
            )

    def params(self) -> dict:
        """The options that change the curves (not ``batch_size``), JSON-able."""
        return {"fractions": list(self.fractions), "n_random": self.n_random,
                "max_tokens": self.max_tokens}  # fmt: skip


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


def rank_frames(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Frame indices by decreasing value, ties (and NaN, ranked last) in random order."""
    values = torch.nan_to_num(values.double().cpu(), nan=-math.inf)
    perm = torch.randperm(values.numel(), generator=generator)
    return perm[torch.argsort(-values[perm], stable=True)]


def occlusions(orders: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Occlusion masks of frame ``orders`` (jobs, enc_frames), most relevant first: shape =
    (jobs, modes, steps, enc_frames), True = occluded. Deletion occludes the first ``k`` frames
    of each order, insertion all but those (the exact complement)."""
    rank = torch.argsort(orders, dim=-1)  # the inverse permutation: position of each frame
    top = rank[:, None, :] < torch.as_tensor(list(ks))[None, :, None]
    return torch.stack([top, ~top], dim=1)


def step_frames(n_enc: int, fractions: Sequence[float]) -> list[int]:
    """Frames occluded (deletion) or revealed (insertion) at each interior fraction: the
    nearest whole number, at least 1 and at most ``n_enc - 1`` (repeats are run once)."""
    if n_enc < 2:
        raise FaithfulnessError(f"need at least 2 encoder frames of speech, got {n_enc}")
    return [min(n_enc - 1, max(1, round(f * n_enc))) for f in fractions]


# -- the curves ---------------------------------------------------------------------------------


def curve_probabilities(
    probs: ProbabilityFn,
    maps: Mapping[str, torch.Tensor],
    special: Sequence[bool],
    *,
    options: FaithfulnessOptions = FaithfulnessOptions(),  # noqa: B008 (frozen)
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = False,
) -> tuple[tuple[float, ...], torch.Tensor, int]:
    """The curves for any probability function (model-agnostic core of :func:`curves`).

    ``probs`` maps occlusions (batch, enc_frames), True = occluded, to the reference tokens'
    probabilities (batch, tokens). Returns the fractions used (steps,), the probabilities
    (maps, modes, tokens, steps) with maps = ``(*maps, "random")``, and the number of
    distinct inputs run.
    """
    if not maps:
        raise FaithfulnessError("no maps to rank by")
    if RANDOM in maps:
        raise FaithfulnessError(f"{RANDOM!r} is added by the curves: rename that map")
    shapes = {name: tuple(m.shape) for name, m in maps.items()}
    first = next(iter(shapes.values()))
    n_tok, n_enc = len(special), first[-1] if len(first) == 2 else None
    for name, shape in shapes.items():
        if shape != (n_tok, n_enc):
            raise FaithfulnessError(
                f"map {name!r} has shape {shape}, expected (tokens, enc_frames) = "
                f"({n_tok}, {n_enc}) like the first map (pool SM_X with compare.pool_to_enc)"
            )
    ks = step_frames(n_enc, options.fractions)
    fractions = (0.0, *(k / n_enc for k in ks), 1.0)
    gen = torch.Generator().manual_seed(seed)
    text = [t for t in range(n_tok) if not special[t]]
    if options.max_tokens is not None and len(text) > options.max_tokens:
        pick = torch.randperm(len(text), generator=gen)[: options.max_tokens]
        text = sorted(text[int(i)] for i in pick)

    # jobs: (map index, token or None = every token, frame order)
    jobs = [(i, t, rank_frames(m[t], gen)) for i, m in enumerate(maps.values()) for t in text]
    jobs += [(len(maps), None, torch.randperm(n_enc, generator=gen))
             for _ in range(options.n_random)]  # fmt: skip
    occluded = occlusions(torch.stack([o for _, _, o in jobs]), ks).reshape(-1, n_enc)
    ends = torch.stack([torch.zeros(n_enc, dtype=torch.bool), torch.ones(n_enc, dtype=torch.bool)])
    distinct, inverse = torch.unique(torch.cat([ends, occluded]), dim=0, return_inverse=True)
    batches = range(0, len(distinct), batch_size)
    bar = tqdm(batches, desc="faithfulness", disable=not progress, leave=False)
    out = torch.cat([_checked(probs, distinct[s : s + batch_size], n_tok) for s in bar])
    original, silent = out[inverse[0]], out[inverse[1]]
    per_job = out[inverse[2:]].reshape(len(jobs), len(MODES), len(ks), n_tok)

    p = torch.full((len(maps) + 1, len(MODES), n_tok, len(fractions)), math.nan,
                   dtype=torch.float64)  # fmt: skip
    for j, (i, t, _) in enumerate(jobs):
        if t is not None:
            p[i, :, t, 1:-1] = per_job[j, :, :, t]
    p[-1, :, :, 1:-1] = per_job[len(jobs) - options.n_random :].mean(0).transpose(1, 2)
    p[:, 0, :, 0], p[:, 0, :, -1] = original, silent  # deletion: original ... all occluded
    p[:, 1, :, 0], p[:, 1, :, -1] = silent, original  # insertion: all occluded ... original
    skipped = torch.ones(n_tok, dtype=torch.bool)
    skipped[text] = False
    p[:, :, skipped] = math.nan
    return fractions, p, len(distinct)


def _checked(probs: ProbabilityFn, occluded: torch.Tensor, n_tok: int) -> torch.Tensor:
    out = probs(occluded)
    if tuple(out.shape) != (len(occluded), n_tok):
        raise FaithfulnessError(
            f"probs returned {tuple(out.shape)} for {len(occluded)} inputs, expected "
            f"(inputs, tokens) = ({len(occluded)}, {n_tok})"
        )
    return out.double().cpu()


def probability_fn(loaded: LoadedModel, mel: torch.Tensor, tr: Transcript, n_mel: int):
    """Reference-token probabilities (batch, tokens) of the teacher-forced model for encoder
    frame occlusions (batch, enc_frames): an occluded frame's 2 mel frames (within the first
    ``n_mel``) take the padding value in every mel bin, as in
    :func:`~xattn_utils.maps.forwards.masked_mel_logits`."""
    masked_logits = masked_mel_logits(loaded, mel, tr, n_mel)
    ref = torch.tensor(tr.output_ids, device=mel.device)

    def probs(occluded: torch.Tensor) -> torch.Tensor:
        b = occluded.shape[0]
        per_mel = occluded.repeat_interleave(loaded.family.enc_subsampling, dim=1)[:, :n_mel]
        cells = per_mel[:, :, None].expand(-1, -1, mel.shape[1])  # (batch, mel_frames, mels)
        p = torch.softmax(masked_logits(cells).float(), dim=-1)
        return p.gather(-1, ref.expand(b, -1).unsqueeze(-1)).squeeze(-1)

    return probs


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

"""Occluding encoder frames: frame orders, occlusion masks and the probabilities they leave.

The machinery of the deletion and insertion curves of :mod:`xattn_utils.analysis.faithfulness`
(the method, its fractions, random floor and cost are described there). A map's row orders the
speech region's encoder frames (:func:`rank_frames`: ties and NaN in seeded random order);
deletion occludes the first ``k`` of them, insertion all but those (:func:`occlusions`), with
``k`` from the requested fractions (:func:`step_frames`). :func:`curve_probabilities` runs every
distinct occlusion once through a probability function (:data:`ProbabilityFn`), for any model:
:func:`probability_fn` is a teacher-forced model's, an occluded frame's mel frames taking the
padding value in every mel bin. The curves' knobs (:class:`FaithfulnessOptions`), their modes,
the random floor's name and :class:`FaithfulnessError` are defined here, where the curves start.
(:func:`frame_probability_fn` is the fractional counterpart Captum's infidelity needs, in
:mod:`xattn_utils.analysis.captum_metrics`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..maps.forwards import masked_mel_logits
from ..model.decode import Transcript
from ..model.loading import LoadedModel, attention_implementation

MODES = ("deletion", "insertion")
RANDOM = "random"

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


def frame_probability_fn(loaded: LoadedModel, mel: torch.Tensor, tr, n_mel: int):
    """Reference-token probabilities (batch, tokens) of encoder-frame weights ``x`` (batch,
    enc_frames): frame ``j``'s mel frames (the family's subsampling: Whisper 2, Speech2Text 4)
    become ``fill + x_j (mel - fill)`` (1: as is, 0: occluded with the padding value, as
    deletion). Equal rows are run once per call and remembered (infidelity repeats the same
    inputs)."""
    family = loaded.family
    fill = family.padding_value(mel)
    ids = torch.tensor([tr.input_ids], device=mel.device)
    ref = torch.tensor(tr.output_ids, device=mel.device)
    seen: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def probs(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).cpu()
        keys = [row.numpy().tobytes() for row in x]
        new = list(dict.fromkeys(k for k in keys if k not in seen))
        rows = [keys.index(k) for k in new]
        for start in range(0, len(rows), 4):
            batch = x[rows[start : start + 4]]
            weight = batch.repeat_interleave(family.enc_subsampling, dim=1)[:, :n_mel].to(mel)
            full = mel.expand(len(batch), -1, -1).clone()
            full[..., :n_mel] = fill + weight[:, None, :] * (mel[..., :n_mel] - fill)
            with attention_implementation(loaded, "sdpa"):
                logits = family.forward(loaded, full, ids.expand(len(batch), -1)).logits
            p = torch.softmax(logits.float(), dim=-1)
            p = p.gather(-1, ref.expand(len(batch), -1).unsqueeze(-1)).squeeze(-1).cpu()
            for j, k in enumerate(new[start : start + 4]):
                seen[k] = p[j].double()
        return torch.stack([seen[k] for k in keys])

    return probs

"""How many masks does a perturbation map need? Reliability and CA correlation vs mask count.

One run of ``n_masks`` masks per mask design gives every smaller count for free: each mask's
scores are kept (:class:`~xattn_utils.maps.spes.MaskRun`), so the map of the first ``n`` masks is
replayed without forwards, and the control-variate designs reuse the forwards of the plain
designs with the same masks (``"control"`` those of ``"iid"``, ``"antithetic-control"`` those of
``"antithetic"``).

At each count ``n`` a map's **reliability** is the split-half correlation of its two halves'
maps, extended to all ``n`` masks by Spearman-Brown
(:func:`~xattn_utils.analysis.stats.reliability`, pooled to the encoder grid as the comparison
pools it). The mask count that reaches a target reliability (0.9) is read off the curve where it is
reached, and extrapolated by Spearman-Brown from the largest count where it is not
(``extrapolated`` says which).

Rows of :func:`convergence` / :func:`convergence_corpus`: one per (map, design, n_masks) with
``half``, ``reliability``, ``r`` (CA, mean of all heads, vs the map; special tokens excluded)
and ``r_corrected`` (``r / sqrt(reliability)``, Spearman's correction for attenuation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..maps.corpus import request
from ..maps.perturbation import DESIGNS, PerturbationError, PerturbationOptions
from ..maps.prepare import prepare
from ..maps.spes import encoder_spes_run, input_spes_run
from ..maps.views import ALL, select
from ..model.loading import LoadedModel
from ..store import ResultStore, cached
from .compare import pool_to_enc, utterance_score
from .stats import corrected_summary, disattenuate, reliability

# the design whose forwards each design reuses
FORWARDS_OF = {"iid": "iid", "antithetic": "antithetic", "control": "iid",
               "antithetic-control": "antithetic"}  # fmt: skip
MAPS = ("SM_X", "SM_H")
TARGET = 0.9


def checkpoints(n_masks: int, n_points: int = 5) -> list[int]:
    """Mask counts ``n_masks / 2**k`` (multiples of 8, at least 8), smallest first."""
    if n_masks < 8:
        raise PerturbationError(f"convergence needs at least 8 masks, got {n_masks}")
    counts = {max(8, (n_masks >> k) // 8 * 8) for k in range(n_points)}
    return sorted(counts | {n_masks})


def convergence(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    *,
    n_masks: int = 256,
    designs: Sequence[str] = DESIGNS,
    maps: Sequence[str] = MAPS,
    text: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
    options: PerturbationOptions = PerturbationOptions(),  # noqa: B008 (frozen)
    seed: int = 0,
    utterance: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """Reliability and CA correlation of each map under each design at :func:`checkpoints` of
    its mask count (``n_masks`` for SM_X, ``n_masks * options.enc_mask_factor`` for SM_H), for
    one utterance; each distinct mask design runs those masks once."""
    bad = [d for d in designs if d not in DESIGNS]
    if bad or not designs:
        raise PerturbationError(f"unknown mask designs {bad}: use some of {DESIGNS}")
    if not maps or any(m not in MAPS for m in maps):
        raise PerturbationError(f"maps must be some of {MAPS}, got {list(maps)}")
    prepared = prepare(loaded, audio, text=text, task=task, language=language)
    ca_all = select(prepared.cross_attention, ALL)
    tr = prepared.transcript
    keep = [not s for s in tr.special]
    checkpoints(n_masks)  # fails early on too few masks
    rows = []
    for mask_design in dict.fromkeys(FORWARDS_OF[d] for d in designs):
        # the designs are compared under SPES's own estimator
        opts = replace(options, n_masks=n_masks, design=mask_design, estimator="mean")
        for name in maps:
            run_fn = input_spes_run if name == "SM_X" else encoder_spes_run
            run = run_fn(loaded, prepared, options=opts, seed=seed, progress=progress)
            factor = loaded.family.enc_subsampling  # SM_X pools onto enc_frames by this
            for design in (d for d in designs if FORWARDS_OF[d] == mask_design):
                for n in checkpoints(run.sampler.n_masks):
                    sm, folds = run.maps(n, design)
                    rel = reliability(folds, special=tr.special, factor=factor)
                    pooled = pool_to_enc(sm, factor=factor) if sm.ndim == 3 else sm
                    r = utterance_score(ca_all, pooled, keep=keep).mean
                    rows.append({"map": name, "design": design, "n_masks": n,
                                 "half": rel.half, "reliability": rel.full, "r": r,
                                 "r_corrected": float(disattenuate(r, rel.full))})  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.insert(0, "utterance", utterance)
    frame.insert(1, "model", loaded.name)
    frame.insert(2, "task", task)
    return frame


@dataclass(frozen=True)
class _Rows:
    """A convergence frame as the store keeps it (in the record, no tensors)."""

    frame: pd.DataFrame

    def to_tensors(self) -> tuple[dict, dict]:
        return {}, {"kind": "convergence", "rows": self.frame.to_dict("records")}

    @classmethod
    def from_tensors(cls, tensors: dict, record: dict) -> _Rows:
        # rows stored before the one vocabulary name the map "map_name"
        return cls(pd.DataFrame(record["rows"]).rename(columns={"map_name": "map"}))


def convergence_corpus(
    loaded: LoadedModel,
    utterances: Sequence,
    *,
    store: ResultStore | None = None,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
    n_masks: int = 256,
    designs: Sequence[str] = DESIGNS,
    maps: Sequence[str] = MAPS,
    options: PerturbationOptions = PerturbationOptions(),  # noqa: B008 (frozen)
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`convergence` of each utterance (language and text as
    :func:`~xattn_utils.maps.corpus.request` picks them), one store entry per utterance so that an
    interrupted run keeps what it finished. Adds ``subset``."""
    settings = {"n_masks": n_masks, "designs": list(designs), "maps": list(maps), "seed": seed}
    frames = []
    for utt in utterances:
        lang, text = request(loaded, utt, task=task, language=language,
                             use_reference_text=use_reference_text)  # fmt: skip
        params = settings | options.params() | {"task": task, "language": lang, "text": text}
        key = ResultStore.key(model=loaded.name, utterance=utt.id, method="convergence",
                              params=params)  # fmt: skip

        def compute(utt=utt, lang=lang, text=text) -> _Rows:
            return _Rows(convergence(
                loaded, utt.load(), n_masks=n_masks, designs=designs, maps=maps, text=text,
                task=task, language=lang, options=options, seed=seed, utterance=utt.id,
                progress=progress,
            ))  # fmt: skip

        frames.append(cached(store, key, compute, _Rows).frame.assign(subset=utt.subset))
    return pd.concat(frames, ignore_index=True)


def masks_needed(
    reliabilities: Sequence[float], counts: Sequence[int], target: float = TARGET
) -> tuple[float, bool]:
    """(mask count reaching ``target`` reliability, extrapolated?). Where the curve ends at or
    above the target: interpolated linearly in log count across its last upward crossing.
    Otherwise (or where it starts above): Spearman-Brown from the nearest end of the curve,
    ``n * t (1 - r) / (r (1 - t))``. NaN for a target or reliability <= 0."""
    rel, n = np.asarray(reliabilities, float), np.asarray(counts, float)
    if not 0 < target < 1 or not np.isfinite(rel[-1]):
        return math.nan, True

    def spearman_brown_count(i: int) -> float:
        r = rel[i]
        return float(n[i] * target * (1 - r) / (r * (1 - target))) if r > 0 else math.nan

    if rel[-1] < target:
        return spearman_brown_count(-1), True
    below = np.flatnonzero(~(rel[:-1] >= target))  # NaN counts as below
    if below.size == 0:
        return spearman_brown_count(0), True
    i = below[-1]
    if not np.isfinite(rel[i]):
        return float(n[i + 1]), False
    frac = (target - rel[i]) / (rel[i + 1] - rel[i])
    return float(np.exp(np.log(n[i]) + frac * np.log(n[i + 1] / n[i]))), False


def summary_table(
    table: pd.DataFrame, *, target: float = TARGET, by: Sequence[str] = ("model", "task")
) -> pd.DataFrame:
    """Per (``by``, map, design): mean reliability and r at the largest count, the masks
    needed for ``target`` reliability (from the utterance-mean curve), and the forwards each
    design needs to match i.i.d. masks' reliability at the largest count, with the ratio
    ``iid forwards / design forwards`` (above 1: the design converges faster)."""
    rows = []
    keys = [*by, "map"]
    for key, g in table.groupby(keys, sort=False):
        curves = g.groupby(["design", "n_masks"])[["reliability", "r", "r_corrected"]].mean()
        n_max = int(g["n_masks"].max())
        base = curves.loc[("iid", n_max), "reliability"] if ("iid", n_max) in curves.index else None
        for design in g["design"].unique():
            c = curves.loc[design].sort_index()
            needed, extrapolated = masks_needed(c["reliability"], c.index, target)
            row = dict(zip(keys, key, strict=True)) | {"design": design, "n_masks": n_max}
            row |= {k: c.loc[n_max, k] for k in ("reliability", "r", "r_corrected")}
            row |= {f"masks_for_{target:g}": needed, "extrapolated": extrapolated}
            if base is not None:
                match, _ = masks_needed(c["reliability"], c.index, base)
                row |= {"forwards_to_match_iid": match, "speedup_vs_iid": n_max / match}
            rows.append(row)
    return pd.DataFrame(rows)


def corrected_table(
    table: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "map", "design"),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """At the largest mask count: observed r and r corrected for attenuation
    (:func:`~xattn_utils.analysis.stats.disattenuated_ci`), each with a 95% bootstrap CI over
    utterances, and the mean reliability."""
    top = table[table["n_masks"] == table.groupby(list(by))["n_masks"].transform("max")]
    return corrected_summary(top, by, n_boot=n_boot, seed=seed)

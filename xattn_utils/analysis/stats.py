"""Statistics of the comparisons: bootstrap CIs, corpus tables, reliability and attenuation.

:func:`bootstrap_ci` and :func:`corpus_table` give percentile bootstrap CIs of the mean per-token
r of :mod:`~xattn_utils.analysis.compare`, resampling utterances. A perturbation map is noisy:
:func:`reliability` measures it split-half (Spearman-Brown extrapolated to all the masks),
:func:`reference_reliability` against held-out high-mask references, and :func:`disattenuate`
corrects a CA correlation for it (Spearman's correction for attenuation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..audio import ENC_SUBSAMPLING
from .compare import (
    Array,
    Correlation,
    Pooling,
    _numpy64,
    _tensor,
    pool_to_enc,
    utterance_score,
)

# agreement of SM_X estimators with held-out high-mask references (benchmarks/estimators.py)
REFERENCE_ROOT = Path(__file__).resolve().parents[2] / "data" / "reference"


# -- corpus level -------------------------------------------------------------------------------


_DEFAULT_BY = ("against", "kind", "map", "layer", "head")


@dataclass(frozen=True)
class Estimate:
    """Mean over ``n`` finite values with a percentile bootstrap CI; ``n_nan`` were left out."""

    mean: float
    low: float
    high: float
    n: int
    n_nan: int
    level: float = 0.95

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


def bootstrap_ci(
    values: Sequence[float] | Array, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Percentile bootstrap CI of the mean, resampling the finite ``values`` (utterances)."""
    v = _numpy64(values).ravel()
    finite = v[np.isfinite(v)]
    n, n_nan = finite.size, v.size - finite.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, n_nan, level)
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, n, size=(n_boot, n))].mean(1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(float(finite.mean()), float(low), float(high), n, n_nan, level)


def corpus_table(
    df: pd.DataFrame,
    *,
    by: Sequence[str] = _DEFAULT_BY,
    value: str = "r",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean, bootstrap CI, ``n`` and ``n_nan`` of ``value`` per group, resampling utterances.

    ``by`` defaults to those of ``against, kind, map, layer, head`` that ``df`` has. With a
    fully filled ``utterance`` column, rows are first averaged per utterance within a group
    (skipping NaN), so ``by=["kind"]`` resamples utterances, not heads; otherwise each row is
    one utterance. ``n_tokens`` and ``n_nan_tokens`` sum the rows' token counts when present.
    """
    by = [c for c in by if c in df.columns] if tuple(by) == _DEFAULT_BY else list(by)
    units = "utterance" in df.columns and df["utterance"].notna().all()
    rows = []
    for group, g in df.groupby(by, sort=False, dropna=False):
        vals = g.groupby("utterance", sort=False)[value].mean() if units else g[value]
        row = dict(zip(by, group, strict=True))
        row.update(asdict(bootstrap_ci(vals.to_numpy(), n_boot=n_boot, level=level, seed=seed)))
        if "n_tokens" in g:
            row["n_tokens"] = int(g["n_tokens"].sum())
        if "n_nan" in g:
            row["n_nan_tokens"] = int(g["n_nan"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


# -- reliability of Monte Carlo maps ------------------------------------------------------------


@dataclass(frozen=True)
class Reliability:
    """Split-half reliability of a perturbation map.

    ``half``: mean per-token correlation between the maps of two disjoint halves of the masks
    (after the same pooling the comparison uses); ``full``: its Spearman-Brown extrapolation to
    all the masks, ``2 r / (1 + r)``.
    """

    half: float
    full: float
    n_tokens: int
    n_nan: int

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Reliability of a map from ``factor`` times as many masks: ``k r / (1 + (k - 1) r)``."""
    return factor * r / (1 + (factor - 1) * r) if np.isfinite(r) and r > -1 / factor else math.nan


def reliability(
    folds: Array,
    *,
    special: Sequence[bool] | None = None,
    include_special: bool = False,
    pooling: Pooling = "max",
    correlation: Correlation = "pearson",
    factor: int = ENC_SUBSAMPLING,
) -> Reliability:
    """Split-half reliability of a map from its two fold maps, shape = (2, tokens, ...): SM_H
    folds (2, tokens, enc_frames) or SM_X folds (2, tokens, mel_frames, mel_bins), pooled by
    ``factor`` (the family's subsampling: Whisper 2, Speech2Text 4)."""
    f = _tensor(folds)
    if f.shape[0] != 2:
        raise ValueError(f"expected 2 folds, got shape {tuple(f.shape)}")
    a, b = (pool_to_enc(x, how=pooling, factor=factor) if x.ndim == 3 else x for x in f)
    keep = None if special is None or include_special else [not s for s in special]
    score = utterance_score(a, b, correlation=correlation, keep=keep)
    return Reliability(
        half=score.mean,
        full=spearman_brown(score.mean),
        n_tokens=score.n_tokens,
        n_nan=score.n_nan,
    )


def disattenuate(r: float | np.ndarray, reliability_full: float) -> float | np.ndarray:
    """Spearman's correction for attenuation of a correlation with a noisy map: ``r /
    sqrt(reliability)`` (CA is deterministic, so only the map's reliability enters). NaN when the
    reliability is not positive: the map holds no measurable signal."""
    if not np.isfinite(reliability_full) or reliability_full <= 0:
        return np.full_like(np.asarray(r, dtype=float), np.nan)
    return np.asarray(r, dtype=float) / math.sqrt(min(reliability_full, 1.0))


def disattenuated_ci(
    r: Sequence[float] | Array,
    reliability_full: Sequence[float] | Array,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean r over utterances corrected by their mean reliability (:func:`disattenuate`), with a
    percentile bootstrap CI that resamples utterances, r and reliability together. Utterances
    where either is NaN are left out; NaN where the mean reliability is not positive."""
    a, b = _numpy64(r).ravel(), _numpy64(reliability_full).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b, n, n_nan = a[ok], b[ok], int(ok.sum()), int((~ok).sum())
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, n_nan, level)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rel = b[idx].mean(1)
    boot = np.where(rel > 0, a[idx].mean(1) / np.sqrt(np.clip(rel, 1e-12, 1.0)), np.nan)
    alpha = (1.0 - level) / 2
    low, high = (np.quantile(boot[np.isfinite(boot)], [alpha, 1.0 - alpha])
                 if np.isfinite(boot).any() else (math.nan, math.nan))  # fmt: skip
    mean = float(disattenuate(a.mean(), float(b.mean())))
    return Estimate(mean, float(low), float(high), n, n_nan, level)


def corrected_summary(
    per_utterance: pd.DataFrame, by: Sequence[str], *, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per ``by`` group of a per-utterance frame with ``r`` and ``reliability``: the mean r and
    r corrected for attenuation (:func:`disattenuated_ci`), each with a 95% bootstrap CI over
    utterances (``r_low``, ``r_high``, ``r_corrected_low``, ``r_corrected_high``), the mean
    reliability and ``n``. Rows without r are left out."""
    rows = []
    for key, g in per_utterance.dropna(subset=["r"]).groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        obs = bootstrap_ci(g["r"], n_boot=n_boot, seed=seed)
        cor = disattenuated_ci(g["r"], g["reliability"], n_boot=n_boot, seed=seed)
        rows.append(dict(zip(by, key, strict=True)) | {
            "r": obs.mean, "r_low": obs.low, "r_high": obs.high,
            "reliability": float(g["reliability"].mean()), "r_corrected": cor.mean,
            "r_corrected_low": cor.low, "r_corrected_high": cor.high, "n": obs.n,
        })  # fmt: skip
    return pd.DataFrame(rows)


def reference_reliability(model: str, estimator: str, n_masks: int) -> float | None:
    """The reliability of ``estimator``'s pooled SM_X map from ``n_masks`` masks as measured
    against held-out high-mask references (``data/reference/<model>/agreement.json``, written
    by ``benchmarks/estimators.py``): the squared reliability-corrected correlation with the
    reference, interpolated in log mask count. ``None`` where the model has no references or
    the count lies outside the measured range. For a regularised estimator this, not the
    split-half figure, is its reliability (shrinkage makes halves agree)."""
    path = REFERENCE_ROOT / model / "agreement.json"
    if not path.exists():
        return None
    table = json.loads(path.read_text()).get("agreement", {}).get(estimator)
    if not table:
        return None
    counts = sorted(int(n) for n in table)
    if not counts[0] <= n_masks <= counts[-1]:
        return None
    r = np.interp(np.log(n_masks), np.log(counts), [table[str(n)]["r_corrected"] for n in counts])
    return float(np.clip(r, 0.0, 1.0) ** 2)


def map_reliability(explanation, map_name: str) -> tuple[float, str]:
    """(reliability of all masks, its source) of an explanation's ``"SM_X"`` or ``"SM_H"``: the
    split-half figure (:func:`reliability`), except for an SM_X map from a regularised
    estimator (``params["estimator"]`` other than ``"mean"``), whose reliability is its
    measured agreement with held-out references (:func:`reference_reliability`; NaN where none
    was measured), since shrinkage makes halves agree. NaN without folds (gradients)."""
    e = explanation
    folds = e.input_saliency_folds if map_name == "SM_X" else e.encoder_saliency_folds
    if folds is None:
        return math.nan, "none"
    estimator = e.params.get("estimator", "mean")
    if map_name == "SM_X" and estimator != "mean":
        ref = reference_reliability(e.model, estimator, int(e.params["n_masks"]))
        return (math.nan if ref is None else ref), "held-out reference"
    return reliability(folds, special=e.special, factor=e.enc_subsampling).full, "split-half"

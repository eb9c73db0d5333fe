"""The study's findings, tested on Whisper: one row per finding, with the number that tests it,
its 95% CI and a verdict computed from the CI.

Each finding is a small function ``evidence -> list of rows`` (:class:`Evidence` holds the
per-utterance tables). :data:`FINDINGS` lists them in the order the index shows them, and
:func:`findings_table` runs them. **To add a finding**, write one more such function (use
:func:`finding_row` to build its rows, so its verdict follows the rule below), put any input
it needs that the correlation and reliability tables lack into ``Evidence.extras`` under a
name of your own, and append the function to :data:`FINDINGS` (or pass
``findings=(*FINDINGS, mine)`` to :func:`findings_table`). A finding whose input is absent
returns no rows.

**The verdict rule.** Every finding is a claim about one number: above a threshold, below it,
or inside a band. With the number's 95% CI [low, high]:

- ``holds``: the whole CI is on the claimed side (inside the band);
- ``does not hold``: the whole CI is on the other side (outside the band);
- ``not measurable at this budget``: the CI straddles a threshold, or there is no CI (fewer than
  :data:`MIN_UTTERANCES` utterances, or a saliency map too noisy to correct for its reliability).
  More utterances or masks narrow the CI.

Correlations with a saliency map are corrected for its split-half reliability where a level
is claimed (r / sqrt(reliability), :func:`~xattn_utils.analysis.stats.disattenuated_ci`): the
study's maps used 20,000 masks, ours a few hundred. Differences between two views of CA against the
same map are tested observed: the correction scales both by the same factor, so it cannot
change their sign. The SM_H - SM_X gap is corrected on both sides, since the two maps differ
in reliability.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..maps.views import ALIGNMENT, ALL, View, is_ca, parse
from .stats import Estimate, bootstrap_ci, disattenuated_ci
from .tables import HEADLINE_AGGREGATES, correlation_table, headline, reliability_table

HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable at this budget"
MIN_UTTERANCES = 3  # fewer: no verdict
MODERATE = 0.4  # "moderate to strong": r above this (a conventional lower bound for moderate)
HALF = (0.35, 0.65)  # "about half": r within 0.5 +- 0.15

# The study's published numbers (study.md), on its own models and data (Europarl-ST): best CA
# vs SM_X per model, and how much higher CA vs SM_H was (0.03 to 0.18); best case across its
# conditions 0.52 to 0.75.
STUDY_MODELS = (("125M English ASR", 0.588), ("FAMA-small 474M", 0.633),
                ("FAMA-medium 878M", 0.621))  # fmt: skip
STUDY_SM_H_GAIN = (0.03, 0.18)
STUDY_BEST_RANGE = (0.52, 0.75)


@dataclass(frozen=True)
class Evidence:
    """What the findings are computed from: ``correlations`` (a
    :func:`~xattn_utils.analysis.tables.correlation_table`), ``reliability`` (a
    :func:`~xattn_utils.analysis.tables.reliability_table`, may be empty) and ``extras``, named
    inputs of further findings. ``n_boot`` and ``seed`` drive every bootstrap."""

    correlations: pd.DataFrame
    reliability: pd.DataFrame
    extras: Mapping[str, Any] = field(default_factory=dict)
    n_boot: int = 2000
    seed: int = 0

    @classmethod
    def from_explanations(cls, explanations: Sequence, utterances: Sequence = (), **kw) -> Evidence:
        """Evidence from :class:`~xattn_utils.maps.explanation.Explanation` s (``kw``: the
        fields)."""
        return cls(
            correlation_table(explanations, utterances),
            reliability_table(explanations, utterances),
            **kw,
        )

    def groups(self) -> list[tuple[str, str]]:
        """The (model, task) pairs present, in table order."""
        pairs = self.correlations[["model", "task"]].drop_duplicates()
        return list(pairs.itertuples(index=False, name=None))


def verdict(
    low: float, high: float, *, above: float | None = None, below: float | None = None
) -> str:
    """The verdict on a claim from a CI (module docstring): ``above=t`` claims the number is
    above t, ``below=t`` below t, both a band ``[above, below]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNMEASURABLE
    lo = -math.inf if above is None else above
    hi = math.inf if below is None else below
    if lo < low and high < hi:
        return HOLDS
    if high < lo or low > hi:
        return FAILS
    return UNMEASURABLE


def claim_text(*, above: float | None = None, below: float | None = None) -> str:
    """``"> 0.4"``, ``"< 0.4"`` or ``"in [0.35, 0.65]"``."""
    if above is not None and below is not None:
        return f"in [{above:g}, {below:g}]"
    return f"> {above:g}" if above is not None else f"< {below:g}"


def finding_row(
    finding: str,
    group: tuple[str, str],
    measure: str,
    estimate: Estimate,
    *,
    above: float | None = None,
    below: float | None = None,
) -> dict:
    """One row of the findings table; ``estimate`` is a
    :class:`~xattn_utils.analysis.stats.Estimate` (mean, low, high, n). The verdict follows from
    its CI by :func:`verdict`."""
    ok = estimate.n >= MIN_UTTERANCES and math.isfinite(estimate.mean)  # NaN mean: no verdict
    low, high = (estimate.low, estimate.high) if ok else (np.nan, np.nan)
    return {
        "finding": finding,
        "model": group[0],
        "task": group[1],
        "measure": measure,
        "claim": claim_text(above=above, below=below),
        "estimate": estimate.mean,
        "low": estimate.low,
        "high": estimate.high,
        "n": estimate.n,
        "verdict": verdict(low, high, above=above, below=below),
    }


# -- per-utterance numbers ----------------------------------------------------------------------


def _per_utterance(ev: Evidence, group: tuple[str, str], comparison: str, kinds) -> pd.DataFrame:
    """Utterance x map table of r for one (model, task) and comparison, CA views of ``kinds``."""
    t = ev.correlations
    rows = t[(t["model"] == group[0]) & (t["task"] == group[1])]
    rows = rows[(rows["comparison"] == comparison) & rows["kind"].isin(kinds)]
    return rows.pivot_table(index="utterance", columns="map", values="r", aggfunc="mean")


def _reliability(ev: Evidence, group: tuple[str, str], map_name: str) -> pd.Series:
    rel = ev.reliability
    if rel.empty:
        return pd.Series(dtype=float)
    rel = rel[(rel["model"] == group[0]) & (rel["task"] == group[1])]
    return rel[rel["map"] == map_name].groupby("utterance")["full"].mean()


def _corrected(ev: Evidence, group, map_name: str, r: pd.Series) -> Estimate:
    rel = _reliability(ev, group, map_name).reindex(r.index)
    return disattenuated_ci(r, rel, n_boot=ev.n_boot, seed=ev.seed)


def _views_of(wide: pd.DataFrame, kind: str) -> list[View]:
    found = [parse(v) for v in wide.columns if is_ca(v) and v not in (ALL, ALIGNMENT)]
    return [v for v in found if v.kind == kind]


def _head_views(wide: pd.DataFrame) -> list[str]:
    return [v.label for v in _views_of(wide, "head")]


def _layer_views(wide: pd.DataFrame) -> list[str]:
    return [v.label for v in sorted(_views_of(wide, "layer"), key=lambda v: v.layer)]


# -- the findings -------------------------------------------------------------------------------


def single_heads_weak(ev: Evidence) -> list[dict]:
    """Single heads correlate weakly: the mean over single heads of r (corrected) < 0.4."""
    rows = []
    for group in ev.groups():
        for map_name in ("SM_X", "SM_H"):
            wide = _per_utterance(ev, group, f"CA vs {map_name}", ["head"])
            if wide.empty:
                continue
            est = _corrected(ev, group, map_name, wide.mean(axis=1))
            rows.append(finding_row(
                "single heads correlate weakly and noisily", group,
                f"mean single-head r vs {map_name}, corrected", est, below=MODERATE,
            ))  # fmt: skip
    return rows


def aggregation_helps(ev: Evidence) -> list[dict]:
    """Averaging over heads and layers helps: r(all heads) - mean single-head r > 0."""
    rows = []
    for group in ev.groups():
        for map_name in ("SM_X", "SM_H"):
            wide = _per_utterance(ev, group, f"CA vs {map_name}", ["head", "all"])
            if wide.empty or ALL not in wide:
                continue
            gain = wide[ALL] - wide[_head_views(wide)].mean(axis=1)
            est = bootstrap_ci(gain.to_numpy(), n_boot=ev.n_boot, seed=ev.seed)
            rows.append(finding_row(
                "aggregation over heads and layers helps", group,
                f"r(all heads) - mean single-head r, vs {map_name}", est, above=0.0,
            ))  # fmt: skip
    return rows


def later_layers_best(ev: Evidence) -> list[dict]:
    """The last decoder layers correlate best: mean r of the later half of the layers minus
    the earlier half (each layer: the mean of its heads) > 0."""
    rows = []
    for group in ev.groups():
        for map_name in ("SM_X", "SM_H"):
            wide = _per_utterance(ev, group, f"CA vs {map_name}", ["layer"])
            layers = _layer_views(wide)
            if len(layers) < 2:
                continue
            half = len(layers) // 2
            diff = wide[layers[half:]].mean(axis=1) - wide[layers[:half]].mean(axis=1)
            est = bootstrap_ci(diff.to_numpy(), n_boot=ev.n_boot, seed=ev.seed)
            rows.append(finding_row(
                "later layers correlate best", group,
                f"r(layers {half}-{len(layers) - 1}) - r(layers 0-{half - 1}), vs {map_name}",
                est, above=0.0,
            ))  # fmt: skip
    return rows


def _all_heads_sm_x(ev: Evidence, group):
    wide = _per_utterance(ev, group, "CA vs SM_X", ["all"])
    return None if wide.empty else _corrected(ev, group, "SM_X", wide[ALL])


def ca_vs_sm_x_moderate(ev: Evidence) -> list[dict]:
    """CA agrees moderately to strongly with SM_X: r(all heads, SM_X), corrected, > 0.4."""
    rows = []
    for group in ev.groups():
        if (est := _all_heads_sm_x(ev, group)) is not None:
            rows.append(finding_row(
                "CA vs SM_X is moderate to strong", group,
                "r(all heads, SM_X), corrected", est, above=MODERATE,
            ))  # fmt: skip
    return rows


def sm_h_closer(ev: Evidence) -> list[dict]:
    """CA is closer to SM_H than to SM_X: r(all heads, SM_H) - r(all heads, SM_X), each
    corrected for its map's reliability, > 0 (utterances resampled jointly)."""
    rows = []
    for group in ev.groups():
        r = {m: _per_utterance(ev, group, f"CA vs {m}", ["all"]) for m in ("SM_X", "SM_H")}
        if any(w.empty for w in r.values()):
            continue
        both = pd.DataFrame({f"r_{m}": w[ALL] for m, w in r.items()})
        for m in r:
            both[f"rel_{m}"] = _reliability(ev, group, m)
        est = corrected_gap(both, n_boot=ev.n_boot, seed=ev.seed)
        rows.append(finding_row(
            "SM_H is closer to CA than SM_X", group,
            "r(all heads, SM_H) - r(all heads, SM_X), both corrected", est, above=0.0,
        ))  # fmt: skip
    return rows


def covers_half(ev: Evidence) -> list[dict]:
    """CA covers about half of the relevance (the study reads its r as a share): r(all heads,
    SM_X), corrected, within 0.5 +- 0.15."""
    rows = []
    for group in ev.groups():
        if (est := _all_heads_sm_x(ev, group)) is not None:
            rows.append(finding_row(
                "CA covers about half of the relevance", group,
                "r(all heads, SM_X), corrected, read as a share", est,
                above=HALF[0], below=HALF[1],
            ))  # fmt: skip
    return rows


def corrected_gap(per_utterance: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of ``r_SM_H`` / sqrt(mean ``rel_SM_H``) minus the same for SM_X, with a percentile
    bootstrap CI resampling utterances (rows) jointly. NaN where a mean reliability is not
    positive or there is no reliability (gradient maps)."""
    cols = ["r_SM_H", "rel_SM_H", "r_SM_X", "rel_SM_X"]
    v = per_utterance.reindex(columns=cols).to_numpy(float)
    v = v[np.isfinite(v).all(axis=1)]
    n, n_nan = len(v), len(per_utterance) - len(v)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, n_nan)

    def gap(m: np.ndarray) -> np.ndarray:  # m: (..., 4) means
        ok = (m[..., 1] > 0) & (m[..., 3] > 0)
        root = np.sqrt(np.clip(m[..., [1, 3]], 1e-12, 1.0))
        return np.where(ok, m[..., 0] / root[..., 0] - m[..., 2] / root[..., 1], np.nan)

    boot = gap(v[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(1))
    finite = boot[np.isfinite(boot)]
    low, high = np.quantile(finite, [0.025, 0.975]) if finite.size else (math.nan, math.nan)
    return Estimate(float(gap(v.mean(0))), float(low), float(high), n, n_nan)


def mixing_explains_gap(ev: Evidence) -> list[dict]:
    """The study's explanation of the SM_H - SM_X gap, context mixing in the encoder: the share
    of the gap that CA propagated through the encoder's value-zeroing rollout closes
    (notebook 07's table, ``extras["context_mixing"]``: rows per model, subset and map with
    the share as ``mean, low, high`` and ``n``). Claim: it closes more than half."""
    table = ev.extras.get("context_mixing")
    if table is None or len(table) == 0:
        return []
    rows = []
    picked = table[(table["subset"] == "all") & (table["map"] == "CA -> input")]
    for r in picked.itertuples(index=False):
        est = Estimate(float(r.mean), float(r.low), float(r.high), int(r.n), 0)
        rows.append(finding_row(
            "the encoder's context mixing accounts for the SM_H - SM_X gap",
            (r.model, "transcribe"), "share of the gap closed by CA -> input", est, above=0.5,
        ))  # fmt: skip
    return rows


# The findings the index shows, in order.
FINDINGS: tuple[Callable[[Evidence], list[dict]], ...] = (
    single_heads_weak,
    aggregation_helps,
    later_layers_best,
    ca_vs_sm_x_moderate,
    sm_h_closer,
    covers_half,
    mixing_explains_gap,
)
COLUMNS = ["finding", "model", "task", "measure", "claim", "estimate", "low", "high", "n",
           "verdict"]  # fmt: skip


def findings_table(
    evidence: Evidence, findings: Sequence[Callable[[Evidence], list[dict]]] = FINDINGS
) -> pd.DataFrame:
    """One row per finding (and model, task, map): :data:`COLUMNS`."""
    rows = [row for finding in findings for row in finding(evidence)]
    return pd.DataFrame(rows, columns=COLUMNS)


def headline_views(evidence: Evidence) -> pd.DataFrame:
    """The headline figure's numbers: per model, task and comparison (CA vs SM_X, CA vs SM_H),
    each CA view of :data:`~xattn_utils.analysis.tables.HEADLINE_AGGREGATES` (the best head, the
    best layer, all heads, the alignment heads) with r observed and corrected, each with its 95% CI.
    Column ``map`` holds the view's label."""
    return headline(evidence.correlations, evidence.reliability, by=("model", "task"),
                    aggregates=HEADLINE_AGGREGATES, n_boot=evidence.n_boot,
                    seed=evidence.seed)  # fmt: skip


def study_values() -> pd.DataFrame:
    """The study's published values, for drawing beside ours: per study model, best CA vs SM_X
    (``mean``) and CA vs SM_H as the range the study reports (``low``, ``high``: SM_X + 0.03
    to + 0.18)."""
    rows = []
    for model, r in STUDY_MODELS:
        rows.append({"model": model, "comparison": "CA vs SM_X", "mean": r, "low": r, "high": r})
        lo, hi = r + STUDY_SM_H_GAIN[0], r + STUDY_SM_H_GAIN[1]
        rows.append({"model": model, "comparison": "CA vs SM_H", "mean": (lo + hi) / 2,
                     "low": lo, "high": hi})  # fmt: skip
    return pd.DataFrame(rows)

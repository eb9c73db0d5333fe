"""The study's analysis tables from a list of explanations: per-utterance correlations of every
CA view with SM_X and SM_H, their bootstrap summaries (headline, aggregation gain, the SM_H -
SM_X gap) and the maps' reliability with correlations corrected for it.

Headline numbers (special tokens excluded, 95% percentile bootstrap CIs over utterances): the
mean CA-vs-SM_X and CA-vs-SM_H correlation of the best single head, the best layer (mean of
its heads) and the mean of all heads. "Best" is picked on the same utterances it is reported
on, so those two rows are optimistic; the all-head mean and the alignment heads are not
selected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..maps.views import View
from .compare import compare_maps, cumulative_layers, pool_to_enc, utterance_score
from .stats import (
    bootstrap_ci,
    corpus_table,
    corrected_summary,
    disattenuated_ci,
    map_reliability,
    reliability,
)

COMPARISONS = ("CA vs SM_X", "CA vs SM_H", "SM_X vs SM_H")
GAP = "gap (SM_H - SM_X)"
AGGREGATES = (("best head", "head"), ("best layer", "layer"), ("all heads", "all"))
# the four CA views of the index's headline figure: AGGREGATES and Whisper's alignment heads
HEADLINE_AGGREGATES = (*AGGREGATES, ("alignment heads", "alignment"))
ALL = View.all().label


def _labels(explanation, utterances: Sequence) -> dict:
    utt = {u.id: u for u in utterances}.get(explanation.utterance)
    return {
        "model": explanation.model,
        "task": explanation.params.get("task", "transcribe"),
        "language": explanation.transcript.language,
        "subset": getattr(utt, "subset", None) or "unknown",
    }


def correlation_table(explanations: Sequence, utterances: Sequence = ()) -> pd.DataFrame:
    """Per-utterance correlations of every CA view with SM_X and SM_H, and of SM_X with SM_H.

    Rows are :func:`~xattn_utils.analysis.compare.compare_maps` rows (special tokens excluded) plus
    ``model, task, language, subset`` (from ``utterances``) and ``comparison`` ("CA vs SM_X",
    "CA vs SM_H", or "SM_X vs SM_H" with ``map == "SM_X"``, ``kind == "saliency"``: pooled
    SM_X against SM_H).
    """
    frames = []
    for e in explanations:
        labels = _labels(e, utterances)
        for sm in (e.input_saliency, e.encoder_saliency):
            df = compare_maps(
                e.cross_attention,
                sm,
                special=e.special,
                alignment_heads=e.alignment_heads,
                utterance=e.utterance,
            )
            frames.append(df.assign(comparison="CA vs " + df["against"], **labels))
        sm_x, sm_h = pool_to_enc(e.input_saliency, factor=e.enc_subsampling), e.encoder_saliency
        n = min(sm_x.shape[-1], sm_h.shape[-1])
        keep = [not s for s in e.special]
        score = utterance_score(sm_x[:, :n], sm_h[:, :n], keep=keep)
        row = {"utterance": e.utterance, "against": "SM_H", "map": "SM_X", "kind": "saliency"}
        row |= {"correlation": score.correlation, "r": score.mean, "n_tokens": score.n_tokens}
        row |= {"n_nan": score.n_nan, "comparison": "SM_X vs SM_H", **labels}
        frames.append(pd.DataFrame([row]))
    if not frames:
        return pd.DataFrame(columns=["utterance", "comparison", "map", "kind", "r"])
    return pd.concat(frames, ignore_index=True)


def cumulative_table(explanations: Sequence, utterances: Sequence = ()) -> pd.DataFrame:
    """:func:`~xattn_utils.analysis.compare.cumulative_layers` of every utterance against SM_X and
    SM_H."""
    frames = [
        cumulative_layers(e.cross_attention, sm, special=e.special, utterance=e.utterance).assign(
            **_labels(e, utterances)
        )
        for e in explanations
        for sm in (e.input_saliency, e.encoder_saliency)
    ]
    return pd.concat(frames, ignore_index=True)


def headline(
    table: pd.DataFrame,
    reliabilities: pd.DataFrame | None = None,
    *,
    by: Sequence[str] = ("model",),
    aggregates: Sequence[tuple[str, str]] = AGGREGATES,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Best single head, best layer and all-head mean of CA vs SM_X and CA vs SM_H per ``by``.

    ``table`` is a :func:`correlation_table`; ``aggregates`` are (label, kind) pairs, the best
    view of each kind is reported (:data:`HEADLINE_AGGREGATES` adds the alignment heads).
    Columns: ``by``, ``comparison``, ``aggregate``, ``map`` (the view's label), ``mean``,
    ``low``, ``high`` (95% bootstrap CI over utterances), ``n``; with
    ``reliabilities`` (a :func:`reliability_table`) also the map's mean ``reliability`` and
    ``r_corrected`` with its CI (:func:`~xattn_utils.analysis.stats.disattenuated_ci`).
    """
    rows = []
    ca = table[table["kind"].isin([kind for _, kind in aggregates])]
    for key, group in ca.groupby([*by, "comparison"], sort=False):
        summary = corpus_table(group, n_boot=n_boot, seed=seed)
        for aggregate, kind in aggregates:
            cands = summary[summary["kind"] == kind].dropna(subset=["mean"])
            if cands.empty:
                continue
            best = cands.loc[cands["mean"].idxmax()]
            row = dict(zip([*by, "comparison"], key, strict=True))
            row |= {"aggregate": aggregate, "map": best["map"]}
            row |= {c: best[c] for c in ("mean", "low", "high", "n")}
            if reliabilities is not None and not reliabilities.empty:
                row |= _corrected(group[group["map"] == best["map"]], reliabilities, by,
                                  n_boot=n_boot, seed=seed)  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def _corrected(rows: pd.DataFrame, reliabilities: pd.DataFrame, by: Sequence[str], **kw) -> dict:
    """Mean reliability of the map of ``rows`` and r corrected for it, matched by utterance."""
    r = rows.groupby([*by, "against", "utterance"])["r"].mean().rename("r")
    rel = reliabilities.rename(columns={"map": "against"})
    rel = rel.groupby([*by, "against", "utterance"])["full"].mean()
    both = pd.concat([r, rel], axis=1, join="inner")
    est = disattenuated_ci(both["r"], both["full"], **kw)
    return {"reliability": float(both["full"].mean()), "r_corrected": est.mean,
            "r_corrected_low": est.low, "r_corrected_high": est.high}  # fmt: skip


def aggregation_gain(
    table: pd.DataFrame, *, by: Sequence[str] = ("model",), n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Does aggregation beat single heads? Per utterance, r of the all-head mean minus the mean
    r of the single heads, and minus r of the best head (picked on the whole table), with
    bootstrap CIs over utterances. Same columns as :func:`headline`."""
    rows = []
    ca = table[table["kind"].isin(["head", "all"])]
    for key, group in ca.groupby([*by, "comparison"], sort=False):
        wide = group.pivot_table(index="utterance", columns="map", values="r", aggfunc="mean")
        head_views = group.loc[group["kind"] == "head", "map"].unique()
        best = wide[head_views].mean().idxmax()
        gains = {
            "all heads - mean single head": wide[ALL] - wide[head_views].mean(axis=1),
            "all heads - best head": wide[ALL] - wide[best],
        }
        for (aggregate, gain), view in zip(gains.items(), [ALL, f"{ALL} - {best}"], strict=True):
            est = bootstrap_ci(gain.to_numpy(), n_boot=n_boot, seed=seed)
            row = dict(zip([*by, "comparison"], key, strict=True))
            row |= {"aggregate": aggregate, "map": view, "mean": est.mean, "low": est.low}
            row |= {"high": est.high, "n": est.n}
            rows.append(row)
    return pd.DataFrame(rows)


def reliability_table(explanations: Sequence, utterances: Sequence = ()) -> pd.DataFrame:
    """Split-half reliability (:func:`~xattn_utils.analysis.stats.reliability`) of SM_X (pooled)
    and SM_H per utterance: ``half`` (r between the maps of two halves of the masks) and ``full``
    (Spearman-Brown, all masks). Empty for methods without folds (gradients).

    An SM_X map from a regularised estimator (``params["estimator"]`` other than ``"mean"``)
    gets, as ``full``, its agreement with held-out high-mask references instead
    (:func:`~xattn_utils.analysis.stats.reference_reliability`; NaN where none was measured for
    its model and mask count): shrinkage makes halves agree, so split-half would overstate it.
    ``source`` says which."""
    rows = []
    for e in explanations:
        folds = {"SM_X": e.input_saliency_folds, "SM_H": e.encoder_saliency_folds}
        for name, f in folds.items():
            if f is not None:
                half = reliability(f, special=e.special, factor=e.enc_subsampling).half
                full, source = map_reliability(e, name)
                row = {"utterance": e.utterance, "map": name, "half": half}
                rows.append(row | {"full": full, "source": source, **_labels(e, utterances)})
    return pd.DataFrame(rows)


def attenuation_table(
    table: pd.DataFrame,
    reliabilities: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "subset"),
    view: str = ALL,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean r of CA (``view``, a view label) with SM_X and SM_H (column ``against``) per ``by``,
    the maps' mean reliability, and r
    corrected for the maps' noise (:func:`~xattn_utils.analysis.stats.disattenuate`): an estimate
    of the r that infinitely many masks would give. Both r with 95% bootstrap CIs over utterances
    (``r_low``, ``r_high``, ``r_corrected_low``, ``r_corrected_high``). NaN where a map shows
    no reliable signal."""
    ca = table[(table["map"] == view) & (table["kind"] != "saliency")]
    keys = [*by, "against"]
    per_utt = ca.groupby([*keys, "utterance"])["r"].mean()
    if not reliabilities.empty:
        rel = reliabilities.rename(columns={"map": "against"})
        rel = rel.groupby([*keys, "utterance"])["full"].mean().rename("reliability")
        per_utt = pd.concat([per_utt, rel], axis=1, join="outer")
    else:  # no folds: nothing to correct with
        per_utt = per_utt.to_frame().assign(reliability=np.nan)
    return corrected_summary(per_utt.reset_index(), keys, n_boot=n_boot, seed=seed)


def gap_table(
    table: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "subset"),
    view: str = ALL,
    overall: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """CA (``view``, a view label) vs SM_X, CA vs SM_H, their gap and SM_X vs SM_H, with CIs
    per ``by``; column ``map`` names the CA view ("" on the SM_X vs SM_H rows).

    The gap, r(CA, SM_H) - r(CA, SM_X) per utterance, is the part of CA's agreement with the
    encoder-side relevance that is lost on the input side, i.e. to context mixing in the
    encoder. ``overall`` adds rows over all subsets (``subset == "all"``).
    """
    rows = table[(table["map"] == view) | (table["kind"] == "saliency")]
    if overall and "subset" in by:
        rows = pd.concat([rows, rows.assign(subset="all")], ignore_index=True)
    wide = rows.pivot_table(
        index=[*by, "utterance"], columns="comparison", values="r", aggfunc="mean"
    )
    wide[GAP] = wide["CA vs SM_H"] - wide["CA vs SM_X"]
    long = wide.reset_index().melt(
        id_vars=[*by, "utterance"], var_name="comparison", value_name="r"
    )
    out = corpus_table(long, by=[*by, "comparison"], n_boot=n_boot, seed=seed)
    out.insert(len(by) + 1, "map", np.where(out["comparison"] == "SM_X vs SM_H", "", view))
    ranks = {
        "comparison": {c: i for i, c in enumerate([*COMPARISONS[:2], GAP, COMPARISONS[2]])},
        "subset": {"all": 0, "synthetic": 1, "real": 2},
    }
    out = out.sort_values(
        [*by, "comparison"],
        key=lambda col: col.map(ranks[col.name]).fillna(9) if col.name in ranks else col,
        kind="stable",
    ).reset_index(drop=True)
    out["group"] = out[list(by)].astype(str).agg("\n".join, axis=1)
    return out

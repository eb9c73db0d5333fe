"""Context mixing against saliency: the tables of notebook 07_context_mixing.

- :func:`layer_table`: how much each encoder layer mixes (shares of a frame's output from
  itself, near and far frames and the padding block), with CIs over utterances;
- :func:`context_table`: per utterance, raw CA, CA weighted by value norms and CA propagated
  through the encoder's rolled-out mixing (:mod:`xattn_utils.analysis.mixing`), each correlated with
  SM_X (max-pooled to 20 ms) and SM_H;
- :func:`gap_closed`: the share of the gap r(CA, SM_H) - r(CA, SM_X) that a view closes, with a
  bootstrap CI and reliability-corrected (:class:`GapClosed`); :func:`gap_closed_table` per
  model and subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..maps.views import ALL, select
from .compare import norm_weighted, pool_to_enc, utterance_score
from .stats import bootstrap_ci, corpus_table, map_reliability

if TYPE_CHECKING:  # results only: no model code at import time
    from .mixing import EncoderMixing

# raw, norm-weighted, propagated to the input (value-zeroing rollout; with 0.5 identity added)
MAPS = (ALL, "CA x |f(x)|", "CA -> input", "CA -> input (+0.5 I)")


def _subsets(utterances: Sequence) -> dict[str, str]:
    return {u.id: getattr(u, "subset", None) or "unknown" for u in utterances}


def layer_table(
    mixings: Sequence[EncoderMixing],
    utterances: Sequence = (),
    *,
    by: Sequence[str] = ("model", "rolled_out", "layer", "share"),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """:meth:`EncoderMixing.shares` per layer (and rolled out), plus ``"other frames"`` = 1 -
    self, with 95% bootstrap CIs over utterances
    (:func:`~xattn_utils.analysis.stats.corpus_table`)."""
    subsets = _subsets(utterances)
    frames = []
    for m in mixings:
        for rolled in (False, True):
            df = m.shares(rolled_out=rolled)
            other = df[df["share"] == "self"].assign(share="other frames")
            other["value"] = 1 - other["value"]
            frames += [df, other]
    long = pd.concat(frames, ignore_index=True)
    long["subset"] = long["utterance"].map(subsets).fillna("unknown")
    return corpus_table(long, by=by, value="value", n_boot=n_boot, seed=seed)


def context_table(
    explanations: Sequence, mixings: Sequence[EncoderMixing], utterances: Sequence = ()
) -> pd.DataFrame:
    """Per utterance and CA map (column ``map``, :data:`MAPS`: mean over all heads of raw CA, of
    :func:`~xattn_utils.analysis.compare.norm_weighted` CA and of CA propagated through the
    encoder's rolled-out mixing, as Mohebbi et al. and with half identity added to every layer as a
    residual-aware check), mean per-token r with SM_X (max-pooled to 20 ms) and with SM_H, special
    tokens excluded, and the two maps' split-half reliabilities (NaN without folds)."""
    by_id = {(m.model, m.utterance): m for m in mixings}
    subsets, rows = _subsets(utterances), []
    for e in explanations:
        m = by_id.get((e.model, e.utterance))
        if m is None:
            raise ValueError(f"no mixing for {e.model}/{e.utterance}: run mixing_corpus on it")
        ca = e.cross_attention.float()
        if ca.shape[-1] != m.n_speech:
            raise ValueError(f"{e.utterance}: CA has {ca.shape[-1]} enc_frames, mixing "
                             f"{m.n_speech}: not the same audio")  # fmt: skip
        raw = select(ca, ALL)
        weighted = select(norm_weighted(ca, m.value_norms), ALL)
        maps = (raw, weighted, m.propagate(raw), m.propagate(raw, residual=0.5))
        maps = dict(zip(MAPS, maps, strict=True))
        sm_x, sm_h = pool_to_enc(e.input_saliency, factor=e.enc_subsampling), e.encoder_saliency
        n = min(m.n_speech, sm_x.shape[-1], sm_h.shape[-1])
        keep = [not s for s in e.special]
        rel = {}
        for name, sm in (("x", "SM_X"), ("h", "SM_H")):
            rel[name] = map_reliability(e, sm)[0]
        for label, vmap in maps.items():
            sx = utterance_score(vmap[:, :n], sm_x[:, :n], keep=keep)
            sh = utterance_score(vmap[:, :n], sm_h[:, :n], keep=keep)
            rows.append({
                "model": e.model, "task": e.params.get("task", "transcribe"),
                "subset": subsets.get(e.utterance, "unknown"), "utterance": e.utterance,
                "map": label, "r_x": sx.mean, "r_h": sh.mean, "reliability_x": rel["x"],
                "reliability_h": rel["h"], "n_tokens": sx.n_tokens,
            })  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class GapClosed:
    """Share of the gap r(CA, SM_H) - r(CA, SM_X) that a CA ``map`` closes on the input side:
    ``share = mean[r(map, SM_X) - r(CA, SM_X)] / mean[r(CA, SM_H) - r(CA, SM_X)]`` over ``n``
    utterances, with a 95% percentile bootstrap CI (utterances resampled); ``*_corrected``: the
    same with every r disattenuated by its map's mean reliability in each resample (NaN where a
    mean reliability is not positive); ``gap_corrected`` is the corrected denominator: when
    it is near 0 the corrected share is ill-conditioned, whatever its CI says."""

    model: str
    subset: str
    map: str
    n: int
    r_ca_x: float
    r_ca_h: float
    r_view_x: float
    gap: float
    gap_low: float
    gap_high: float
    closed: float
    closed_low: float
    closed_high: float
    share: float
    share_low: float
    share_high: float
    reliability_x: float
    reliability_h: float
    gap_corrected: float
    share_corrected: float
    share_corrected_low: float
    share_corrected_high: float
    level: float = 0.95

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.__dict__])


def _nanmean(x: np.ndarray, axis: int | None = None):
    """Mean over the finite values (NaN where there are none), without warnings."""
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis) / ok.sum(axis)


def _shares(x0, h0, x1, rx, rh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed share, corrected share and corrected gap for arrays of resamples (..., n)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (x1 - x0).mean(-1) / (h0 - x0).mean(-1)
        sx = np.where(rx > 0, np.sqrt(np.clip(rx, 1e-12, 1.0)), np.nan)
        sh = np.where(rh > 0, np.sqrt(np.clip(rh, 1e-12, 1.0)), np.nan)
        gap = h0.mean(-1) / sh - x0.mean(-1) / sx
        corrected = ((x1 - x0).mean(-1) / sx) / gap
    return share, corrected, gap


def gap_closed(
    table: pd.DataFrame,
    *,
    view: str = "CA -> input",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> GapClosed:
    """How much of the CA-vs-SM_H minus CA-vs-SM_X gap the map ``view`` (a :data:`MAPS` label)
    closes, over the utterances of a :func:`context_table` (filter it first for one model /
    subset): see :class:`GapClosed`. "CA" there is ``"CA all heads"``."""
    wide = table.pivot_table(index="utterance", columns="map", values="r_x", aggfunc="mean")
    if ALL not in wide or view not in wide:
        raise ValueError(f"table needs maps {ALL!r} and {view!r}, has {list(wide.columns)}")
    base = table[table["map"] == ALL].groupby("utterance")
    cols = pd.concat([wide[ALL].rename("x0"), base["r_h"].mean().rename("h0"),
                      wide[view].rename("x1"), base["reliability_x"].mean().rename("rx"),
                      base["reliability_h"].mean().rename("rh")], axis=1)  # fmt: skip
    cols = cols.dropna(subset=["x0", "h0", "x1"])
    x0, h0, x1, rx, rh = (cols[c].to_numpy(dtype=float) for c in ("x0", "h0", "x1", "rx", "rh"))
    n = len(cols)
    label = {c: "+".join(map(str, table[c].unique())) for c in ("model", "subset")}
    if n == 0:
        nan = math.nan
        return GapClosed(label["model"], label["subset"], view, 0, *([nan] * 18), level)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    share, corrected, gap_c = _shares(x0, h0, x1, _nanmean(rx), _nanmean(rh))
    boot, boot_c, _ = _shares(x0[idx], h0[idx], x1[idx], _nanmean(rx[idx], 1), _nanmean(rh[idx], 1))
    alpha = (1 - level) / 2

    def ci(values: np.ndarray) -> tuple[float, float]:
        v = values[np.isfinite(values)]
        return tuple(np.quantile(v, [alpha, 1 - alpha])) if v.size else (math.nan, math.nan)

    gap, closed = bootstrap_ci(h0 - x0, n_boot=n_boot, level=level, seed=seed), bootstrap_ci(
        x1 - x0, n_boot=n_boot, level=level, seed=seed)  # fmt: skip
    return GapClosed(
        label["model"], label["subset"], view, n, float(x0.mean()), float(h0.mean()),
        float(x1.mean()), gap.mean, gap.low, gap.high, closed.mean, closed.low, closed.high,
        float(share), *ci(boot), float(_nanmean(rx)), float(_nanmean(rh)), float(gap_c),
        float(corrected), *ci(boot_c), level,
    )  # fmt: skip


def gap_closed_table(
    table: pd.DataFrame,
    *,
    views: Sequence[str] = MAPS[1:],
    overall: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`gap_closed` per model, subset (and ``"all"`` subsets with ``overall``) and map."""
    frames = []
    groups = [(k, g) for k, g in table.groupby(["model", "subset"], sort=False)]
    if overall:
        groups += [((k, "all"), g) for k, g in table.groupby("model", sort=False)]
    for (model, subset), g in groups:
        for view in views:
            row = gap_closed(g, view=view, n_boot=n_boot, seed=seed).to_frame()
            frames.append(row.assign(model=model, subset=subset))
    return pd.concat(frames, ignore_index=True)

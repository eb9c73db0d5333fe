"""SM_X estimators against held-out high-mask references (issue 12), measured in one run.

For every reference utterance in ``data/reference/<model>/`` (``benchmarks/reference_maps.py``:
i.i.d. masks, full 30 s encoder, every mask's scores kept), the pool of masks is split into its
two halves (``MaskSampler.fold``: alternate blocks of one mask pair per granularity). Subsets
of ``N`` masks are drawn from half A (disjoint, in mask order); each estimator's map from a
subset is scored against the SPES map of half B, which shares no mask with it, by the mean
per-token Pearson r (text tokens only) at the 20 ms max-pooled resolution the comparisons use
and at full resolution. The reference's own noise is
measured by the agreement of the two halves' maps (the reliability of a half-pool map) and
divided out: ``r_corrected = r / sqrt(reliability of half B)``, labelled as such.

An estimator's **equivalent masks** invert the i.i.d. SPES estimator's (``mean``) measured
curve of ``r_corrected`` against mask count, per utterance and resolution, at the estimator's
own ``r_corrected``; its **gain** is equivalent masks / masks used (the ``mean`` rows measure
the inversion's own error: about 1). CIs are percentile bootstraps over (utterance, subset)
units. Outside the measured counts the curve is extended by ``r^2 = N / (N + D)`` anchored at
its nearest end (``extrapolated`` says so).

Diagnostics (per utterance, half A subsets of 256 masks, scored on all of half B's masks): the
out-of-sample R^2 of additive fits of the scores on the mask indicators (all units, ridge; the
windowed ridge; 16 time bins), and the share of each token's squared unit effects held by its
top 1% and 10% of units (effects from the whole pool; squares from the product of the two
halves' estimates, which is unbiased for the square).

Usage: ``python benchmarks/estimators.py [--model tiny.en] [--counts 64,128,256,512,1024]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xattn_utils.analysis.compare import pool_to_enc
from xattn_utils.maps.estimators import ESTIMATORS, UnitDesign, estimate
from xattn_utils.maps.masks import MaskSampler
from xattn_utils.maps.perturbation import bin_features, ridge_gcv, time_bins

ROOT = Path(__file__).resolve().parents[1] / "data" / "reference"


def load_reference(path: Path) -> dict:
    """Scores, the replayed sampler and labels of one stored reference pool."""
    z = np.load(path)
    label_maps = [lm.astype(np.int64) for lm in z["label_maps"]]
    sampler = MaskSampler(label_maps, int(z["pool"]), p=0.5, design="iid", seed=int(z["seed"]))
    return {
        "id": path.stem,
        "scores": torch.from_numpy(z["scores"].astype(np.float64)),
        "sampler": sampler,
        "design": UnitDesign(sampler),
        "keep": ~z["special"].astype(bool),
        "shape": (len(z["output_ids"]), *label_maps[0].shape),
        "meta": json.loads(str(z["meta"])),
    }


def token_r(a: torch.Tensor, b: torch.Tensor, keep: np.ndarray) -> float:
    """Mean per-token Pearson r of two maps (tokens, ...) over the kept tokens."""
    a, b = a[keep].reshape(int(keep.sum()), -1), b[keep].reshape(int(keep.sum()), -1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)
    return float(r.mean())


def views(cell_map: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    m = cell_map.reshape(shape).float()
    return {"pooled": pool_to_enc(m), "full": m}


def equivalent_masks(curve: pd.Series, r: float) -> tuple[float, bool]:
    """(i.i.d. masks whose mean SPES map reaches ``r_corrected = r``, extrapolated?): the
    measured i.i.d. curve (``curve``: mask count -> mean r_corrected) inverted by linear
    interpolation of r^2 in log count; outside it, ``r^2 = N / (N + D)`` anchored at the
    nearest end of the curve."""
    counts = curve.index.to_numpy(float)
    r2 = np.maximum.accumulate(np.clip(curve.to_numpy(float), 1e-6, 0.999) ** 2)
    target = min(max(r, 0.0), 0.999) ** 2
    if target <= 0:
        return 0.0, False
    if r2[0] <= target <= r2[-1] and len(counts) > 1:
        return float(np.exp(np.interp(target, r2, np.log(counts)))), False
    i = 0 if target < r2[0] else -1
    d = counts[i] * (1 - r2[i]) / r2[i]
    return float(d * target / (1 - target)), True


def bootstrap(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, values.size, (n_boot, values.size))
    means = values[idx].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def score_subsets(ref: dict, counts: list[int], estimators: list[str], max_subsets: int):
    """Rows (estimator, n, subset, resolution, r, r_corrected) for one reference utterance."""
    n = ref["scores"].shape[0]
    masks = np.arange(n)
    fold = ref["sampler"].fold(masks)
    half_a, half_b = masks[fold == 0], masks[fold == 1]
    refs = {h: views(estimate(ref["sampler"], ref["scores"], m, design=ref["design"]),
                     ref["shape"]) for h, m in (("A", half_a), ("B", half_b))}  # fmt: skip
    rel = {res: token_r(refs["A"][res], refs["B"][res], ref["keep"]) for res in ("pooled", "full")}
    rows = []
    for count in counts:
        n_sub = min(max_subsets, len(half_a) // count)
        for k in range(n_sub):
            subset = half_a[k * count : (k + 1) * count]
            for name in estimators:
                t0 = time.perf_counter()
                est = estimate(ref["sampler"], ref["scores"], subset, estimator=name,
                               design=ref["design"])  # fmt: skip
                seconds = time.perf_counter() - t0
                for res, m in views(est, ref["shape"]).items():
                    r = token_r(m, refs["B"][res], ref["keep"])
                    rows.append({"utterance": ref["id"], "estimator": name, "n": count,
                                 "subset": k, "resolution": res, "r": r,
                                 "r_corrected": r / np.sqrt(max(rel[res], 1e-12)),
                                 "ref_reliability": rel[res], "ref_masks": len(half_b),
                                 "seconds": seconds})  # fmt: skip
    return rows


def diagnostics(ref: dict, count: int = 256) -> dict:
    """Out-of-sample R^2 of additive fits, and the concentration of squared unit effects."""
    from xattn_utils.maps.estimators import _bin_fit, _ridge

    n = ref["scores"].shape[0]
    masks = np.arange(n)
    fold = ref["sampler"].fold(masks)
    half_a, half_b = masks[fold == 0][:count], masks[fold == 1]
    sampler, design, scores = ref["sampler"], ref["design"], ref["scores"]
    keep = torch.from_numpy(ref["keep"])
    out = {}

    def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
        sse = ((y - pred) ** 2).sum(0)
        sst = ((y - y.mean(0)) ** 2).sum(0)
        return float((1 - sse / sst)[keep].mean())

    preds = {"all_units": [], "windowed": [], "bins16": []}
    ys = []
    for g in range(len(sampler.label_maps)):
        fit = half_a[sampler.granularity[half_a] == g]
        test = half_b[sampler.granularity[half_b] == g]
        z_fit, z_test = design.indicators(g, fit), design.indicators(g, test)
        y_fit = scores[fit]
        for name, prior in (("all_units", None), ("windowed", design.overlap[g] @ _bin_fit(
                design, scores, [fit if i == g else fit[:0] for i in range(len(sampler.label_maps))]
        ))):  # fmt: skip
            if prior is None:  # plain ridge: flat prior around 0 (the windowed ridge's w = 1)
                beta = _ridge_flat(z_fit, y_fit)
            else:
                beta = _ridge(z_fit, y_fit, prior)
            b0 = y_fit.mean(0) - z_fit.mean(0) @ beta
            preds[name].append(b0 + z_test @ beta)
        ys.append(scores[test])
    # 16 time bins, on all granularities' cell masks
    cells_a = sampler.masks(0, 1)  # shape only
    bins = time_bins(cells_a.shape[1], 16)
    xa = bin_features(torch.stack([sampler.masks(int(m), int(m) + 1)[0] for m in half_a]), bins)
    xb = bin_features(torch.stack([sampler.masks(int(m), int(m) + 1)[0] for m in half_b]), bins)
    coef = ridge_gcv(xa, scores[half_a])
    pred16 = scores[half_a].mean(0) + (xb - xa.mean(0)) @ coef
    y = torch.cat(ys)
    for name in ("all_units", "windowed"):
        out[f"r2_{name}"] = r2(torch.cat(preds[name]), y)
    out["r2_bins16"] = r2(pred16, scores[half_b])
    # concentration: unit effects of granularity 0 from each half, product unbiased for square
    g = 0
    eff = []
    for half in (fold == 0, fold == 1):
        rows = masks[half & (sampler.granularity[masks] == g)]
        z = design.indicators(g, rows)
        occ, kept = z.sum(0).clamp(min=1), (1 - z).sum(0).clamp(min=1)
        eff.append((z.T @ scores[rows]) / occ[:, None] - ((1 - z).T @ scores[rows]) / kept[:, None])
    prod = (eff[0] * eff[1])[:, keep]  # (units, tokens)
    rank = ((eff[0] + eff[1]) / 2)[:, keep].abs().argsort(0, descending=True)
    for frac in (0.01, 0.10):
        k = max(1, int(round(frac * prod.shape[0])))
        top = torch.gather(prod, 0, rank[:k])
        out[f"top{int(frac * 100)}pct_share"] = float((top.sum(0) / prod.sum(0)).median())
    return out


def _ridge_flat(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain ridge (prior mean 0, equal prior variances), penalty by GCV."""
    from xattn_utils.maps.estimators import _ridge

    zeros = torch.zeros(z.shape[1], y.shape[1], dtype=torch.float64)
    return _ridge(z, y, zeros, torch.ones_like(zeros))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--counts", default="64,128,256,512,1024")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--max-subsets", type=int, default=4)
    parser.add_argument("--no-diagnostics", action="store_true")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the pooled agreement table (agreement.json) beside the pools",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    estimators = args.estimators.split(",")
    if "mean" not in estimators:
        estimators = ["mean", *estimators]
    paths = sorted((ROOT / args.model).glob("*.npz"))
    if not paths:
        raise SystemExit(f"no reference pools under {ROOT / args.model}: run reference_maps.py")
    refs = [load_reference(p) for p in paths]
    rows = []
    for ref in refs:
        n = ref["scores"].shape[0]
        print(f"reference {ref['id']}: {n} masks ({n // 2} per half), "
              f"{[int(lm.max()) + 1 for lm in ref['sampler'].label_maps]} segments")  # fmt: skip
        rows += score_subsets(ref, [c for c in counts if c <= n // 2], estimators,
                              args.max_subsets)  # fmt: skip
    table = pd.DataFrame(rows)
    for res, g in table.groupby("resolution"):
        rel = g.groupby("utterance")["ref_reliability"].first()
        print(f"\n== {res} resolution; reference half-pool reliability: "
              + ", ".join(f"{u} {v:.3f}" for u, v in rel.items()))  # fmt: skip
        curves = {u: h[h.estimator == "mean"].groupby("n")["r_corrected"].mean()
                  for u, h in g.groupby("utterance")}  # fmt: skip
        eq = [equivalent_masks(curves[u], r) for u, r in zip(g.utterance, g.r_corrected,
                                                              strict=True)]  # fmt: skip
        g = g.assign(equivalent=[e for e, _ in eq], extrapolated=[x for _, x in eq])
        g = g.assign(gain=g["equivalent"] / g["n"])
        print("i.i.d. curves (masks: r_corrected): " + "; ".join(
            f"{u} " + ", ".join(f"{n}: {v:.3f}" for n, v in c.items()) for u, c in curves.items()
        ))  # fmt: skip
        for (name, count), h in g.groupby(["estimator", "n"], sort=False):
            lo, hi = bootstrap(h["gain"].to_numpy())
            rlo, rhi = bootstrap(h["r_corrected"].to_numpy())
            print(f"gain_{res}_{name}_N{count}: {h['gain'].mean():.2f} [{lo:.2f}, {hi:.2f}] "
                  f"(r {h['r'].mean():.3f}, r_corrected {h['r_corrected'].mean():.3f} "
                  f"[{rlo:.3f}, {rhi:.3f}], equivalent masks {h['equivalent'].mean():.0f}"
                  f"{' extrapolated' if h['extrapolated'].any() else ''}, "
                  f"n={len(h)} subsets, {h['seconds'].mean():.2f} s)")  # fmt: skip
    if args.write:
        pooled = table[table.resolution == "pooled"]
        agreement = {
            name: {str(n): {"r_corrected": float(h["r_corrected"].mean()), "subsets": len(h),
                            "utterances": int(h["utterance"].nunique())}
                   for n, h in g.groupby("n")}
            for name, g in pooled.groupby("estimator")
        }  # fmt: skip
        meta = {
            "masks_per_pool": {r["id"]: int(r["scores"].shape[0]) for r in refs},
            "resolution": "20 ms, max-pooled",
            "reference": "half B of each pool (mean)",
        }
        out = ROOT / args.model / "agreement.json"
        out.write_text(json.dumps({"meta": meta, "agreement": agreement}, indent=1) + "\n")
        print(f"wrote {out}")
    if not args.no_diagnostics:
        print()
        for ref in refs:
            diag = diagnostics(ref)
            print(f"diagnostics_{ref['id']}: " + ", ".join(f"{k} {v:.3f}" for k, v in diag.items()))


if __name__ == "__main__":
    main()

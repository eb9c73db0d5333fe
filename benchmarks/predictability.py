"""How much of the per-mask SM_X score can any surrogate of the masks predict? (issue 12)

An unbiased regression-adjusted estimator (surrogate's exact map plus the mean-over-masks map
of the residuals) has the variance of the residuals: with a surrogate that explains a share
R^2 of the scores' variance out of sample, it needs about ``1 - R^2`` of the masks of plain
SPES for the same noise, a gain of at most ``1 / (1 - R^2)``. Shrunk (biased) estimators gain
beyond that only by smoothing. So the out-of-sample R^2 of the best surrogate bounds what
modelling the scores can buy at this estimand.

For every reference pool in ``data/reference/<model>/`` (``benchmarks/reference_maps.py``:
i.i.d. masks, the full 30 s encoder, every mask's scores kept), surrogates are fitted on masks
of half A (the first N, and all of it) and scored on every mask of half B (R^2 per text token,
then the mean). Features: the occluded share of each cell of a coarse time x mel grid (16 or
32 time bins x 4 mel bands). Models: ridge (additive) and RBF kernel ridge (any smooth
interaction of the coarse layout); penalties and kernel widths by 4-fold cross-validation
inside the training masks, never on half B. Also printed: how much the tokens' scores move
together across masks (mean inter-token r, share of the first principal component).

Usage: ``python benchmarks/predictability.py [--model tiny.en] [--counts 256,0]`` (0: all of
half A).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from estimators import ROOT, load_reference

from xattn_utils.maps.perturbation import time_bins

GRIDS = ((16, 4), (32, 4))  # (time bins, mel bands)
LAMBDAS = (0.1, 1.0, 10.0, 100.0)  # kernel ridge
RIDGE_LAMBDAS = tuple(10.0 ** np.arange(-2, 5))  # ridge, times N / 100
GAMMAS = (0.25, 1.0, 4.0)  # RBF width, times 8 / features


def grid_shares(masks: torch.Tensor, n_time: int, n_mel: int) -> torch.Tensor:
    """Occluded share of each (time bin, mel band) cell, shape = (masks, n_time * n_mel), of
    cell masks (masks, mel_frames, mel_bins)."""
    tb = torch.as_tensor(time_bins(masks.shape[1], n_time))
    mb = torch.as_tensor(time_bins(masks.shape[2], n_mel))
    per_time = torch.zeros(masks.shape[0], n_time, masks.shape[2], dtype=torch.float64)
    per_time.index_add_(1, tb, masks.double())
    out = torch.zeros(masks.shape[0], n_time, n_mel, dtype=torch.float64).index_add_(
        2, mb, per_time
    )
    sizes = torch.bincount(tb)[None, :, None] * torch.bincount(mb)[None, None, :]
    return (out / sizes).reshape(masks.shape[0], -1)


def ridge_fit(xa: torch.Tensor, ya: torch.Tensor, lam: float):
    mx, my = xa.mean(0), ya.mean(0)
    x = xa - mx
    w = torch.linalg.solve(
        x.T @ x + lam * len(xa) / 100 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (ya - my)
    )
    return lambda xb: my + (xb - mx) @ w


def rbf_fit(xa: torch.Tensor, ya: torch.Tensor, lam: float, gamma: float):
    g = gamma * 8 / xa.shape[1]
    my = ya.mean(0)
    k = torch.exp(-g * torch.cdist(xa, xa) ** 2)
    alpha = torch.linalg.solve(k + lam * torch.eye(len(xa), dtype=k.dtype), ya - my)
    return lambda xb: my + torch.exp(-g * torch.cdist(xb, xa) ** 2) @ alpha


def r2(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean over tokens of the out-of-sample R^2 (scored around the test masks' own mean)."""
    return float((1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)).mean())


def cross_validated(fit, grid, xa: torch.Tensor, ya: torch.Tensor, k: int = 4):
    """The model of ``fit(x, y, *params)`` refitted on all of (xa, ya) with the parameters
    from ``grid`` that predict best in ``k``-fold cross-validation; returns (model, params)."""
    folds = np.arange(len(xa)) % k
    best, arg = -np.inf, None
    for params in grid:
        score = np.mean(
            [
                r2(ya[folds == f], fit(xa[folds != f], ya[folds != f], *params)(xa[folds == f]))
                for f in range(k)
            ]
        )
        if score > best:
            best, arg = score, params
    return fit(xa, ya, *arg), arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--counts", default="256,0", help="training masks (0: all of half A)")
    args = parser.parse_args()
    paths = sorted((ROOT / args.model).glob("*.npz"))
    if not paths:
        raise SystemExit(f"no reference pools under {ROOT / args.model}: run reference_maps.py")
    best_all = []
    for path in paths:
        start = time.perf_counter()
        ref = load_reference(path)
        sampler, n = ref["sampler"], ref["scores"].shape[0]
        y = ref["scores"][:, ref["keep"]]
        masks = np.arange(n)
        fold = sampler.fold(masks)
        half_a, half_b = masks[fold == 0], masks[fold == 1]
        cells = sampler.masks(0, n)
        yc = y - y.mean(0)
        eig = torch.linalg.eigvalsh(yc.T @ yc)
        corr = torch.corrcoef(y.T)
        inter = float(corr[~torch.eye(len(corr), dtype=torch.bool)].mean())
        print(
            f"{ref['id']}: {n} masks, {y.shape[1]} text tokens, score sd "
            f"{float(y.std(0).mean()):.3f} nats (mean {float(y.mean()):.2f}); inter-token r "
            f"{inter:.2f}, first PC {float(eig[-1] / eig.sum()):.0%} of the variance"
        )
        for (n_time, n_mel), count in itertools.product(
            GRIDS, [int(c) for c in args.counts.split(",")]
        ):
            x = grid_shares(cells, n_time, n_mel)
            train = half_a if count == 0 else half_a[:count]
            xa, ya, xb, yb = x[train], y[train], x[half_b], y[half_b]
            lin, lam = cross_validated(ridge_fit, [(v,) for v in RIDGE_LAMBDAS], xa, ya)
            rbf, par = cross_validated(rbf_fit, list(itertools.product(LAMBDAS, GAMMAS)), xa, ya)
            r_lin, r_rbf = r2(yb, lin(xb)), r2(yb, rbf(xb))
            best_all.append(max(r_lin, r_rbf))
            ceiling = 1 / (1 - max(r_lin, r_rbf, 0.0))
            print(
                f"  {n_time} time x {n_mel} mel cells, fitted on {len(train)} masks, scored on "
                f"{len(half_b)}: R^2 ridge {r_lin:+.3f} (lambda {lam[0]}), RBF {r_rbf:+.3f} "
                f"(lambda {par[0]}, gamma {par[1]}); unbiased gain at most {ceiling:.2f}x"
            )
        print(f"  ({time.perf_counter() - start:.0f} s)")
    print(
        f"summary: best out-of-sample R^2 of any surrogate {max(best_all):+.3f}; an unbiased "
        f"surrogate-adjusted estimator gains at most {1 / (1 - max(max(best_all), 0)):.2f}x"
    )


if __name__ == "__main__":
    main()

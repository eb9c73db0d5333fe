"""Estimators of the SPES map from the scores of i.i.d. masks (SM_X and SM_H alike).

The estimand is SPES's map: the mean score of token ``t`` over the masks that occluded cell
``c``. With every unit (superpixel or frame group) occluded independently with probability
``p`` it equals, per granularity ``g`` (each mask uses one), ``E_g[s] + (1 - p) beta_{g,u}``
with ``u`` the unit of ``c`` and ``beta_{g,u} = E_g[s | u occluded] - E_g[s | u kept]`` the
unit's main effect (its Banzhaf value up to a factor), which is also the population
least-squares coefficient of the unit's occlusion indicator (the indicators are independent).
The map averages the granularities, weighted by their masks. So every estimator below
estimates the unit main effects of each granularity and assembles the same map:

- ``"mean"``: SPES's own estimator, the mean score over the masks that occluded each cell. Its
  error is cross-talk: the effects of the thousands of other units each mask occludes.
- ``"bins"``: a coarse, well-determined fit: the scores regressed (ridge, penalty by
  generalised cross-validation) on the occluded share of 40 ms time bins
  (:data:`BIN_MEL_FRAMES`); each unit's effect is what the fit predicts for its cells.
- ``"ridge"``: per token and granularity, a Bayesian ridge regression of the scores on the unit
  indicators. Each unit's prior is centred on the bin fit's prediction, with a variance that
  follows the bin fit's time envelope (the squared prediction plus its mean, so units outside
  the envelope can still carry effects); the penalty is chosen per token by GCV.
- ``"grid"``: the same regression on the cells of a fixed grid (20 ms x 8 mel bins,
  :data:`ATOM_CELLS`) shared by all granularities, so every mask informs every effect (with
  ``"ridge"`` each granularity sees only its own masks); a unit's effect is the sum of its grid
  cells' effects, shared in proportion to overlap.
- ``"lasso"``: a sparse fit on the same grid cells, no prior: per token the Lasso (penalty by
  4-fold cross-validation along a path), then least squares refitted on the cells it kept
  (:func:`_lasso`). It pays where few cells carry the effects.

Everything comes from the masks themselves (no CA, no word timings). Shrinkage biases these
maps towards the bin fit: their quality is their agreement with a held-out reference, not
their split-half reliability. Each also comes in an unbiased form, ``"<name>-adjusted"``
(Witter, Liu and Musco 2025, arXiv 2506.11849): the surrogate's exact map plus the
mean-over-masks map of the residual scores, cross-fitted (:data:`N_CROSS` parts; each part's
surrogate is fitted on the other parts), so a bad surrogate costs variance, never bias.

Maps of the two halves of the masks (:meth:`MaskSampler.fold`) are estimated independently,
each from its own masks only, so split-half reliability keeps its meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .masks import MaskSampler
from .perturbation import ESTIMATORS, PerturbationError, ridge_gcv

BIN_MEL_FRAMES = 4  # time bins of the envelope fit: 40 ms of SM_X (2 encoder frames)
N_CROSS = 4  # cross-fitting parts of the adjusted estimators
ATOM_CELLS = (2, 8)  # cells of the "grid" estimator: 20 ms x 8 mel bins
LAMBDAS = 10.0 ** np.arange(-3.0, 3.01, 0.25)  # penalties, relative to the mean eigenvalue
LASSO_PATH = 10.0 ** np.linspace(0.0, -2.5, 8)  # Lasso penalties, times the empty-model one
LASSO_ITERATIONS = 300  # FISTA steps per fit


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise PerturbationError(f"unknown estimator {name!r}: use one of {ESTIMATORS}")


class UnitDesign:
    """The masks of a :class:`MaskSampler` at unit level: for each granularity, the occlusion
    indicators of its units and how units overlap the time bins and the cells."""

    def __init__(self, sampler: MaskSampler, *, bin_width: int | None = None) -> None:
        self.sampler = sampler
        self.p = sampler.p
        labels0 = sampler.label_maps[0]
        spectrogram = labels0.ndim == 2
        width = bin_width or (BIN_MEL_FRAMES if spectrogram else BIN_MEL_FRAMES // 2)
        bins = _grid(labels0.shape, width, None)
        atoms = _grid(labels0.shape, *(ATOM_CELLS if spectrogram else (1, None)))
        self.n_bins, self.n_atoms = int(bins.max()) + 1, int(atoms.max()) + 1
        # (units, bins) and (units, atoms): the share of each bin / atom a unit covers
        self.overlap = [_overlap(lm.reshape(-1), bins) for lm in sampler.label_maps]
        self.atom_overlap = [_overlap(lm.reshape(-1), atoms) for lm in sampler.label_maps]
        self.atom_bins = _overlap(atoms, bins)  # (atoms, bins)

    def indicators(self, g: int, masks: np.ndarray) -> torch.Tensor:
        """Unit occlusion indicators (masks, units) of masks ``masks`` (all of granularity g)."""
        return self.sampler.units[g][self.sampler._row[masks]].double()

    def cell_map(self, unit_values: Sequence[torch.Tensor], weights: Sequence[float]):
        """Cell map (tokens, cells) from per-granularity unit values (units, tokens), averaged
        with ``weights`` (the share of masks of each granularity)."""
        total = sum(weights)
        out = None
        for labels, values, w in zip(self.sampler.label_maps, unit_values, weights, strict=True):
            if w == 0:
                continue
            part = values[labels.reshape(-1)].T * (w / total)
            out = part if out is None else out + part
        if out is None:  # no masks at all: 0 everywhere, as SPES leaves unoccluded cells
            return torch.zeros(values.shape[1], labels.numel(), dtype=torch.float64)
        return out


def _grid(shape: tuple[int, ...], width: int, height: int | None) -> torch.Tensor:
    """Labels of a regular grid of ``width`` time steps by ``height`` bins (all bins when
    None) over cells of ``shape``, flattened."""
    t = torch.arange(shape[0])[:, None] // width
    if len(shape) == 1:
        return t.reshape(-1)
    n_f = 1 if height is None else -(-shape[1] // height)
    f = torch.arange(shape[1])[None, :] // (height or shape[1])
    return (t * n_f + f).reshape(-1)


def _overlap(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(labels, groups): the share of each group's cells that each label covers."""
    labels = torch.as_tensor(labels).reshape(-1)
    out = torch.zeros(int(labels.max()) + 1, int(groups.max()) + 1, dtype=torch.float64)
    out.index_put_((labels, groups), torch.ones(labels.numel(), dtype=torch.float64),
                   accumulate=True)  # fmt: skip
    return out / torch.bincount(groups, minlength=out.shape[1]).double()


def estimate(
    sampler: MaskSampler,
    scores: torch.Tensor,
    masks: np.ndarray | None = None,
    *,
    estimator: str = "mean",
    design: UnitDesign | None = None,
    envelope: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SPES map (tokens, cells) of the masks ``masks`` (indices; default all) from their
    ``scores`` (all masks, tokens), by ``estimator`` (:data:`ESTIMATORS`).

    ``envelope`` (time bins, tokens), optional, replaces the masks' own time-bin fit as the
    ridge prior (prior mean 0, variance from the envelope), e.g. from CA or word timings. An
    outside prior would bias a map towards it, so only the unbiased ``*-adjusted`` estimators
    accept one: SM_X is compared with CA, and must not be drawn towards it."""
    check_estimator(estimator)
    adjusted = estimator.endswith("-adjusted")
    if envelope is not None and not adjusted:
        raise PerturbationError(
            f"an outside envelope would bias estimator {estimator!r} towards it: use an "
            "'-adjusted' estimator (unbiased for any prior) or no envelope"
        )
    if envelope is not None and estimator.startswith("lasso"):
        raise PerturbationError("the lasso estimators take no envelope (they have no prior)")
    design = design or UnitDesign(sampler)
    masks = np.arange(scores.shape[0]) if masks is None else np.asarray(masks)
    scores = torch.as_tensor(scores).double()
    grans = [masks[sampler.granularity[masks] == g] for g in range(len(sampler.label_maps))]
    if estimator == "mean":
        return _ratio(*_sums(design, [(r, scores[r]) for r in grans]))
    surrogate = estimator.removesuffix("-adjusted")
    if not adjusted:  # the surrogate's own exact map: E[s] + (1 - p) beta_u per granularity
        fits = _fit(design, scores, grans, surrogate)
        return design.cell_map(
            [
                scores[r].mean(0) + (1 - design.p) * beta
                for r, (_, beta) in zip(grans, fits, strict=True)
            ],
            [len(r) for r in grans],
        )
    return _adjusted_map(design, scores, grans, surrogate, envelope)


def fold_maps(
    sampler: MaskSampler, scores: torch.Tensor, *, estimator: str = "mean", stop: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(map of all masks, maps of each half (2, tokens, cells)) of the first ``stop`` masks,
    each half estimated from its own masks only."""
    n = scores.shape[0] if stop is None else stop
    design = UnitDesign(sampler)
    masks = np.arange(n)
    fold = sampler.fold(masks)
    full = estimate(sampler, scores, masks, estimator=estimator, design=design)
    halves = torch.stack(
        [estimate(sampler, scores, masks[fold == f], estimator=estimator, design=design)
         for f in range(2)]
    )  # fmt: skip
    return full, halves


# -- the pieces ---------------------------------------------------------------------------------


def _sums(
    design: UnitDesign,
    parts: list[tuple[np.ndarray, torch.Tensor]],
    offsets: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPES's sums over the masks that occluded each cell: (sum of per-mask values (tokens,
    cells), count (cells,)). ``parts`` holds, per granularity, (mask indices, values (masks,
    tokens)); ``offsets`` optionally adds a per-unit value (units, tokens) to every occluding
    mask's value."""
    num = occ = None
    for g, (rows, values) in enumerate(parts):
        z = design.indicators(g, rows)  # (masks, units)
        labels = design.sampler.label_maps[g].reshape(-1)
        per_unit = values.T @ z
        if offsets is not None:
            per_unit = per_unit + offsets[g].T * z.sum(0)
        n_g, o_g = per_unit[:, labels], z.sum(0)[labels]
        num = n_g if num is None else num + n_g
        occ = o_g if occ is None else occ + o_g
    return num, occ


def _ratio(num: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """The mean over occluding masks (0 where no mask occluded a cell)."""
    return torch.where(occ > 0, num / occ.clamp(min=1), torch.zeros_like(num))


def _bin_fit(design: UnitDesign, scores: torch.Tensor, grans: list[np.ndarray]) -> torch.Tensor:
    """Coefficients (bins, tokens) of the scores on the occluded share of each time bin, all
    granularities together (ridge, penalty by GCV)."""
    x = torch.cat([design.indicators(g, rows) @ design.overlap[g] for g, rows in enumerate(grans)])
    y = torch.cat([scores[rows] for rows in grans])
    if x.shape[0] < 4:
        return torch.zeros(design.n_bins, scores.shape[1], dtype=torch.float64)
    return ridge_gcv(x, y)


def _ridge(
    z: torch.Tensor,
    y: torch.Tensor,
    prior: torch.Tensor,
    variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior means (units, tokens) of the unit effects: prior mean ``prior`` (units,
    tokens), prior variance ``variance`` (default ``prior**2 + mean(prior**2)`` per token) up to
    a scale, the noise ratio chosen per token by generalised cross-validation (dual form: masks
    x masks)."""
    x = z - z.mean(0)
    yc = y - y.mean(0)
    n = x.shape[0]
    out = prior.clone()
    if n < 4:
        return out
    for t in range(y.shape[1]):
        if variance is None:
            w = prior[:, t] ** 2
            w = w + w.mean() + 1e-30
        else:
            w = variance[:, t]
        r = yc[:, t] - x @ prior[:, t]
        xs = x * w  # x Sigma, Sigma = diag(w)
        k = xs @ x.T
        s, u = torch.linalg.eigh(k)
        s = s.clamp(min=0)
        ur = u.T @ r
        scale = float(s.mean()) or 1.0
        best, alpha = math.inf, None
        for lam in LAMBDAS * scale:
            shrink = s / (s + lam)
            resid = float((((1 - shrink) * ur) ** 2).sum())
            gcv = n * resid / max((n - float(shrink.sum())) ** 2, 1e-12)
            if gcv < best:
                best, alpha = gcv, u @ (ur / (s + lam))
        out[:, t] += xs.T @ alpha
    return out


def _lasso(x: torch.Tensor, y: torch.Tensor, *, folds: int = 4) -> torch.Tensor:
    """Sparse effects (features, tokens) of ``y`` (n, tokens) on ``x`` (n, features): per token
    the Lasso penalty of :data:`LASSO_PATH` that predicts best in ``folds``-fold
    cross-validation, then least squares (ridge-stabilised) on the features it keeps, at most
    ``n / 2`` of them (the largest)."""
    n, n_tok = y.shape
    out = torch.zeros(x.shape[1], n_tok, dtype=torch.float64)
    if n < 2 * folds:
        return out
    part = np.arange(n) % folds
    err = torch.zeros(len(LASSO_PATH), n_tok, dtype=torch.float64)
    for k in range(folds):
        fit, held = torch.from_numpy(part != k), torch.from_numpy(part == k)
        coef, x0, y0 = _lasso_path(x[fit], y[fit])  # (path, features, tokens)
        pred = y0 + torch.einsum("nf,pft->pnt", x[held] - x0, coef)
        err += ((pred - y[held]) ** 2).sum(1)
    best = err.argmin(0)  # (tokens,)
    coef, x0, y0 = _lasso_path(x, y)
    xc, yc = x - x0, y - y0
    for t in range(n_tok):
        b = coef[best[t], :, t]
        keep = torch.argsort(b.abs(), descending=True)[: n // 2]
        keep = keep[b[keep] != 0]
        if keep.numel() == 0:
            continue
        xs = xc[:, keep]
        gram = xs.T @ xs
        gram += 1e-6 * float(gram.diagonal().mean()) * torch.eye(len(keep), dtype=gram.dtype)
        out[keep, t] = torch.linalg.solve(gram, xs.T @ yc[:, t])
    return out


def _lasso_path(x: torch.Tensor, y: torch.Tensor):
    """(Lasso coefficients (path, features, tokens) at :data:`LASSO_PATH` times each token's
    smallest empty-model penalty, feature means, score means), by FISTA."""
    n = x.shape[0]
    x0, y0 = x.mean(0), y.mean(0)
    xc, yc = x - x0, y - y0
    lam = (xc.T @ yc).abs().amax(0) / n  # (tokens,): the smallest penalty that keeps nothing
    lam = torch.as_tensor(LASSO_PATH, dtype=x.dtype)[:, None] * lam[None]  # (path, tokens)
    step = n / max(float(torch.linalg.matrix_norm(xc, ord=2)) ** 2, 1e-12)
    xty = xc.T @ yc / n  # (features, tokens)
    b = z = torch.zeros(len(LASSO_PATH), x.shape[1], y.shape[1], dtype=x.dtype)
    t_k = 1.0
    for _ in range(LASSO_ITERATIONS):
        resid = torch.einsum("nf,pft->pnt", xc, z)
        grad = torch.einsum("nf,pnt->pft", xc, resid) / n - xty
        u = z - step * grad
        b_new = u.sign() * (u.abs() - step * lam[:, None, :]).clamp(min=0)
        t_next = (1 + math.sqrt(1 + 4 * t_k * t_k)) / 2
        z = b_new + (t_k - 1) / t_next * (b_new - b)
        b, t_k = b_new, t_next
    return b, x0, y0


def _fit(
    design: UnitDesign,
    scores: torch.Tensor,
    grans: list[np.ndarray],
    surrogate: str,
    envelope: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A linear surrogate ``h(z) = b0 + z . beta`` of the scores, per granularity: (b0 (tokens,),
    beta (units, tokens)). ``"bins"``: the time-bin fit alone; ``"ridge"``: per granularity, a
    ridge on the units with the bin fit as prior; ``"grid"``: one ridge on the cells of a fixed
    grid shared by all granularities (every mask informs every effect)."""
    n_tok = scores.shape[1]
    env = _bin_fit(design, scores, grans) if envelope is None else None

    def prior(overlap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if envelope is None:
            return overlap @ env, None
        var = overlap @ envelope.double().abs()
        return torch.zeros_like(var), var + var.mean(0) + 1e-30

    if surrogate in ("grid", "lasso"):
        x = torch.cat([design.indicators(g, r) @ design.atom_overlap[g]
                       for g, r in enumerate(grans)])  # fmt: skip
        y = torch.cat([scores[r] for r in grans])
        if surrogate == "lasso":
            gamma = _lasso(x, y)
        else:
            gamma = _ridge(x, y, *prior(design.atom_bins)) if len(y) >= 4 else prior(
                design.atom_bins)[0]  # fmt: skip
        betas = [ov @ gamma for ov in design.atom_overlap]
    else:
        betas = []
        for g, rows in enumerate(grans):
            mean, var = prior(design.overlap[g])
            if surrogate == "ridge" and len(rows) >= 4:
                mean = _ridge(design.indicators(g, rows), scores[rows], mean, var)
            betas.append(mean)
    fits = []
    for g, (rows, beta) in enumerate(zip(grans, betas, strict=True)):
        if len(rows) == 0:
            fits.append((torch.zeros(n_tok, dtype=torch.float64), beta))
            continue
        fits.append((scores[rows].mean(0) - design.indicators(g, rows).mean(0) @ beta, beta))
    return fits


def _adjusted_map(
    design: UnitDesign,
    scores: torch.Tensor,
    grans: list[np.ndarray],
    surrogate: str,
    envelope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased regression-adjusted map: masks in :data:`N_CROSS` parts; each part's masks
    contribute their residuals ``s - h(z)`` under the surrogate fitted on the other parts, plus
    the surrogate's exact conditional mean ``E[h | u occluded] = b0 + p sum(beta) + (1 - p)
    beta_u``; then the mean over occluding masks, as SPES."""
    order = np.sort(np.concatenate(grans))
    part = np.empty(int(order.max()) + 1 if order.size else 0, dtype=np.int64)
    part[order] = np.arange(order.size) % N_CROSS
    parts, offsets = [[] for _ in grans], [[] for _ in grans]
    for k in range(N_CROSS):
        fit = [rows[part[rows] != k] for rows in grans]
        own = [rows[part[rows] == k] for rows in grans]
        for g, (b0, beta) in enumerate(_fit(design, scores, fit, surrogate, envelope)):
            z = design.indicators(g, own[g])
            parts[g].append((own[g], scores[own[g]] - b0 - z @ beta))
            offsets[g].append(b0 + design.p * beta.sum(0) + (1 - design.p) * beta)
    num = occ = None
    for k in range(N_CROSS):
        n_k, o_k = _sums(design, [p[k] for p in parts], [o[k] for o in offsets])
        num, occ = (n_k, o_k) if num is None else (num + n_k, occ + o_k)
    return _ratio(num, occ)

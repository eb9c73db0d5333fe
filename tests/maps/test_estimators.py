"""SM_X/SM_H estimators (xattn_utils.maps.estimators) on toy additive models with known effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xattn_utils.maps.estimators import UnitDesign, estimate, fold_maps
from xattn_utils.maps.masks import MaskSampler
from xattn_utils.maps.perturbation import ESTIMATORS, PerturbationError, PerturbationOptions

T, F = 120, 12  # toy spectrogram: mel_frames x mel_bins


def _labels() -> list[np.ndarray]:
    a = np.arange(T)[:, None] // 3 * 4 + np.arange(F)[None, :] // 3
    b = np.arange(T)[:, None] // 4 * 3 + np.arange(F)[None, :] // 4
    return [np.unique(x, return_inverse=True)[1].reshape(x.shape) for x in (a, b)]


def _effects(seed: int = 0) -> np.ndarray:
    """Cell effects (tokens, T, F): each token depends on its own stretch of time."""
    rng = np.random.default_rng(seed)
    gamma = 0.002 * rng.standard_normal((3, T, F))
    for t, c in enumerate((25, 60, 95)):
        gamma[t, c - 8 : c + 8, 2:10] += rng.uniform(0.5, 1.5, (16, 8))
    return gamma


def _scores(sampler: MaskSampler, gamma: np.ndarray, noise: float, seed: int) -> torch.Tensor:
    n = sampler.n_masks
    masks = sampler.masks(0, n).reshape(n, -1).double()
    gen = torch.Generator().manual_seed(seed)
    eps = noise * torch.randn(n, gamma.shape[0], generator=gen, dtype=torch.float64)
    return masks @ torch.from_numpy(gamma.reshape(gamma.shape[0], -1)).T + eps


def _truth(gamma: np.ndarray) -> torch.Tensor:
    """The exact SPES map of the additive toy: per granularity E[s] + (1 - p) beta_u, averaged
    over the (equally used) granularities; beta_u = sum of the unit's cell effects."""
    labels = _labels()
    out = 0
    g = torch.from_numpy(gamma.reshape(gamma.shape[0], -1))
    for lab in labels:
        flat = torch.from_numpy(lab.reshape(-1))
        beta = torch.zeros(g.shape[0], int(flat.max()) + 1, dtype=torch.float64)
        beta.index_add_(1, flat, g)
        out = out + g.sum(1, keepdim=True) * 0.5 + 0.5 * beta[:, flat]
    return out / len(labels)


def _r(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a.numpy(), b.numpy(), strict=True)])
    )


def test_mean_estimator_equals_spes_accumulation():
    from xattn_utils.maps.perturbation import accumulate

    sampler = MaskSampler(_labels(), 64, design="iid", seed=3)
    scores = _scores(sampler, _effects(), 0.1, 0)
    stats = accumulate(sampler, scores)
    assert torch.allclose(estimate(sampler, scores, estimator="mean"), stats.saliency())
    full, halves = fold_maps(sampler, scores)
    assert torch.allclose(halves[1], stats.saliency([1]))


@pytest.mark.parametrize(
    "estimator", ["grid", "ridge", "lasso", "grid-adjusted", "ridge-adjusted", "lasso-adjusted"]
)
def test_joint_estimators_recover_known_effects_better_than_mean(estimator):
    gamma = _effects()
    truth = _truth(gamma)
    sampler = MaskSampler(_labels(), 256, design="iid", seed=1)
    scores = _scores(sampler, gamma, 0.3, 1)
    r_mean = _r(estimate(sampler, scores, estimator="mean"), truth)
    r_joint = _r(estimate(sampler, scores, estimator=estimator), truth)
    assert r_joint > 0.9
    assert r_joint > r_mean + 0.05


def test_adjusted_estimator_is_unbiased_over_seeds():
    """The mean over seeds of the adjusted map converges on the exact map (the ridge's is
    allowed a shrinkage bias); checked against the mean estimator's own Monte Carlo error."""
    gamma = _effects()
    truth = _truth(gamma)
    maps = {"ridge-adjusted": [], "grid-adjusted": [], "lasso-adjusted": [], "mean": []}
    for seed in range(24):
        sampler = MaskSampler(_labels(), 48, design="iid", seed=100 + seed)
        scores = _scores(sampler, gamma, 0.3, seed)
        for name in maps:
            maps[name].append(estimate(sampler, scores, estimator=name))
    err = {k: (torch.stack(v).mean(0) - truth).abs().mean().item() for k, v in maps.items()}
    spread = torch.stack(maps["mean"]).std(0).mean().item() / np.sqrt(24)
    for name in ("ridge-adjusted", "grid-adjusted", "lasso-adjusted"):
        assert err[name] < 1.5 * spread
    for name in ("ridge-adjusted", "grid-adjusted"):  # lasso's 36-mask cross-fits add variance
        assert err[name] < err["mean"]


def test_planted_ca_like_prior_does_not_move_the_adjusted_map():
    """A wrong outside envelope (a CA-like diagonal: token t at the other tokens' places)
    changes the adjusted estimator's variance, not its expected map; the biased estimators
    refuse an outside envelope."""
    gamma = _effects()
    truth = _truth(gamma)
    sampler0 = MaskSampler(_labels(), 48, design="iid", seed=0)
    n_bins = UnitDesign(sampler0).n_bins
    wrong = torch.zeros(n_bins, 3, dtype=torch.float64)
    for t, c in enumerate((95, 25, 60)):  # every token pointed at another token's stretch
        wrong[c // 8 - 1 : c // 8 + 2, t] = 1.0
    planted = []
    for seed in range(24):
        sampler = MaskSampler(_labels(), 48, design="iid", seed=200 + seed)
        scores = _scores(sampler, gamma, 0.3, seed)
        planted.append(estimate(sampler, scores, estimator="ridge-adjusted", envelope=wrong))
    avg = torch.stack(planted).mean(0)
    wrong_cells = torch.zeros(3, T, F, dtype=torch.float64)
    for t, c in enumerate((95, 25, 60)):
        wrong_cells[t, c - 8 : c + 8] = 1.0
    # the expected map stays on the truth (within its Monte Carlo error) and its deviation
    # does not lean towards the planted places
    stderr = torch.stack(planted).std(0) / np.sqrt(len(planted))
    assert (avg - truth).abs().mean() < 1.5 * stderr.mean()
    assert abs(_r(avg - truth, wrong_cells.reshape(3, -1))) < 0.1
    for name in ("ridge", "grid", "bins", "mean", "lasso", "lasso-adjusted"):
        with pytest.raises(PerturbationError, match="envelope"):
            estimate(sampler0, _scores(sampler0, gamma, 0.3, 0), estimator=name, envelope=wrong)


def test_lasso_finds_few_strong_cells_where_mean_and_grid_smear_them():
    """Effects on a handful of scattered grid cells (no time envelope to lean on): the sparse fit
    recovers them from few masks better than the mean over masks and the envelope-shrunk grid."""
    rng = np.random.default_rng(7)
    gamma = 0.002 * rng.standard_normal((3, T, F))
    for t in range(3):
        for _ in range(4):
            c, f = rng.integers(0, T // 2) * 2, rng.integers(0, F // 8) * 8
            gamma[t, c : c + 2, f : f + 8] += rng.uniform(0.5, 1.5)
    truth = _truth(gamma)
    sampler = MaskSampler(_labels(), 192, design="iid", seed=4)
    scores = _scores(sampler, gamma, 0.3, 4)
    r = {e: _r(estimate(sampler, scores, estimator=e), truth) for e in ("mean", "grid", "lasso")}
    assert r["lasso"] > 0.9
    assert r["lasso"] > r["mean"] + 0.05 and r["lasso"] > r["grid"]


def test_folds_use_only_their_own_masks():
    sampler = MaskSampler(_labels(), 64, design="iid", seed=5)
    scores = _scores(sampler, _effects(), 0.3, 5)
    _, halves = fold_maps(sampler, scores, estimator="ridge")
    changed = scores.clone()
    fold = sampler.fold(np.arange(64))
    changed[fold == 1] += torch.randn(int((fold == 1).sum()), 3, dtype=torch.float64)
    _, halves2 = fold_maps(sampler, changed, estimator="ridge")
    assert torch.equal(halves[0], halves2[0])
    assert not torch.equal(halves[1], halves2[1])


def test_options_reject_unknown_or_mismatched_estimators():
    assert set(ESTIMATORS) >= {"mean", "ridge", "ridge-adjusted"}
    with pytest.raises(PerturbationError, match="unknown estimator"):
        PerturbationOptions(estimator="lasso-ish")

"""The SPES estimator on toy score functions (no model): planted signals, unbiasedness, the
control variate, replays, batch sizes, bad options."""

import logging

import numpy as np
import pytest
import torch

from xattn_utils.maps.masks import MaskSampler, frame_groups
from xattn_utils.maps.perturbation import (
    DESIGNS,
    PAIRED,
    PerturbationError,
    PerturbationOptions,
    accumulate,
    run_masks,
)

# --- the estimator on toy score functions (no model) -------------------------------------


def _blocks(n_time: int, n_freq: int, width: int) -> np.ndarray:
    """Label map of (width x n_freq/2) blocks over a (time, freq) grid."""
    t, f = np.meshgrid(np.arange(n_time), np.arange(n_freq), indexing="ij")
    return (t // width) * 2 + (f >= n_freq // 2)


@pytest.mark.parametrize("design", DESIGNS)
def test_planted_dependency_is_found(design):
    """Token i's score depends only on cells in time span i: its map peaks there."""
    n_time, n_freq, n_tokens = 60, 8, 4
    spans = [(5, 15), (20, 25), (30, 45), (50, 58)]
    labels = [_blocks(n_time, n_freq, w) for w in (2, 3, 5)]
    sampler = MaskSampler(labels, 600, design=design, seed=1)

    def score_fn(masks):
        occ = masks.float()
        return torch.stack([occ[:, a:b].mean((1, 2)) for a, b in spans], dim=1)

    stats = run_masks(score_fn, sampler, n_tokens, batch_size=32, progress=False)
    sm = stats.saliency().reshape(n_tokens, n_time, n_freq)
    profile = sm.mean(-1)  # (tokens, time)
    for i, (a, b) in enumerate(spans):
        assert a <= int(profile[i].argmax()) < b  # pointing game: 4/4 hits
        outside = torch.cat([profile[i, :a], profile[i, b:]])
        assert profile[i, a:b].min() > outside.max()  # every in-span frame beats every other


@pytest.mark.parametrize("design", DESIGNS)
def test_estimator_unbiased_on_linear_model(design):
    """score = w . occ + noise, units of 1 and 2 cells in turn: E[score | c occluded] = w_c +
    p sum_{c2 != c} w_c2 + (1 - p) w_pair / 2 (c's pair partner is occluded with it in half of
    the masks), under every design. The mean of 40 seeds' maps matches within 4 standard errors."""
    n_cells = 24
    p = 0.5 if design in PAIRED else 0.3
    w = torch.linspace(0, 1, n_cells).double() ** 2
    pair = w.reshape(-1, 2).flip(1).reshape(-1)
    expected = w + p * (w.sum() - w) + (1 - p) * pair / 2
    w = w.reshape(1, -1)
    labels = [np.arange(n_cells), np.arange(n_cells) // 2]
    maps = []
    for seed in range(40):
        sampler = MaskSampler(labels, 400, p=p, design=design, seed=seed)
        noise = torch.Generator().manual_seed(1000 + seed)

        def score_fn(m, noise=noise):
            return m.double() @ w.T + 0.3 * torch.randn(m.shape[0], 1, generator=noise).double()

        maps.append(run_masks(score_fn, sampler, 1, batch_size=400, progress=False).saliency()[0])
    maps = torch.stack(maps)
    se = maps.std(0) / len(maps) ** 0.5
    assert float(((maps.mean(0) - expected).abs() / se).max()) < 4.0


def test_control_variate_cuts_the_noise_of_a_linear_model():
    """Where the score is (nearly) linear in the occluded share of time, the control variate
    removes most of the Monte Carlo noise: smaller error than plain SPES on the same masks."""
    n_time, n_freq = 80, 6
    labels = [_blocks(n_time, n_freq, w) for w in (1, 2, 4)]
    w = torch.rand(1, n_time, n_freq, generator=torch.Generator().manual_seed(0)).double()
    w = w.reshape(1, -1)
    plain, controlled = [], []
    for seed in range(5):
        sampler = MaskSampler(labels, 256, design="iid", seed=seed)
        stats = run_masks(lambda m: m.reshape(m.shape[0], -1).double() @ w.T, sampler, 1,
                          batch_size=256, progress=False)  # fmt: skip
        exact = MaskSampler(labels, 40000, design="iid", seed=99)
        plain.append(stats.saliency())
        controlled.append(accumulate(sampler, stats.scores, control=True).saliency())
    truth = run_masks(lambda m: m.reshape(m.shape[0], -1).double() @ w.T, exact, 1,
                      batch_size=4000, progress=False).saliency()  # fmt: skip
    err_plain = torch.stack([(m - truth).pow(2).mean() for m in plain]).mean()
    err_cv = torch.stack([(m - truth).pow(2).mean() for m in controlled]).mean()
    assert err_cv < 0.5 * err_plain


def test_a_controlled_run_keeps_raw_scores_and_replays_to_itself():
    labels = [frame_groups(40, w) for w in (1, 2)]
    sampler = MaskSampler(labels, 64, design="antithetic-control", seed=4)
    w = torch.randn(2, 40, generator=torch.Generator().manual_seed(2)).double()
    stats = run_masks(lambda m: m.double() @ w.T, sampler, 2, batch_size=16, progress=False)
    torch.testing.assert_close(stats.scores, sampler.masks(0, 64).double() @ w.T)
    replay = accumulate(sampler, stats.scores, control=True)
    torch.testing.assert_close(replay.saliency(), stats.saliency())


def test_maps_of_fewer_masks_replay_without_forwards():
    sampler = MaskSampler([frame_groups(30, 2)], 64, seed=2)
    w = torch.randn(2, 30, generator=torch.Generator().manual_seed(1)).double()
    full = run_masks(lambda m: m.double() @ w.T, sampler, 2, batch_size=8, progress=False)
    first = MaskSampler([frame_groups(30, 2)], 24, seed=2)
    ref = run_masks(lambda m: m.double() @ w.T, first, 2, batch_size=8, progress=False)
    torch.testing.assert_close(accumulate(sampler, full.scores, stop=24).saliency(),
                               ref.saliency())  # fmt: skip


def test_batch_size_does_not_change_result():
    sampler = MaskSampler([frame_groups(50, 3)], 40, seed=5)
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).double()

    def score_fn(m):
        return m.double() @ w.T

    a = run_masks(score_fn, sampler, 3, batch_size=1, progress=False).saliency()
    b = run_masks(score_fn, sampler, 3, batch_size=16, progress=False).saliency()
    torch.testing.assert_close(a, b)


def test_out_of_memory_retries_with_smaller_batch(caplog):
    sampler = MaskSampler([frame_groups(20, 2)], 24, seed=0)
    w = torch.arange(20.0).reshape(1, -1).double()
    calls = []

    def score_fn(masks):
        calls.append(masks.shape[0])
        if masks.shape[0] > 2:
            raise torch.OutOfMemoryError("fake OOM")
        return masks.double() @ w.T

    with caplog.at_level(logging.WARNING):
        stats = run_masks(score_fn, sampler, 1, batch_size=8, progress=False)
    assert "out of memory" in caplog.text and "batch_size=2" in caplog.text
    assert int(stats.count.sum()) == 24 and max(calls[-3:]) == 2
    ref = run_masks(lambda m: m.double() @ w.T, sampler, 1, batch_size=24, progress=False)
    torch.testing.assert_close(stats.saliency(), ref.saliency())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_masks": 0}, "n_masks"),
        ({"p": 1.0}, "between 0 and 1"),
        ({"p": 0.0}, "between 0 and 1"),
        ({"scorer": "l2"}, "unknown scorer"),
        ({"design": "sobol"}, "unknown mask design"),
        ({"design": "antithetic", "p": 0.3}, "antithetic"),
        ({"p": 0.3}, "needs p = 0.5.*design='control' or 'iid'"),  # the default design pairs
        ({"enc_mask_factor": 0}, "enc_mask_factor"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(PerturbationError, match=match):
        PerturbationOptions(**kwargs)

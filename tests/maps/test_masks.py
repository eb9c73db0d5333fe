"""Occlusion masks: SPES's segment counts, SLIC label maps, the sampler's occlusion rates."""

import numpy as np
import pytest
import torch

from xattn_utils.maps.masks import MaskSampler, frame_groups, segment_counts, slic_segments
from xattn_utils.maps.perturbation import DESIGNS, PAIRED, run_masks


@pytest.mark.parametrize("design", DESIGNS)
def test_every_cell_occluded_at_rate_p(design):
    labels = [frame_groups(100, w) for w in (1, 2, 4)]
    sampler = MaskSampler(labels, 1200, p=0.5, design=design, seed=0)
    stats = run_masks(
        lambda m: torch.zeros(m.shape[0], 1), sampler, 1, batch_size=64, progress=False
    )
    rate = stats.occlusion_rate()
    assert abs(float(rate.mean()) - 0.5) < 0.01
    assert float((rate - 0.5).abs().max()) < 0.07  # 4.8 sigma for 1200 Bernoulli(0.5) draws
    if design in PAIRED:  # pairs complement each other: exactly half
        torch.testing.assert_close(rate, torch.full_like(rate, 0.5), atol=1e-9, rtol=0)


def test_segment_counts_scale_with_length_and_cap():
    assert segment_counts(500, (2000, 2500)) == [2000, 2500]
    assert segment_counts(250, (2000,)) == [1000]
    assert segment_counts(3000, (2000,)) == [3000]  # capped at 7.5 s


def test_slic_labels_are_contiguous_ids():
    spec = np.random.default_rng(0).normal(size=(120, 80))
    labels = slic_segments(spec, 300)
    assert labels.shape == spec.shape and labels.min() == 0
    assert set(np.unique(labels)) == set(range(labels.max() + 1))

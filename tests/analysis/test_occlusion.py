"""Occluding encoder frames: frame orders, deletion and insertion masks, the curves' options, and
the errors of bad maps (toy probability functions), and the model's probabilities of occluded
inputs (random-tiny)."""

from __future__ import annotations

import math

import pytest
import torch

from xattn_utils.analysis.occlusion import (
    RANDOM,
    FaithfulnessError,
    FaithfulnessOptions,
    curve_probabilities,
    frame_probability_fn,
    occlusions,
    probability_fn,
    rank_frames,
    step_frames,
)
from xattn_utils.audio import n_enc_frames, n_mel_frames
from xattn_utils.maps.saliency import explain
from xattn_utils.model.decode import features


def test_rank_frames_puts_high_values_first_and_nan_last():
    values = torch.tensor([0.1, math.nan, 0.9, 0.5, 0.9])
    order = rank_frames(values, torch.Generator().manual_seed(0))
    assert sorted(order[:2].tolist()) == [2, 4] and order[2:].tolist() == [3, 0, 1]
    ties = {tuple(rank_frames(values, torch.Generator().manual_seed(s))[:2].tolist())
            for s in range(8)}  # fmt: skip
    assert ties == {(2, 4), (4, 2)}  # ties in seeded random order


def test_step_frames_are_whole_and_never_empty_or_full():
    assert step_frames(10, (0.01, 0.25, 0.99)) == [1, 2, 9]
    with pytest.raises(FaithfulnessError, match="at least 2 encoder frames"):
        step_frames(1, (0.5,))


def test_deletion_and_insertion_of_one_order_are_complements():
    gen = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(30, generator=gen) for _ in range(5)])
    ks = [1, 7, 15, 29]
    occ = occlusions(orders, ks)
    assert occ.shape == (5, 2, len(ks), 30) and occ.dtype == torch.bool
    assert torch.equal(occ[:, 0], ~occ[:, 1])
    for j in range(5):
        for s, k in enumerate(ks):
            expected = torch.zeros(30, dtype=torch.bool)
            expected[orders[j, :k]] = True  # deletion occludes exactly the first k frames
            assert torch.equal(occ[j, 0, s], expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": (0.0, 0.5)}, "fractions"),
        ({"fractions": (0.5, 0.2)}, "strictly increasing"),
        ({"fractions": (0.2, 0.2)}, "strictly increasing"),
        ({"fractions": (0.5, 1.0)}, "fractions"),
        ({"fractions": ()}, "fractions"),
        ({"fractions": ("a",)}, "fractions must be numbers"),
        ({"n_random": 0}, "n_random"),
        ({"n_random": 1.5}, "n_random"),
        ({"n_random": True}, "n_random"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(FaithfulnessError, match=match):
        FaithfulnessOptions(**kwargs)


def test_options_take_lists_and_key_only_what_changes_curves():
    options = FaithfulnessOptions(fractions=[0.1, 0.5], batch_size=8)
    assert options.fractions == (0.1, 0.5)
    assert options.params() == {"fractions": [0.1, 0.5], "n_random": 2, "max_tokens": None}


def test_bad_maps_name_the_problem():
    special = (True, False, False, True)  # a prompt, 2 text tokens, end-of-text

    def probs(occluded):
        return torch.zeros(len(occluded), 4)

    good = torch.rand(4, 20)
    cases = [
        ({"CA": good, "SM_X": torch.rand(4, 40, 80)}, "map 'SM_X' has shape"),
        ({"CA": good, "SM_H": torch.rand(3, 20)}, "map 'SM_H' has shape"),
        ({"CA": good, "SM_H": torch.rand(4, 21)}, "map 'SM_H' has shape"),
        ({RANDOM: good}, "rename that map"),
        ({}, "no maps"),
        ({"CA": torch.rand(4, 1)}, "at least 2 encoder frames"),
        ({"SM_X": torch.rand(4, 20, 80), "CA": good}, "map 'SM_X' has shape"),
        ({"CA": torch.rand(20)}, "map 'CA' has shape"),
    ]
    for maps, match in cases:
        with pytest.raises(FaithfulnessError, match=match):
            curve_probabilities(probs, maps, special)
    with pytest.raises(FaithfulnessError, match=r"probs returned \(1, 4\) for 4 inputs"):
        curve_probabilities(lambda o: torch.zeros(1, 4), {"CA": good}, special)


def test_frame_weights_of_zero_and_one_are_deletion_forwards(tiny, tone):
    """Weights 1 keep a frame, 0 occlude it exactly as the deletion curves do."""
    tr = explain(tiny, tone, text="hello there world", method="saliency").transcript
    mel, n_mel, n_enc = features(tiny, tone), n_mel_frames(tone), n_enc_frames(tone)
    occluded = torch.zeros(2, n_enc, dtype=torch.bool)
    occluded[1, 10:40] = True
    expected = probability_fn(tiny, mel, tr, n_mel)(occluded).double()
    got = frame_probability_fn(tiny, mel, tr, n_mel)((~occluded).double())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)

"""SPES as a Captum attribution: the package's own SPES on Whisper, planted dependencies on toy
models, Captum's infidelity and sensitivity_max on it, bad parameters."""

import dataclasses

import numpy as np
import pytest
import torch
from captum.metrics import infidelity, sensitivity_max

from xattn_utils.audio import n_mel_frames
from xattn_utils.captum import SPES, mel_forward
from xattn_utils.maps.masks import segment_counts
from xattn_utils.maps.perturbation import PerturbationError, PerturbationOptions
from xattn_utils.maps.prepare import prepare
from xattn_utils.maps.spes import input_spes_run

TEXT = "hello there world"


@pytest.mark.parametrize(
    ("design", "estimator", "scorer"),
    [("iid", "mean", "kl"), ("antithetic-control", "mean", "kl"), ("iid", "grid", "kl"),
     ("iid", "mean", "prob_drop")],
)  # fmt: skip
def test_equals_the_package_spes_on_whisper(tiny, tone, design, estimator, scorer):
    """Same masks (seed, SLIC segments), same batches of forwards: the package's SM_X of every
    token, bit for bit."""
    mf = mel_forward(tiny, tone, text=TEXT, output="kl" if scorer == "kl" else "probability")
    tr, n_mel = mf.transcript, n_mel_frames(tone)
    grans = (200, 300)
    options = PerturbationOptions(n_masks=8, granularities=grans, design=design,
                                  estimator=estimator, scorer=scorer, batch_size=4)  # fmt: skip
    prepared = dataclasses.replace(
        prepare(tiny, tone, text=TEXT), logits=mf.logits
    )  # the same reference
    assert prepared.transcript == tr
    run = input_spes_run(tiny, prepared, options=options, seed=3, progress=False)
    expected = run.maps()[0]
    n_tok = len(tr)
    got = SPES(mf.forward_func).attribute(
        mf.inputs.expand(n_tok, -1, -1), target=list(range(n_tok)), baselines=mf.baselines,
        n_masks=8, design=design, estimator=estimator, n_segments=segment_counts(n_mel, grans),
        seed=3, perturbations_per_eval=4,
    )  # fmt: skip
    assert got.shape == expected.shape == (n_tok, n_mel, 80)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # bit for bit


def test_one_token_at_a_time_equals_all_at_once(tiny, tone):
    mf = mel_forward(tiny, tone, text=TEXT)
    spes = SPES(mf.forward_func)
    kw = dict(baselines=mf.baselines, n_masks=4, n_segments=[60], seed=1)
    all_tokens = spes.attribute(mf.inputs.expand(len(mf.transcript), -1, -1),
                                target=list(range(len(mf.transcript))), **kw)  # fmt: skip
    one = spes.attribute(mf.inputs, target=2, **kw)
    torch.testing.assert_close(one[0], all_tokens[2])


# -- any model Captum takes ---------------------------------------------------------------------


def _additive(w: torch.Tensor):
    return lambda x: x.reshape(x.shape[0], -1) @ w


def test_additive_model_gives_the_closed_form():
    """f = w . x, baseline 0, x = 1: the mean drop over masks occluding j is
    w_j + p * sum_{k != j} w_k."""
    w = torch.zeros(12, dtype=torch.float64)
    w[7], w[2] = 3.0, 1.0
    x = torch.ones(1, 12, dtype=torch.float64)
    attr = SPES(_additive(w)).attribute(x, n_masks=4000, p=0.5, seed=0)
    expected = w + 0.5 * (w.sum() - w)
    assert attr.shape == x.shape
    assert int(attr.argmax()) == 7
    torch.testing.assert_close(attr[0], expected, atol=0.1, rtol=0)


def test_planted_region_is_found_in_an_image_classifier():
    """An nn.Module with two class logits; class 1 reads a square: SLIC segments, target 1."""
    gen = torch.Generator().manual_seed(0)
    image = 0.1 * torch.rand(2, 16, 16, generator=gen)
    image[:, 4:8, 9:13] += 1.0

    class Model(torch.nn.Module):
        def forward(self, x):
            square = x[:, 4:8, 9:13].sum((1, 2))
            return torch.stack([x.sum((1, 2)) - square, 2.0 * square], dim=1)

    attr = SPES(Model()).attribute(image, target=1, n_masks=64, n_segments=[12, 24], seed=0)
    assert attr.shape == image.shape
    for a in attr:
        inside = a[4:8, 9:13].mean()
        outside = torch.cat([a[:4].reshape(-1), a[8:].reshape(-1)]).mean()
        assert inside > outside + 1.0


def test_tuple_inputs_equal_one_concatenated_input():
    """Captum numbers features across the inputs of a tuple: the same features on one tensor
    give the same attribution."""
    w = torch.arange(10, dtype=torch.float64)
    x = torch.rand(3, 10, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 2, 3, 3, 4, 5, 5]])
    one = SPES(_additive(w)).attribute(x, feature_mask=mask, n_masks=50, seed=2)
    a, b = SPES(lambda u, v: _additive(w)(torch.cat([u, v], 1))).attribute(
        (x[:, :4], x[:, 4:]), feature_mask=(mask[:, :4], mask[:, 4:]), n_masks=50, seed=2
    )
    torch.testing.assert_close(torch.cat([a, b], 1), one)


def test_additional_forward_args_and_per_example_targets():
    x = torch.rand(2, 6, dtype=torch.float64)
    scale = torch.tensor([[1.0], [10.0]], dtype=torch.float64)
    f = lambda x, scale: torch.stack([x[:, 0], x[:, 5]], 1) * scale  # noqa: E731
    attr = SPES(f).attribute(x, target=[0, 1], additional_forward_args=(scale,), n_masks=40)
    assert int(attr[0].argmax()) == 0 and int(attr[1].argmax()) == 5
    assert attr[1, 5] == pytest.approx(10 * x[1, 5].item())


# -- Captum's metrics ---------------------------------------------------------------------------


def test_infidelity_and_sensitivity_run_on_it():
    """On an additive model SPES's map is the exact per-feature effect times (1 - p) plus a
    constant (p times the total effect), which infidelity (normalised: scale-free, but not
    shift-free) still charges: below random attributions, not 0."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1, generator=gen, dtype=torch.float64)
    model = _additive(w)
    x = torch.rand(8, 16, generator=gen, dtype=torch.float64) + 0.5
    spes = SPES(model)
    attr = spes.attribute(x, target=0, n_masks=4000, seed=0)

    def perturb(inputs):  # occlude a random half: the perturbation is the indicator (as SPES's)
        drop = (torch.rand(inputs.shape, generator=gen, dtype=inputs.dtype) < 0.5).to(inputs)
        return drop, inputs - drop * inputs

    random_attr = torch.randn(attr.shape, generator=gen, dtype=attr.dtype)
    ours = infidelity(model, perturb, x, attr, target=0, n_perturb_samples=50, normalize=True)
    floor = infidelity(model, perturb, x, random_attr, target=0, n_perturb_samples=50,
                       normalize=True)  # fmt: skip
    assert ours.shape == floor.shape == (8,)
    assert torch.isfinite(ours).all()
    assert ours.mean() < floor.mean()
    effects = attr - 0.5 * model(x)  # the map minus p * total effect: (1 - p) * w_j x_j
    exact = infidelity(model, perturb, x, effects, target=0, n_perturb_samples=50,
                       normalize=True)  # fmt: skip
    assert exact.mean() < 0.2 * floor.mean()
    sens = sensitivity_max(spes.attribute, x, target=0, n_masks=50, n_perturb_samples=3)
    assert sens.shape == (8,) and torch.isfinite(sens).all() and (sens >= 0).all()


# -- bad parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_masks": 0}, "n_masks"),
        ({"p": 1.5}, "p must lie"),
        ({"design": "sobol"}, "unknown mask design"),
        ({"estimator": "magic"}, "unknown estimator"),
        ({"estimator": "grid", "design": "antithetic"}, "design='iid'"),
        ({"perturbations_per_eval": 0}, "perturbations_per_eval"),
        ({"feature_mask": torch.zeros(1, 5, dtype=torch.long)}, "does not broadcast"),
        ({"feature_mask": torch.zeros(1, 6)}, "integer labels"),
        ({"baselines": torch.zeros(3)}, "does not broadcast"),
        ({"target": [0, 1, 0]}, "3 targets for 2 examples"),
        ({"n_segments": [4]}, "2-D examples"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, message):
    x = torch.rand(2, 6)
    with pytest.raises(PerturbationError, match=message):
        SPES(lambda x: x.sum(1)).attribute(x, **kwargs)


def test_a_forward_with_several_outputs_needs_a_target():
    with pytest.raises(PerturbationError, match="give a target"):
        SPES(lambda x: x * 2).attribute(torch.rand(2, 6), n_masks=4)
    with pytest.raises(PerturbationError, match="one output"):
        SPES(lambda x: x.sum()).attribute(torch.rand(2, 6), n_masks=4)
    with pytest.raises(PerturbationError, match="example"):
        SPES(lambda x: x).attribute(torch.rand(6), n_masks=4)
    assert np.isfinite(SPES(lambda x: x.sum(1)).attribute(torch.rand(2, 6), n_masks=4)).all()

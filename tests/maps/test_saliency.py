"""SPES-style perturbation and gradient saliency: planted signals, invariances, bad input."""

import logging

import numpy as np
import pytest
import torch

import xattn_utils as xu
from xattn_utils.maps.attention import forward_attention
from xattn_utils.maps.forwards import decoder_logits, encoder_score_fn, mel_score_fn
from xattn_utils.maps.gradients import captum_maps, gradient_maps, token_logprobs
from xattn_utils.maps.perturbation import (
    DESIGNS,
    PAIRED,
    MaskSampler,
    PerturbationError,
    PerturbationOptions,
    accumulate,
    frame_groups,
    kl_scores,
    run_masks,
    segment_counts,
    slic_segments,
)
from xattn_utils.maps.saliency import explain, list_methods
from xattn_utils.model.decode import decode, features
from xattn_utils.model.loading import attention_implementation

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


def test_segment_counts_scale_with_length_and_cap():
    assert segment_counts(500, (2000, 2500)) == [2000, 2500]
    assert segment_counts(250, (2000,)) == [1000]
    assert segment_counts(3000, (2000,)) == [3000]  # capped at 7.5 s


def test_slic_labels_are_contiguous_ids():
    spec = np.random.default_rng(0).normal(size=(120, 80))
    labels = slic_segments(spec, 300)
    assert labels.shape == spec.shape and labels.min() == 0
    assert set(np.unique(labels)) == set(range(labels.max() + 1))


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


# --- on the tiny random Whisper ------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny, tone):
    tr = decode(tiny, tone, text="hello there world")
    mel = features(tiny, tone)
    with torch.no_grad():
        _, logits = forward_attention(tiny, mel, tr)
    return tr, mel, logits


def test_scores_are_zero_when_nothing_is_occluded(tiny, setup):
    tr, mel, logits = setup
    assert float(kl_scores(torch.log_softmax(logits, -1), logits[None]).abs().max()) == 0.0
    with attention_implementation(tiny, "sdpa"), torch.no_grad():
        x = mel_score_fn(tiny, mel, tr, logits, 250)(torch.zeros(2, 250, 80, dtype=torch.bool))
        h = encoder_score_fn(tiny, mel, tr, logits, 125)(torch.zeros(2, 125, dtype=torch.bool))
    assert float(x.abs().max()) < 1e-4 and float(h.abs().max()) < 1e-4  # sdpa vs eager only
    assert tiny.model.config._attn_implementation == "eager"  # restored


def test_cached_cross_attention_equals_masked_decoder(tiny, setup):
    """SM_H's fast path (cross-attention K/V projected once, rows selected per mask) gives the
    same scores as rerunning the decoder on the masked encoder output."""
    tr, mel, logits = setup
    masks = torch.rand(3, 125, generator=torch.Generator().manual_seed(0)) < 0.5
    enc = tiny.model.model.encoder
    with attention_implementation(tiny, "sdpa"), torch.no_grad():
        fast = encoder_score_fn(tiny, mel, tr, logits, 125)(masks)
        h = enc(mel).last_hidden_state.expand(3, -1, -1).clone()
        h_silent = enc(torch.full_like(mel, float(mel.min()))).last_hidden_state
        h[:, :125] = torch.where(masks[..., None], h_silent[:, :125], h[:, :125])
        ids = torch.tensor([tr.input_ids]).expand(3, -1)
        plain = kl_scores(torch.log_softmax(logits, -1), decoder_logits(tiny, h, ids))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert float(plain.abs().max()) > 0


def test_explain_shapes_determinism_and_finiteness(tiny, tone):
    a = explain(tiny, tone, text="hello there world", n_masks=8, seed=1, progress=False)
    b = explain(tiny, tone, text="hello there world", n_masks=8, seed=1, progress=False)
    c = explain(tiny, tone, text="hello there world", n_masks=8, seed=2, progress=False)
    n_tok = len(a.tokens)
    assert a.input_saliency.shape == (n_tok, 250, 80)
    assert a.encoder_saliency.shape == (n_tok, 125)
    assert a.cross_attention.shape == (2, 4, n_tok, 125)
    assert a.input_saliency_folds.shape == (2, n_tok, 250, 80)
    for t in (a.input_saliency, a.encoder_saliency):
        assert torch.isfinite(t).all() and t.dtype == torch.float32
    torch.testing.assert_close(a.input_saliency, b.input_saliency, rtol=0, atol=0)
    torch.testing.assert_close(a.encoder_saliency, b.encoder_saliency, rtol=0, atol=0)
    assert not torch.equal(a.encoder_saliency, c.encoder_saliency)
    assert a.params["n_masks"] == 8 and a.method == "spes"
    frame = a.to_frame("encoder")
    assert len(frame) == n_tok * 125 and {"token", "time_s", "value"} <= set(frame.columns)


def test_explain_round_trips_through_tensors(tiny, tone):
    a = explain(tiny, tone, text="hello", n_masks=4, progress=False, utterance="u1")
    b = xu.saliency.Explanation.from_tensors(*a.to_tensors())
    assert b.tokens == a.tokens and b.params == a.params and b.utterance == "u1"
    torch.testing.assert_close(b.input_saliency, a.input_saliency)


def test_explain_bad_input(tiny, tone):
    with pytest.raises(ValueError, match="n_masks"):
        explain(tiny, tone, text="hello", n_masks=0)
    with pytest.raises(ValueError, match="empty"):
        explain(tiny, tone, text="", n_masks=4)
    with pytest.raises(ValueError, match="448"):
        explain(tiny, tone, text="word " * 500, n_masks=4)
    with pytest.raises(ValueError, match="unknown method"):
        explain(tiny, tone, text="hello", method="lime")
    assert "spes" in list_methods() and "integrated_gradients" in list_methods()


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_batched_gradients_equal_captum_per_token(tiny, setup, method):
    tr, mel, _ = setup
    sm_x, sm_h = gradient_maps(tiny, mel, tr, 3000, 1500, method=method, n_steps=4)
    ref_x, ref_h = captum_maps(tiny, mel, tr, method=method, n_steps=4, tokens=[1, 3])
    scale_x, scale_h = float(ref_x.abs().max()), float(ref_h.abs().max())
    torch.testing.assert_close(sm_x[[1, 3]], ref_x.transpose(1, 2), atol=1e-4 * scale_x, rtol=0)
    torch.testing.assert_close(sm_h[[1, 3]], ref_h, atol=1e-4 * scale_h, rtol=0)


def test_integrated_gradients_completeness(tiny, setup):
    """Sum of IG attributions = f(input) - f(baseline), per token, over input and encoder."""
    tr, mel, _ = setup
    sm_x, sm_h = gradient_maps(tiny, mel, tr, 3000, 1500, method="integrated_gradients", n_steps=32)
    of_mel, of_encoder = token_logprobs(tiny, tr)
    silent = torch.full_like(mel, float(mel.min()))
    with torch.no_grad():
        gap_x = (of_mel(mel) - of_mel(silent))[0]
        enc = tiny.model.model.encoder
        gap_h = (of_encoder(enc(mel).last_hidden_state) - of_mel(silent))[0]
    torch.testing.assert_close(
        sm_x.sum((1, 2)).double(), gap_x.double(), atol=0.02 * float(gap_x.abs().max()), rtol=0
    )
    torch.testing.assert_close(
        sm_h.sum(1).double(), gap_h.double(), atol=0.02 * float(gap_h.abs().max()), rtol=0
    )


def test_gradient_explain(tiny, tone):
    e = explain(tiny, tone, text="hello there", method="saliency", progress=False)
    assert e.input_saliency.shape[1:] == (250, 80) and e.encoder_saliency.shape[1] == 125
    assert (e.input_saliency >= 0).all() and e.input_saliency_folds is None

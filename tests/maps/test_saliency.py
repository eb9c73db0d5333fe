"""Saliency on the tiny random Whisper: SPES scores and explain, gradient maps against Captum,
bad input."""

import pytest
import torch

import xattn_utils as xu
from xattn_utils.maps.attention import forward_attention
from xattn_utils.maps.forwards import decoder_logits, encoder_score_fn, mel_score_fn
from xattn_utils.maps.gradients import captum_maps, gradient_maps, token_logprobs
from xattn_utils.maps.perturbation import (
    kl_scores,
)
from xattn_utils.maps.saliency import explain, list_methods
from xattn_utils.model.decode import decode, features
from xattn_utils.model.loading import attention_implementation

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

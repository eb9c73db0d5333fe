"""The masked forward's options: fill values, a shortened encoder window, precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xattn_utils.maps.attention import forward_attention
from xattn_utils.maps.forwards import (
    encode,
    fill_value,
    masked_mel_logits,
    mel_score_fn,
    window_frames,
)
from xattn_utils.maps.perturbation import PerturbationError, PerturbationOptions
from xattn_utils.model.decode import decode, features


@pytest.fixture(scope="module")
def utterance(tiny):
    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    tr = decode(tiny, audio, text="hello world")
    mel = features(tiny, audio)
    with torch.no_grad():
        _, logits = forward_attention(tiny, mel, tr)
    return tr, mel, logits


def test_encode_equals_transformers_encoder_on_the_full_window(tiny, utterance):
    _, mel, _ = utterance
    with torch.no_grad():
        ref = tiny.model.model.encoder(mel).last_hidden_state
        # the short path (positions cut to the length) on the whole window, forced
        enc = tiny.model.model.encoder
        h = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel))))
        h = h.permute(0, 2, 1) + enc.embed_positions.weight[: h.shape[-1]]
        for layer in enc.layers:
            h = layer(h, None)
        assert torch.allclose(enc.layer_norm(h), ref, atol=1e-5)
        assert torch.allclose(encode(tiny, mel), ref)
        assert encode(tiny, mel[..., :300]).shape == (1, 150, ref.shape[-1])


def test_unmasked_forward_reproduces_the_clean_scores(tiny, utterance):
    tr, mel, logits = utterance
    none = torch.zeros(2, 200, 80, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(masked_mel_logits(tiny, mel, tr, 200)(none)[0], logits, atol=1e-4)
        for window in (None, 0.5):  # a short window scores against its own clean output
            scores = mel_score_fn(tiny, mel, tr, logits, 200, encoder_window=window)(none)
            assert scores.abs().max() < 1e-5


def test_window_frames_and_fill_values(utterance):
    _, mel, _ = utterance
    assert window_frames(200, None) == 3000
    assert window_frames(201, 0.5) == 252 and window_frames(2990, 1.0) == 3000
    assert fill_value(mel, 200, "padding") == float(mel.min())
    assert fill_value(mel, 200, "zero") == 0.0
    assert fill_value(mel, 200, "mean") == pytest.approx(float(mel[..., :200].mean()))


def test_fill_changes_what_an_occluded_cell_holds(tiny, utterance):
    tr, mel, logits = utterance
    all_cells = torch.ones(1, 200, 80, dtype=torch.bool)
    with torch.no_grad():
        a = masked_mel_logits(tiny, mel, tr, 200, fill="padding")(all_cells)
        b = masked_mel_logits(tiny, mel, tr, 200, fill="zero")(all_cells)
    assert not torch.allclose(a, b)


def test_options_reject_bad_forward_settings():
    with pytest.raises(PerturbationError, match="fill"):
        PerturbationOptions(fill="noise")
    with pytest.raises(PerturbationError, match="precision"):
        PerturbationOptions(precision="int8")
    with pytest.raises(PerturbationError, match="encoder_window"):
        PerturbationOptions(encoder_window=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_maps_agree_with_fp32_on_cuda(tiny_cuda):
    """bf16 autocast of the masked forwards gives nearly the fp32 scores (CUDA only)."""
    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    tr = decode(tiny_cuda, audio, text="hello world")
    mel = features(tiny_cuda, audio)
    with torch.no_grad():
        _, logits = forward_attention(tiny_cuda, mel, tr)
        masks = torch.rand(16, 200, 80, generator=torch.Generator().manual_seed(0)) < 0.5
        ref = mel_score_fn(tiny_cuda, mel, tr, logits, 200)(masks)
        half = mel_score_fn(tiny_cuda, mel, tr, logits, 200, precision="bf16")(masks)
    r = np.corrcoef(ref.cpu().numpy().ravel(), half.cpu().numpy().ravel())[0, 1]
    assert r > 0.95

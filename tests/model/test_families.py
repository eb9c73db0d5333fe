"""Model families through one adapter: the tiny random Whisper and Speech2Text side by side.

Shapes carry each family's own time axes (Whisper 20 ms enc_frames cropped from a 30 s window,
Speech2Text 40 ms enc_frames of the audio alone), rows sum to 1, masked forwards batch exactly,
a planted dependency is found on the right frames, and checkpoints load from a folder.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers import Speech2TextFeatureExtractor

import xattn_utils as xu
from xattn_utils.analysis.compare import enc_factor
from xattn_utils.maps.attention import forward_attention
from xattn_utils.maps.forwards import encoder_score_fn, masked_mel_logits, mel_score_fn
from xattn_utils.maps.perturbation import PerturbationOptions
from xattn_utils.maps.prepare import Prepared
from xattn_utils.maps.spes import encoder_spes_run
from xattn_utils.model.decode import DecodeError, decode, features, prompt_ids
from xattn_utils.model.families import Speech2TextFamily, WhisperFamily
from xattn_utils.model.speech2text import special_tokens

TEXT = "The morning train was late."


@pytest.fixture(params=["tiny", "tiny_s2t"])
def loaded(request) -> xu.LoadedModel:
    return request.getfixturevalue(request.param)


def _expected_enc_frames(loaded: xu.LoadedModel, audio: np.ndarray) -> int:
    """Written out independently of the family code."""
    if isinstance(loaded.family, WhisperFamily):
        return math.ceil(audio.size / 160 / 2)  # 10 ms mel frames, stride 2
    n_mel = 1 + (audio.size - 400) // 160  # kaldi frames: 25 ms windows every 10 ms
    return math.ceil(math.ceil(n_mel / 2) / 2)  # two stride-2 convolutions


def test_each_model_has_its_family(tiny, tiny_s2t):
    assert isinstance(tiny.family, WhisperFamily) and tiny.family.enc_frame_seconds == 0.02
    assert isinstance(tiny_s2t.family, Speech2TextFamily)
    assert tiny_s2t.family.enc_frame_seconds == 0.04
    assert tiny.family.mel_frame_seconds == tiny_s2t.family.mel_frame_seconds == 0.01


def test_cross_attention_shape_times_and_row_sums(loaded, tone):
    ca = xu.cross_attention(loaded, tone, text=TEXT)
    n_enc = _expected_enc_frames(loaded, tone)
    cfg = loaded.model.config
    n_tok = len(ca.transcript)
    assert ca.scores.shape == (cfg.decoder_layers, cfg.decoder_attention_heads, n_tok, n_enc)
    assert ca.enc_frame_seconds == loaded.family.enc_frame_seconds
    assert ca.times[-1] < ca.duration <= ca.times[-1] + 2 * ca.enc_frame_seconds
    rows = ca.scores.sum(-1)
    if loaded.family.fixed_window:  # Whisper: rows sum to 1 over all 1500 enc_frames
        full = xu.cross_attention(loaded, tone, text=TEXT, crop=False).scores
        assert full.shape[-1] == 1500 and torch.allclose(full.sum(-1), torch.ones(1), atol=1e-4)
        assert bool((rows <= 1 + 1e-4).all())
    else:  # Speech2Text reads the utterance alone: rows sum to 1 over its enc_frames
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-4)


def test_cross_attention_equals_the_transformers_forward(tiny_s2t, tone):
    ca = xu.cross_attention(tiny_s2t, tone, text=TEXT)
    fe = Speech2TextFeatureExtractor(feature_size=80, num_mel_bins=80)
    x = fe(tone, sampling_rate=16000, return_tensors="pt").input_features
    ids = torch.tensor([ca.transcript.input_ids])
    with torch.no_grad():
        out = tiny_s2t.model(input_features=x, decoder_input_ids=ids, output_attentions=True)
    ref = torch.stack([a[0] for a in out.cross_attentions])
    torch.testing.assert_close(ca.scores, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_samples", [560, 719, 720, 16_000, 40_123])
def test_s2t_features_are_the_extractors_with_utterance_cmvn(tiny_s2t, n_samples):
    audio = np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32) * 0.1
    x = features(tiny_s2t, audio)
    fe = Speech2TextFeatureExtractor(feature_size=80, num_mel_bins=80)
    ref = fe(audio, sampling_rate=16000, return_tensors="pt").input_features.transpose(1, 2)
    torch.testing.assert_close(x, ref)
    assert x.shape == (1, 80, tiny_s2t.family.n_mel_frames(audio))
    if x.shape[-1] > 50:  # utterance CMVN: every bin has mean 0 and unit variance
        assert float(x.mean(-1).abs().max()) < 1e-3
        assert float((x.std(-1, unbiased=False) - 1).abs().max()) < 1e-2
    with torch.no_grad():
        h = tiny_s2t.family.encode(tiny_s2t, x)
    assert (
        h.shape[1] == tiny_s2t.family.n_enc_frames(audio) == _expected_enc_frames(tiny_s2t, audio)
    )


def test_s2t_rejects_audio_shorter_than_one_window(tiny_s2t):
    with pytest.raises(DecodeError, match="at least 560"):
        tiny_s2t.family.n_mel_frames(np.ones(559, dtype=np.float32))


def test_s2t_prompt_tokens_and_greedy_decoding(tiny_s2t, tone):
    assert prompt_ids(tiny_s2t) == [tiny_s2t.model.config.decoder_start_token_id]
    with pytest.raises(DecodeError, match="no language tokens"):
        prompt_ids(tiny_s2t, language="de")
    with pytest.raises(DecodeError, match="unknown task"):
        prompt_ids(tiny_s2t, task="summarise")
    tr = decode(tiny_s2t, tone, max_new_tokens=12)
    assert tr.output_ids[-1] == tiny_s2t.special.eot and tr.special[-1]
    assert not any(tiny_s2t.special.is_special(i) for i in tr.output_ids[:-1])
    forced = decode(tiny_s2t, tone, text=TEXT)
    assert "".join(forced.tokens[:-1]).strip() == TEXT  # word starts carry their space


def test_explain_shapes(loaded, tone):
    result = xu.explain(loaded, tone, text=TEXT, n_masks=8, progress=False)
    n_tok, n_enc = len(result.transcript), _expected_enc_frames(loaded, tone)
    n_mel = loaded.family.n_mel_frames(tone)
    assert result.input_saliency.shape == (n_tok, n_mel, 80)
    assert result.encoder_saliency.shape == (n_tok, n_enc)
    assert result.cross_attention.shape[2:] == (n_tok, n_enc)
    assert result.enc_frame_seconds == loaded.family.enc_frame_seconds
    assert torch.isfinite(result.input_saliency).all()
    back = xu.Explanation.from_tensors(*result.to_tensors())
    assert back.enc_frame_seconds == result.enc_frame_seconds
    grads = xu.explain(loaded, tone, text=TEXT, method="input_x_gradient", progress=False)
    assert grads.input_saliency.shape == result.input_saliency.shape
    assert grads.encoder_saliency.shape == result.encoder_saliency.shape


@pytest.fixture
def clean(loaded, tone):
    tr = decode(loaded, tone, text=TEXT)
    x = features(loaded, tone)
    with torch.no_grad():
        _, logits = forward_attention(loaded, x, tr)
    return loaded, tr, x, logits


def test_masked_forwards_batched_equal_looped(clean, tone):
    loaded, tr, x, logits = clean
    n_mel, n_enc = loaded.family.n_mel_frames(tone), loaded.family.n_enc_frames(tone)
    gen = torch.Generator().manual_seed(0)
    cells = torch.rand(3, n_mel, 80, generator=gen) < 0.5
    frames = torch.rand(3, n_enc, generator=gen) < 0.5
    with torch.no_grad():
        f = masked_mel_logits(loaded, x, tr, n_mel)
        g = encoder_score_fn(loaded, x, tr, logits, n_enc)
        batched, looped = f(cells), torch.cat([f(m[None]) for m in cells])
        torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4)
        batched, looped = g(frames), torch.cat([g(m[None]) for m in frames])
        torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
        assert float(batched.abs().max()) > 0
        nothing = mel_score_fn(loaded, x, tr, logits, n_mel)(torch.zeros_like(cells[:1]))
        assert float(nothing.abs().max()) < 1e-4


def test_s2t_planted_dependency_is_found_on_its_enc_frames(tiny_s2t):
    """Without encoder self-attention (out_proj zeroed) an enc_frame sees only its convolutions'
    receptive field, mel frames 4k-6 .. 4k+6. Input: padding (0) everywhere but mel frames
    80-119, so only enc_frames 19-31 differ from the silent input's encoder output. (The
    encoder's output is scaled up so that the random decoder depends on it visibly.)"""
    model = type(tiny_s2t.model)(tiny_s2t.model.config).eval()
    model.load_state_dict(tiny_s2t.model.state_dict())
    for layer in model.model.encoder.layers:
        torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.self_attn.out_proj.bias)
    with torch.no_grad():
        model.model.encoder.layer_norm.weight.mul_(20)
    planted = dataclasses.replace(tiny_s2t, model=model.requires_grad_(False))
    x = torch.zeros(1, 80, 200)
    x[..., 80:120] = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(0)) * 3
    tr = decode(planted, np.zeros(1), text=TEXT)  # text only: the audio is not read
    with torch.no_grad():
        _, logits = forward_attention(planted, x, tr)
        score = encoder_score_fn(planted, x, tr, logits, 50)
        outside = torch.zeros(2, 50, dtype=torch.bool)
        outside[0, :19], outside[1, 32:] = True, True
        inside = torch.zeros(1, 50, dtype=torch.bool)
        inside[0, 19:32] = True
        # the encoder rows are identical; the decoder in a batch of 2 differs by float noise only
        effect = float(score(inside).min())
        assert effect > 0.0
        assert float(score(outside).abs().max()) < 2e-2 * effect, effect
        cells = torch.zeros(2, 200, 80, dtype=torch.bool)
        cells[0, :80], cells[1, 80:120, :40] = True, True  # (mel_frames, mel_bins)
        cell_scores = mel_score_fn(planted, x, tr, logits, 200)(cells)
        # full forwards in a batch of 2: float noise only, far below the planted effect
        assert float(cell_scores[1].min()) > 0
        assert float(cell_scores[0].abs().sum()) < 1e-2 * float(cell_scores[1].sum())
    options = PerturbationOptions(n_masks=256)
    prepared = Prepared(audio=np.zeros(0, np.float32), mel=x, transcript=tr, logits=logits,
                        cross_attention=torch.zeros(0), n_mel=200, n_enc=50)  # fmt: skip
    sm_h, _ = encoder_spes_run(planted, prepared, options=options, progress=False).maps()
    per_frame = sm_h.abs().mean(0)
    assert 19 <= int(per_frame.argmax()) <= 31
    outside_frames = torch.cat([per_frame[:19], per_frame[32:]])
    assert float(per_frame[20:32].min()) > float(outside_frames.max())


def test_s2t_checkpoint_loads_from_a_saved_folder(tiny_s2t, tone, tmp_path):
    tiny_s2t.model.save_pretrained(tmp_path)
    tiny_s2t.processor.tokenizer.save_pretrained(tmp_path)
    tiny_s2t.processor.feature_extractor.save_pretrained(tmp_path)
    again = xu.load_model(tmp_path, device="cpu")
    assert isinstance(again.family, Speech2TextFamily) and again.special == tiny_s2t.special
    a = xu.cross_attention(tiny_s2t, tone, text=TEXT)
    b = xu.cross_attention(again, tone, text=TEXT)
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.scores, b.scores)


def test_mixing_encoder_states_rebuild_each_familys_encoder(loaded, tone):
    from xattn_utils.analysis.mixing import encoder_states

    x = features(loaded, tone)
    with torch.no_grad():
        states = encoder_states(loaded, x)
        out = loaded.model.model.encoder.layer_norm(states[-1])
        torch.testing.assert_close(out, loaded.family.encode(loaded, x)[0], atol=1e-5, rtol=1e-5)
    assert states.shape[0] == loaded.model.config.encoder_layers + 1


def test_s2t_multilingual_prompt_starts_with_the_target_language(tiny_s2t):
    class Vocab:  # what special_tokens reads of a multilingual ST tokenizer
        unk_token_id = 3

        def get_vocab(self):
            return {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<lang:de>": 7, "<lang:fr>": 8}

    special = special_tokens(Vocab(), tiny_s2t.model.config)
    assert special.languages == {"de": 7, "fr": 8}
    assert special.is_special(7) and not special.is_special(9)
    st = dataclasses.replace(tiny_s2t, special=special, multilingual=True)
    assert prompt_ids(st, language="fr") == [2, 8]
    with pytest.raises(DecodeError, match=r"target language: use one of \['de', 'fr'\]"):
        prompt_ids(st)


def test_sm_x_pools_onto_each_familys_enc_frames():
    assert enc_factor(250, 125) == 2 and enc_factor(250, 1500) == 2  # Whisper, cropped or not
    assert enc_factor(587, 147) == 4 and enc_factor(248, 62) == 4  # Speech2Text


def test_random_tiny_s2t_builds_the_same_model_every_time(tiny_s2t, tmp_path, monkeypatch):
    monkeypatch.setenv("XATTN_CACHE", str(tmp_path))  # a fresh build: tokenizer and weights
    fresh = xu.load_model("random-tiny-s2t", device="cpu")
    assert (tmp_path / "random-tiny-s2t-seed0" / "tokenizer.json").is_file()
    assert fresh.processor.tokenizer.get_vocab() == tiny_s2t.processor.tokenizer.get_vocab()
    for (name, a), (_, b) in zip(
        fresh.model.state_dict().items(), tiny_s2t.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

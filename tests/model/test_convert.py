"""CTranslate2 -> transformers conversion: the binary reader, the name mapping, and (slow)
equivalence of the converted bundled models to CTranslate2 itself on real speech."""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from xattn_utils.model.convert import (
    ConversionError,
    build_model,
    bundled_model,
    convert,
    read_ctranslate2,
    save_pretrained,
    special_token_ids,
    to_state_dict,
)

DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
SPEECH = Path("/work/shared/speech")


def _string(s: str) -> bytes:
    data = s.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2(path: Path, variables: dict, aliases: dict | None = None, version: int = 6) -> Path:
    """Write ``variables`` (numpy arrays, or ``(dtype_id, shape, raw bytes)``) as a model.bin."""
    out = [
        struct.pack("<I", version),
        _string("WhisperSpec"),
        struct.pack("<II", 3, len(variables)),
    ]
    for name, value in variables.items():
        if isinstance(value, tuple):
            dtype_id, shape, raw = value
        else:
            value = np.asarray(value)
            dtype_id, shape, raw = DTYPE_IDS[value.dtype.name], value.shape, value.tobytes()
        out += [_string(name), struct.pack(f"<B{len(shape)}I", len(shape), *shape)]
        out += [struct.pack("<BI", dtype_id, len(raw)), raw]
    out.append(struct.pack("<I", len(aliases or {})))
    out += [_string(a) + _string(t) for a, t in (aliases or {}).items()]
    path.write_bytes(b"".join(out))
    return path


def _toy_variables() -> dict:
    rng = np.random.default_rng(0)
    return {
        "a/weight": rng.standard_normal((2, 3)).astype(np.float32),
        "b/half": rng.standard_normal(5).astype(np.float16),
        "c/heads": np.array(6, np.int8),
        "d/flag": np.array(-1, np.int16),
        "e/ids": np.array([7, -8], np.int32),
    }


def test_read_roundtrip(tmp_path):
    variables = _toy_variables()
    bf16 = np.array([1.0, -2.5, 3.140625], np.float32)  # exactly representable in bfloat16
    raw_bf16 = (bf16.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = write_ct2(
        tmp_path / "model.bin",
        {**variables, "f/bf16": (5, (3,), raw_bf16)},
        aliases={"g/alias": "b/half"},
    )
    read = read_ctranslate2(path)
    assert set(read) == {*variables, "f/bf16", "g/alias"}
    for name, value in variables.items():
        assert read[name].dtype == value.dtype and read[name].shape == value.shape
        np.testing.assert_array_equal(read[name], value)
    np.testing.assert_array_equal(read["f/bf16"], bf16)
    assert read["g/alias"] is read["b/half"]


def test_read_parts_equal_whole(tmp_path):
    data = write_ct2(tmp_path / "model.bin", _toy_variables(), {"x": "a/weight"}).read_bytes()
    (tmp_path / "p1").write_bytes(data[:37])
    (tmp_path / "p2").write_bytes(data[37:])
    whole, parts = (
        read_ctranslate2(tmp_path / "model.bin"),
        read_ctranslate2([tmp_path / "p1", tmp_path / "p2"]),
    )
    assert whole.keys() == parts.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], parts[name])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: struct.pack("<I", 5) + b[4:], "binary version 5"),
        (lambda b: b[:-7], "truncated"),
        (lambda b: b[:60], "truncated"),
        (lambda b: b + b"\0", "1 trailing bytes"),
    ],
)
def test_read_rejects_damaged_files(tmp_path, damage, message):
    data = write_ct2(tmp_path / "ok.bin", _toy_variables(), {"x": "a/weight"}).read_bytes()
    (tmp_path / "bad.bin").write_bytes(damage(data))
    with pytest.raises(ConversionError, match=message):
        read_ctranslate2(tmp_path / "bad.bin")


def test_read_rejects_unknown_dtype_and_alias(tmp_path):
    write_ct2(tmp_path / "dtype.bin", {"v": (9, (2,), b"\0\0")})
    with pytest.raises(ConversionError, match="unknown dtype id 9"):
        read_ctranslate2(tmp_path / "dtype.bin")
    write_ct2(tmp_path / "alias.bin", {"v": np.zeros(2, np.float32)}, {"w": "missing"})
    with pytest.raises(ConversionError, match="unknown variable missing"):
        read_ctranslate2(tmp_path / "alias.bin")


def hf_to_ct2(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The inverse mapping, written from the table in whisper-weights.md, as float16."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {
        "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"]
    }

    def copy(ct: str, hf: str, leaves=(("weight", "weight"), ("bias", "bias"))) -> None:
        for ct_leaf, hf_leaf in leaves:
            out[f"{ct}/{ct_leaf}"] = sd[f"{hf}.{hf_leaf}"]

    def norm(ct: str, hf: str) -> None:
        copy(ct, hf, (("gamma", "weight"), ("beta", "bias")))

    zero = np.zeros(cfg.d_model, np.float16)
    for stack, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        m = f"model.{stack}"
        out[f"{stack}/position_encodings/encodings"] = sd[f"{m}.embed_positions.weight"]
        out[f"{stack}/num_heads"] = np.array(getattr(cfg, f"{stack}_attention_heads"), np.int16)
        norm(f"{stack}/layer_norm", f"{m}.layer_norm")
        for i in range(n_layers):
            ct, hf = f"{stack}/layer_{i}", f"{m}.layers.{i}"
            a = f"{hf}.self_attn"
            out[f"{ct}/self_attention/linear_0/weight"] = np.concatenate(
                [sd[f"{a}.{p}_proj.weight"] for p in "qkv"]
            )
            out[f"{ct}/self_attention/linear_0/bias"] = np.concatenate(
                [sd[f"{a}.q_proj.bias"], zero, sd[f"{a}.v_proj.bias"]]
            )
            copy(f"{ct}/self_attention/linear_1", f"{a}.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            copy(f"{ct}/ffn/linear_0", f"{hf}.fc1")
            copy(f"{ct}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
            if stack == "decoder":
                x = f"{hf}.encoder_attn"
                copy(f"{ct}/attention/linear_0", f"{x}.q_proj")
                out[f"{ct}/attention/linear_1/weight"] = np.concatenate(
                    [sd[f"{x}.k_proj.weight"], sd[f"{x}.v_proj.weight"]]
                )
                out[f"{ct}/attention/linear_1/bias"] = np.concatenate(
                    [zero, sd[f"{x}.v_proj.bias"]]
                )
                copy(f"{ct}/attention/linear_2", f"{x}.out_proj")
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    for conv in ("conv1", "conv2"):
        copy(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/activation"] = np.array(3, np.int8)
    return dict(sorted(out.items()))


@pytest.fixture(scope="module")
def random_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=20,
        max_target_positions=16,
        pad_token_id=98,
        bos_token_id=98,
        eos_token_id=98,
        decoder_start_token_id=99,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # float16-representable random values everywhere
            p.copy_((0.1 * torch.randn_like(p)).half().float())
    return model


def test_random_model_roundtrip(tmp_path, random_whisper):
    write_ct2(
        tmp_path / "model.bin",
        hf_to_ct2(random_whisper),
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [3, 98]})
    )
    added = [{"id": 98, "content": "<|endoftext|>"}, {"id": 99, "content": "<|startoftranscript|>"}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    config, state_dict, ct2_config = convert(tmp_path)
    ref = random_whisper.config
    for field in (
        "vocab_size",
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
    ):
        assert getattr(config, field) == getattr(ref, field), field
    assert (config.decoder_start_token_id, config.eos_token_id) == (99, 98)
    assert config.begin_suppress_tokens == [3, 98] and ct2_config["suppress_ids"] == [1, 2]
    expected = random_whisper.state_dict()
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert state_dict[key].dtype == torch.float32
        torch.testing.assert_close(state_dict[key], value, rtol=0, atol=0, msg=key)
    model = build_model(config, state_dict)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    features, tokens = torch.randn(1, 8, 40), torch.tensor([[99, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(features, decoder_input_ids=tokens).logits,
            random_whisper(features, decoder_input_ids=tokens).logits,
            rtol=0,
            atol=0,
        )


def test_nonzero_key_bias_is_an_error(random_whisper):
    variables = hf_to_ct2(random_whisper)
    variables["decoder/layer_1/attention/linear_1/bias"][0] = 0.5
    with pytest.raises(ConversionError, match="layer_1/attention/linear_1/bias: key bias"):
        to_state_dict(variables)


def test_missing_keys_are_listed(random_whisper):
    variables = hf_to_ct2(random_whisper)
    del variables["encoder/layer_norm/beta"]
    with pytest.raises(ConversionError, match=r"missing \['model.encoder.layer_norm.bias'\]"):
        build_model(random_whisper.config, to_state_dict(variables))


# ---- slow: the real bundled weights against CTranslate2 ----------------------------------


@functools.cache
def _converted(name: str):
    folder, parts = bundled_model(name)
    config, state_dict, ct2_config = convert(folder, parts)
    return config, state_dict, ct2_config, build_model(config, state_dict)


@pytest.fixture(scope="module")
def ct2_whisper(tmp_path_factory):
    """CTranslate2 models by name; base gets a temp folder with the parts joined."""
    import ctranslate2

    @functools.cache
    def load(name: str):
        folder, parts = bundled_model(name)
        if len(parts) > 1:
            joined = tmp_path_factory.mktemp(name)
            joined.joinpath("model.bin").write_bytes(b"".join(p.read_bytes() for p in parts))
            for file in ("config.json", "tokenizer.json", "vocabulary.txt"):
                joined.joinpath(file).write_bytes((folder / file).read_bytes())
            folder = joined
        return ctranslate2.models.Whisper(str(folder), compute_type="float32")

    return load


def _features(path: Path) -> np.ndarray:
    """Log-mel features, shape = (1, 80, 3000), with transformers' defaults at 16 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly
    from transformers import WhisperFeatureExtractor

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = resample_poly(audio.mean(axis=1), 16_000, rate).astype(np.float32)
    return WhisperFeatureExtractor()(
        audio, sampling_rate=16_000, return_tensors="np"
    ).input_features


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "d_model", "layers", "heads", "vocab"),
    [("tiny.en", 384, 4, 6, 51864), ("base", 512, 6, 8, 51865)],
)
def test_bundled_converts_exactly(name, d_model, layers, heads, vocab):
    config, state_dict, _, model = _converted(name)
    assert (config.d_model, config.decoder_layers, config.encoder_attention_heads) == (
        d_model,
        layers,
        heads,
    )
    assert config.vocab_size == vocab and config.num_mel_bins == 80
    tokens = special_token_ids(bundled_model(name)[0] / "tokenizer.json")
    assert config.decoder_start_token_id == tokens["<|startoftranscript|>"]
    assert config.eos_token_id == tokens["<|endoftext|>"]
    raw = read_ctranslate2(bundled_model(name)[1])
    d = d_model
    pairs = [
        ("decoder/embeddings/weight", "proj_out.weight", slice(None)),
        ("encoder/conv1/weight", "model.encoder.conv1.weight", slice(None)),
        (
            "encoder/layer_1/self_attention/linear_0/weight",
            "model.encoder.layers.1.self_attn.v_proj.weight",
            slice(2 * d, 3 * d),
        ),
        (
            "decoder/layer_2/attention/linear_1/weight",
            "model.decoder.layers.2.encoder_attn.k_proj.weight",
            slice(0, d),
        ),
    ]
    for ct, hf, rows in pairs:
        assert raw[ct].dtype == np.float16
        np.testing.assert_array_equal(state_dict[hf].numpy(), raw[ct][rows].astype(np.float32))
        assert torch.equal(state_dict[hf].half().float(), state_dict[hf])
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight


CASES = [
    ("tiny.en", "LJ001-0001.flac", None, None),
    ("tiny.en", "LJ001-0003.flac", None, None),
    ("tiny.en", "LJ001-0004.flac", None, None),
    ("base", "LJ001-0001.flac", "en", "transcribe"),
    ("base", "mls_es_13697_11991_000000.flac", "es", "translate"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "file", "language", "task"), CASES)
def test_matches_ctranslate2(name, file, language, task, ct2_whisper):
    """Greedy transcripts are token-identical and teacher-forced log-probs agree.

    CTranslate2 decodes greedily with its default suppression: ``suppress_ids`` at every step
    and ``suppress_ids_begin`` at the first (its returned logits hold -FLT_MAX exactly there,
    which is asserted). Transformers is run teacher-forced on CTranslate2's tokens with the
    same suppression; its argmax reproducing every token and the final end-of-text means its
    own greedy decoding gives the same transcript, by induction over the prefix.
    """
    import ctranslate2

    config, _, ct2_config, model = _converted(name)
    ids = special_token_ids(bundled_model(name)[0] / "tokenizer.json")
    prompt = [
        "<|startoftranscript|>",
        *([f"<|{language}|>", f"<|{task}|>"] if language else []),
        "<|notimestamps|>",
    ]
    prompt = [ids[t] for t in prompt]
    features = _features(SPEECH / file)
    result = ct2_whisper(name).generate(
        ctranslate2.StorageView.from_array(features),
        [prompt],
        beam_size=1,
        return_logits_vocab=True,
    )[0]
    tokens = result.sequences_ids[0]
    ct2_logits = np.array(result.logits[0])  # (steps, vocab), after suppression
    assert ct2_logits.shape == (len(tokens) + 1, config.vocab_size)  # finished with <|endoftext|>

    with torch.no_grad():
        logits = model(
            torch.from_numpy(features), decoder_input_ids=torch.tensor([prompt + tokens])
        ).logits[0]
    logits = logits[len(prompt) - 1 :]  # the prediction of each CTranslate2 step
    suppressed = torch.zeros(logits.shape, dtype=torch.bool)
    suppressed[:, ct2_config["suppress_ids"]] = True
    suppressed[0, ct2_config["suppress_ids_begin"]] = True
    hf = logits.masked_fill(suppressed, -torch.inf)
    assert torch.equal(suppressed, torch.from_numpy(ct2_logits <= np.finfo(np.float32).min))
    assert hf.argmax(-1).tolist() == tokens + [config.eos_token_id]

    ct2 = torch.from_numpy(ct2_logits).masked_fill(suppressed, -torch.inf)
    kept = ~suppressed
    logit_diff = (hf - ct2)[kept].abs().max().item()
    logprob_diff = (hf.log_softmax(-1) - ct2.log_softmax(-1))[kept].abs().max().item()
    print(
        f"{name} {file}: {len(tokens)} tokens, max |logit diff| {logit_diff:.2e}, "
        f"max |log-prob diff| {logprob_diff:.2e}"
    )
    assert logprob_diff < 1e-3


@pytest.mark.slow
def test_save_pretrained_loads_back(tmp_path):
    config, state_dict, ct2_config, model = _converted("tiny.en")
    folder, _ = bundled_model("tiny.en")
    out = tmp_path / "tiny.en"
    out.mkdir()
    (out / "stale.bin").write_text("from an earlier run")
    extra = {"alignment_heads": ct2_config["alignment_heads"]}
    assert save_pretrained(model, out, tokenizer=folder / "tokenizer.json", extra=extra) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.en"]  # no temporary folder left
    assert not (out / "stale.bin").exists()  # replaced, not merged
    assert json.loads((out / "xattn.json").read_text()) == extra
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    model = WhisperForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key

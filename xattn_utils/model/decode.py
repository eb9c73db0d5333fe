"""Transcribe or translate greedily, and run teacher-forced forwards.

Token convention used everywhere in xattn: a :class:`Transcript` holds the decoder *input*
``input_ids = prompt + text tokens`` and the *output* tokens they predict,
``output_ids = input_ids[1:] + [eot]``. Row ``i`` of cross-attention, logits and saliency maps
belongs to output token ``i`` (the position that predicts it), as in openai-whisper's
``timing.py``. Prompt outputs (language, task, no-timestamps) and ``eot`` are marked special.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..audio import N_MEL_FRAMES, load_audio
from .loading import LoadedModel

TASKS = ("transcribe", "translate")
MAX_TOKENS = 448  # Whisper's decoder context


class DecodeError(ValueError):
    """A task, language or text the model cannot handle."""


@dataclass(frozen=True)
class Transcript:
    """The decoded (or given) token sequence of one utterance."""

    input_ids: tuple[int, ...]  # prompt + text tokens, shape = (tokens,)
    output_ids: tuple[int, ...]  # input_ids[1:] + (eot,), shape = (tokens,)
    tokens: tuple[str, ...]  # output tokens as strings
    special: tuple[bool, ...]  # True for prompt outputs and eot
    text: str
    task: str
    language: str | None

    def __len__(self) -> int:
        return len(self.output_ids)

    def to_record(self) -> dict:
        """A JSON-able dict (tuples as lists), for result stores; :meth:`from_record` reads it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Transcript:
        """The transcript that :meth:`to_record` wrote."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


class Labelled:
    """Rows labelled by a ``transcript``: ``tokens`` and ``special``, one per output token
    (mixed into the result dataclasses)."""

    transcript: Transcript

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.transcript.tokens

    @property
    def special(self) -> tuple[bool, ...]:
        return self.transcript.special


def features(loaded: LoadedModel, audio: np.ndarray) -> torch.Tensor:
    """Whisper's normalised log-mel input, padded to 30 s. shape = (1, mels, 3000)."""
    extractor = loaded.processor.feature_extractor
    out = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt")
    mel = out.input_features
    assert mel.shape[-1] == N_MEL_FRAMES, mel.shape
    return mel.to(loaded.device, loaded.dtype)


def prompt_ids(loaded: LoadedModel, *, task: str = "transcribe", language: str | None = None):
    """The decoder prompt: <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>."""
    if task not in TASKS:
        raise DecodeError(f"unknown task {task!r}: use one of {TASKS}")
    sp = loaded.special
    if not loaded.multilingual:
        if task != "transcribe":
            raise DecodeError(f"{loaded.name} is English-only: it cannot {task}; use 'base'")
        if language not in (None, "en"):
            raise DecodeError(f"{loaded.name} is English-only: language {language!r} not supported")
        return [sp.sot, sp.no_timestamps]
    language = language or "en"
    if language not in sp.languages:
        raise DecodeError(
            f"unknown language {language!r} for {loaded.name}: use a Whisper language code "
            "such as 'en', 'it', 'de'"
        )
    task_id = sp.transcribe if task == "transcribe" else sp.translate
    return [sp.sot, sp.languages[language], task_id, sp.no_timestamps]


@torch.no_grad()
def decode(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    *,
    text: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
    max_new_tokens: int = 200,
) -> Transcript:
    """Greedy transcript of ``audio``, or the tokenisation of ``text`` when it is given."""
    prompt = prompt_ids(loaded, task=task, language=language)
    if text is not None:
        return transcript(loaded, prompt, encode_text(loaded, text), task=task, language=language)
    mel = features(loaded, load_audio(audio))
    encoder_out = loaded.model.model.encoder(mel).last_hidden_state
    ids = greedy(loaded, encoder_out, prompt, max_new_tokens=max_new_tokens)
    return transcript(loaded, prompt, ids, task=task, language=language)


def greedy(
    loaded: LoadedModel, encoder_out: torch.Tensor, prompt: list[int], *, max_new_tokens: int
) -> list[int]:
    """Greedy decoding with the KV cache; suppresses special and timestamp tokens."""
    sp = loaded.special
    vocab = loaded.model.config.vocab_size
    blocked = torch.zeros(vocab, dtype=torch.bool, device=encoder_out.device)
    blocked[[i for i in sp.suppress if i < vocab]] = True
    blocked[sp.eot + 1 :] = True  # special tokens and timestamps
    begin = blocked.clone()
    begin[[i for i in sp.suppress_begin if i < vocab]] = True
    decoder = loaded.model.model.decoder
    max_new_tokens = min(max_new_tokens, MAX_TOKENS - len(prompt))
    ids: list[int] = []
    step_input = torch.tensor([prompt], device=encoder_out.device)
    past = None
    for step in range(max_new_tokens):
        out = decoder(
            input_ids=step_input,
            encoder_hidden_states=encoder_out,
            cache=past,
            use_cache=True,
        )
        past = out.cache
        logits = loaded.model.proj_out(out.last_hidden_state[0, -1]).float()
        logits[begin if step == 0 else blocked] = -torch.inf
        token = int(logits.argmax())
        if token == sp.eot:
            break
        ids.append(token)
        step_input = torch.tensor([[token]], device=encoder_out.device)
    return ids


def encode_text(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of ``text`` (a leading space is added, as Whisper's outputs have one)."""
    if not text or not text.strip():
        raise DecodeError("the text to teacher-force is empty")
    ids = loaded.processor.tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise DecodeError(f"the tokenizer produced no tokens for {text!r}")
    if loaded.processor.tokenizer.unk_token_id in ids and loaded.processor.tokenizer.unk_token_id:
        raise DecodeError(f"the tokenizer cannot encode {text!r}")
    if len(ids) + 4 > MAX_TOKENS:
        raise DecodeError(f"the text has {len(ids)} tokens; Whisper's decoder holds {MAX_TOKENS}")
    return ids


def transcript(
    loaded: LoadedModel, prompt: list[int], ids: list[int], *, task: str, language: str | None
) -> Transcript:
    """Assemble a :class:`Transcript` from a prompt and text token ids."""
    tok = loaded.processor.tokenizer
    inputs = [*prompt, *ids]
    outputs = [*inputs[1:], loaded.special.eot]
    return Transcript(
        input_ids=tuple(inputs),
        output_ids=tuple(outputs),
        tokens=tuple(tok.decode([i]) for i in outputs),
        special=tuple(loaded.special.is_special(i) for i in outputs),
        text=tok.decode(ids).strip(),
        task=task,
        language=language if loaded.multilingual else "en",
    )


def teacher_forced(
    loaded: LoadedModel,
    mel: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    output_attentions: bool = False,
):
    """One teacher-forced forward. ``mel`` shape = (batch, mels, 3000), ids = (batch, tokens)."""
    return loaded.model(
        input_features=mel,
        decoder_input_ids=input_ids,
        output_attentions=output_attentions,
        use_cache=False,
    )


def log_probs(logits: torch.Tensor, output_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each reference output token. shape = (batch, tokens)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, output_ids.unsqueeze(-1).expand(lp.shape[0], -1, 1)).squeeze(-1)

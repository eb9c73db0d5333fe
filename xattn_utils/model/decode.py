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

from ..audio import load_audio
from .families import TASKS, DecodeError
from .loading import LoadedModel

__all__ = ["TASKS", "DecodeError", "Transcript", "decode", "features", "prompt_ids"]
MAX_TOKENS = 448  # Whisper's decoder context


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
    """The model's input features (its family's). shape = (1, mel_bins, mel_frames): Whisper's
    log-mel padded to 3000, Speech2Text's filterbanks of the audio alone."""
    return loaded.family.features(loaded, audio)


def prompt_ids(loaded: LoadedModel, *, task: str = "transcribe", language: str | None = None):
    """The decoder prompt: Whisper's <|startoftranscript|> [<|lang|> <|task|>]
    <|notimestamps|>, Speech2Text's </s> [<lang:xx>]."""
    return loaded.family.prompt_ids(loaded, task=task, language=language)


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
    encoder_out = loaded.family.encode(loaded, mel)
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
    if sp.special_ids:
        blocked[[i for i in sp.special_ids if i != sp.eot and i < vocab]] = True
    else:
        blocked[sp.eot + 1 :] = True  # Whisper's special tokens and timestamps
    begin = blocked.clone()
    begin[[i for i in sp.suppress_begin if i < vocab]] = True
    decoder = loaded.model.model.decoder
    max_new_tokens = min(max_new_tokens, decoder_positions(loaded) - len(prompt))
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
        logits = loaded.model.get_output_embeddings()(out.last_hidden_state[0, -1]).float()
        logits[begin if step == 0 else blocked] = -torch.inf
        token = int(logits.argmax())
        if token == sp.eot:
            break
        ids.append(token)
        step_input = torch.tensor([[token]], device=encoder_out.device)
    return ids


def encode_text(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of ``text`` (Whisper's get a leading space, as its outputs have one)."""
    if not text or not text.strip():
        raise DecodeError("the text to teacher-force is empty")
    prefixed = loaded.family.text_prefix + text.strip()
    ids = loaded.processor.tokenizer(prefixed, add_special_tokens=False).input_ids
    if not ids:
        raise DecodeError(f"the tokenizer produced no tokens for {text!r}")
    if loaded.processor.tokenizer.unk_token_id in ids and loaded.processor.tokenizer.unk_token_id:
        raise DecodeError(f"the tokenizer cannot encode {text!r}")
    if len(ids) + 4 > decoder_positions(loaded):
        raise DecodeError(
            f"the text has {len(ids)} tokens; the decoder holds {decoder_positions(loaded)}"
        )
    return ids


def decoder_positions(loaded: LoadedModel) -> int:
    """How many tokens (prompt, text and end-of-text) the decoder holds."""
    positions = getattr(loaded.model.config, "max_target_positions", MAX_TOKENS)
    return min(loaded.family.max_tokens, positions)


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
        tokens=tuple(loaded.family.token_text(tok, i) for i in outputs),
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
    """One teacher-forced forward. ``mel`` shape = (batch, mel_bins, mel_frames), ids =
    (batch, tokens)."""
    return loaded.family.forward(loaded, mel, input_ids, output_attentions=output_attentions)


def log_probs(logits: torch.Tensor, output_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each reference output token. shape = (batch, tokens)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, output_ids.unsqueeze(-1).expand(lp.shape[0], -1, 1)).squeeze(-1)

"""Model families: what differs between the encoder-decoder speech models xattn explains.

A :class:`Family` knows how to make a model's input features (and what padding holds), run
its encoder and its teacher-forced decoder, build the decoder prompt, and the durations of its
two time axes. Everything else in xattn asks ``loaded.family`` instead of assuming Whisper.

Features always travel in one layout, shape = (batch, mel_bins, mel_frames) with 10 ms
mel_frames; :meth:`Family.model_layout` turns them into what the model's ``forward`` takes.

- :class:`WhisperFamily`: log-mel padded to a fixed 30 s window (3000 mel_frames), encoder
  subsampling 2, so 1500 enc_frames of 20 ms whatever the audio's length.
- :class:`Speech2TextFamily`: fairseq S2T (``Speech2TextForConditionalGeneration``), kaldi
  filterbanks with utterance CMVN, no fixed window and no padding for one utterance; two stride-2
  convolutions, so enc_frames of 40 ms, ``ceil(ceil(mel_frames / 2) / 2)`` of them.

Adding a family: subclass :class:`Family`, implement the abstract methods, register its
transformers ``model_type`` in :data:`FAMILIES`, and teach
:func:`xattn_utils.model.loading.load_model`
which model and processor classes load it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..audio import (
    ENC_FRAME_SECONDS,
    HOP_LENGTH,
    MEL_FRAME_SECONDS,
    N_FFT,
    N_MEL_FRAMES,
    SAMPLE_RATE,
    n_enc_frames,
    n_mel_frames,
)

if TYPE_CHECKING:
    from .loading import LoadedModel

TASKS = ("transcribe", "translate")


class DecodeError(ValueError):
    """A task, language or text the model cannot handle."""


@dataclass(frozen=True)
class Family(ABC):
    """How one model family reads audio and decodes; one instance per loaded model."""

    name: str
    enc_frame_seconds: float
    fixed_window: bool  # True: features are padded to a fixed window the encoder always reads
    mel_frame_seconds: float = MEL_FRAME_SECONDS
    text_prefix: str = ""  # prepended to teacher-forced text before tokenising
    max_tokens: int = 448  # decoder positions

    @abstractmethod
    def n_mel_frames(self, audio: np.ndarray) -> int:
        """Mel frames that hold ``audio`` (the rest, if any, is padding)."""

    @abstractmethod
    def n_enc_frames(self, audio: np.ndarray) -> int:
        """Encoder frames that hold ``audio``."""

    @abstractmethod
    def features(self, loaded: LoadedModel, audio: np.ndarray) -> torch.Tensor:
        """Input features of 16 kHz ``audio``. shape = (1, mel_bins, mel_frames)."""

    @abstractmethod
    def padding_value(self, x: torch.Tensor) -> float:
        """The value padding (digital silence) has in features ``x``."""

    @abstractmethod
    def prompt_ids(
        self, loaded: LoadedModel, *, task: str = "transcribe", language: str | None = None
    ) -> list[int]:
        """Decoder input ids before the text tokens."""

    @property
    def enc_subsampling(self) -> int:
        """Mel frames per encoder frame (Whisper 2, Speech2Text 4)."""
        return round(self.enc_frame_seconds / self.mel_frame_seconds)

    def token_text(self, tokenizer, token_id: int) -> str:
        """One token as text, with the leading space that starts a word."""
        return tokenizer.decode([token_id])

    def model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Features (batch, mel_bins, mel_frames) as the model's ``forward`` takes them."""
        return x

    def encode(self, loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        """Encoder output of features ``x`` (batch, mel_bins, mel_frames).
        shape = (batch, enc_frames, d_model)."""
        return loaded.model.model.encoder(self.model_layout(x)).last_hidden_state

    def forward(
        self,
        loaded: LoadedModel,
        x: torch.Tensor,
        ids: torch.Tensor,
        *,
        output_attentions: bool = False,
    ):
        """One teacher-forced forward of features ``x`` (batch, mel_bins, mel_frames) and
        decoder input ``ids`` (batch, tokens); the transformers output (``logits``,
        ``cross_attentions``)."""
        return loaded.model(
            input_features=self.model_layout(x),
            decoder_input_ids=ids,
            output_attentions=output_attentions,
            use_cache=False,
        )


@dataclass(frozen=True)
class WhisperFamily(Family):
    """OpenAI Whisper (``WhisperForConditionalGeneration``): 30 s window, 20 ms enc_frames."""

    name: str = "whisper"
    enc_frame_seconds: float = ENC_FRAME_SECONDS
    fixed_window: bool = True
    text_prefix: str = " "

    def n_mel_frames(self, audio: np.ndarray) -> int:
        return n_mel_frames(audio)

    def n_enc_frames(self, audio: np.ndarray) -> int:
        return n_enc_frames(audio)

    def features(self, loaded: LoadedModel, audio: np.ndarray) -> torch.Tensor:
        """Whisper's normalised log-mel input, padded to 30 s. shape = (1, mels, 3000)."""
        extractor = loaded.processor.feature_extractor
        out = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt")
        mel = out.input_features
        assert mel.shape[-1] == N_MEL_FRAMES, mel.shape
        return mel.to(loaded.device, loaded.dtype)

    def padding_value(self, x: torch.Tensor) -> float:
        """Whisper's clamp floor ``(max_log - 8 + 4) / 4``: the minimum of the input."""
        return float(x.min())

    def encode(self, loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder on any even number of mel_frames up to 3000 (transformers' encoder
        insists on 3000): the same layers, positions cut to the length."""
        enc = loaded.model.model.encoder
        if x.shape[-1] == N_MEL_FRAMES:
            return enc(x).last_hidden_state
        h = torch.nn.functional.gelu(enc.conv1(x))
        h = torch.nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        for layer in enc.layers:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        return enc.layer_norm(h)

    def prompt_ids(
        self, loaded: LoadedModel, *, task: str = "transcribe", language: str | None = None
    ) -> list[int]:
        """<|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>."""
        _check_task(task)
        sp = loaded.special
        if not loaded.multilingual:
            if task != "transcribe":
                raise DecodeError(f"{loaded.name} is English-only: it cannot {task}; use 'base'")
            if language not in (None, "en"):
                raise DecodeError(
                    f"{loaded.name} is English-only: language {language!r} not supported"
                )
            return [sp.sot, sp.no_timestamps]
        language = language or "en"
        if language not in sp.languages:
            raise DecodeError(
                f"unknown language {language!r} for {loaded.name}: use a Whisper language code "
                "such as 'en', 'it', 'de'"
            )
        task_id = sp.transcribe if task == "transcribe" else sp.translate
        return [sp.sot, sp.languages[language], task_id, sp.no_timestamps]


@dataclass(frozen=True)
class Speech2TextFamily(Family):
    """fairseq S2T (``Speech2TextForConditionalGeneration``): kaldi filterbanks with utterance
    CMVN (transformers' ``Speech2TextFeatureExtractor``), no fixed window, convolutional
    subsampling by 4 (40 ms enc_frames). ASR and ST checkpoints alike: the task is the
    checkpoint's; multilingual ST checkpoints start the decoder with a target-language token."""

    name: str = "speech2text"
    enc_frame_seconds: float = 4 * MEL_FRAME_SECONDS
    fixed_window: bool = False
    max_tokens: int = 1024
    conv_kernel_sizes: tuple[int, ...] = (5, 5)

    def n_mel_frames(self, audio: np.ndarray) -> int:
        """Kaldi's frame count (``snip_edges``): one 25 ms window every 10 ms. Utterance CMVN
        needs two frames (one has no variance: the extractor returns NaN)."""
        shortest = N_FFT + HOP_LENGTH
        if audio.size < shortest:
            raise DecodeError(
                f"the audio has {audio.size} samples; Speech2Text needs at least {shortest} "
                f"({shortest / SAMPLE_RATE * 1000:.0f} ms, two filterbank frames)"
            )
        return 1 + (audio.size - N_FFT) // HOP_LENGTH

    def n_enc_frames(self, audio: np.ndarray) -> int:
        return self.subsampled(self.n_mel_frames(audio))

    def subsampled(self, n_mel: int) -> int:
        """Encoder frames of ``n_mel`` mel frames: each stride-2 convolution (kernel k,
        padding k // 2) maps L to ``floor((L - 1) / 2) + 1``."""
        n = n_mel
        for kernel in self.conv_kernel_sizes:
            n = math.floor((n + 2 * (kernel // 2) - kernel) / 2) + 1
        return n

    def features(self, loaded: LoadedModel, audio: np.ndarray) -> torch.Tensor:
        """Filterbanks with utterance CMVN, exactly as transformers' extractor makes them.
        shape = (1, mel_bins, mel_frames)."""
        self.n_mel_frames(audio)  # a clear error for too-short audio
        extractor = loaded.processor.feature_extractor
        out = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return out.input_features.transpose(1, 2).to(loaded.device, loaded.dtype)

    def padding_value(self, x: torch.Tensor) -> float:
        """0: what the extractor pads with, and the CMVN-normalised mean of every bin."""
        return 0.0

    def model_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)

    def token_text(self, tokenizer, token_id: int) -> str:
        """The sentencepiece piece with its word-start mark ``▁`` as a space (as Whisper's
        tokens carry one), special tokens as they are."""
        piece = tokenizer.convert_ids_to_tokens(token_id)
        return piece.replace("\u2581", " ")

    def prompt_ids(
        self, loaded: LoadedModel, *, task: str = "transcribe", language: str | None = None
    ) -> list[int]:
        """``</s>`` (the decoder start), then ``<lang:xx>`` for multilingual checkpoints."""
        _check_task(task)
        sp = loaded.special
        if not sp.languages:
            if language not in (None, "en"):
                raise DecodeError(
                    f"{loaded.name} has no language tokens: its language is fixed by the "
                    f"checkpoint, {language!r} cannot be chosen"
                )
            return [sp.sot]
        if language not in sp.languages:
            raise DecodeError(
                f"{loaded.name} needs a target language: use one of {sorted(sp.languages)}"
            )
        return [sp.sot, sp.languages[language]]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DecodeError(f"unknown task {task!r}: use one of {TASKS}")


WHISPER = WhisperFamily()
FAMILIES: dict[str, type[Family]] = {
    "whisper": WhisperFamily,
    "speech_to_text": Speech2TextFamily,
}


def family_for(config) -> Family:
    """The family of a transformers config (by ``config.model_type``)."""
    kind = getattr(config, "model_type", None)
    if kind == "speech_to_text":
        return Speech2TextFamily(conv_kernel_sizes=tuple(config.conv_kernel_sizes))
    if kind == "whisper":
        return WHISPER
    raise DecodeError(
        f"model type {kind!r} is not supported: xattn explains {sorted(FAMILIES)} models"
    )

"""The prepared utterance: everything one explanation needs before its masks or gradients run.

:func:`prepare` decodes (or teacher-forces ``text``), computes the model's input features and one
clean teacher-forced forward; :func:`~xattn_utils.maps.saliency.explain`, the convergence and
faithfulness analyses and the benchmarks all start from its :class:`Prepared`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..audio import duration, load_audio
from ..model.decode import Transcript, decode, features
from ..model.loading import LoadedModel
from .attention import forward_attention


@dataclass(frozen=True, eq=False)
class Prepared:
    """One utterance ready to explain.

    - ``audio``: 16 kHz mono samples.
    - ``mel``: the model's input features, shape = (1, mels, mel_frames) (Whisper: 30 s padded).
    - ``transcript``: the tokens explained.
    - ``logits``: the clean teacher-forced output, shape = (tokens, vocab).
    - ``cross_attention``: shape = (layers, heads, tokens, enc_frames), over the speech only.
    - ``n_mel``, ``n_enc``: the speech's length in mel_frames (10 ms) and enc_frames (the
      family's: Whisper 20 ms, Speech2Text 40 ms).
    - ``text``, ``task``, ``language``: as requested (``text`` None: the model's own output).
    """

    audio: np.ndarray
    mel: torch.Tensor
    transcript: Transcript
    logits: torch.Tensor
    cross_attention: torch.Tensor
    n_mel: int
    n_enc: int
    text: str | None = None
    task: str = "transcribe"
    language: str | None = None

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return duration(self.audio)


@torch.no_grad()
def prepare(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    *,
    text: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
) -> Prepared:
    """Decode ``audio`` (a path or 16 kHz mono array; or teacher-force ``text``) and run one
    clean forward: the transcript, input features, logits and cross-attention."""
    audio = load_audio(audio)
    tr = decode(loaded, audio, text=text, task=task, language=language)
    mel = features(loaded, audio)
    ca, logits = forward_attention(loaded, mel, tr)
    n_enc = loaded.family.n_enc_frames(audio)
    return Prepared(
        audio=audio,
        mel=mel,
        transcript=tr,
        logits=logits,
        cross_attention=ca[..., :n_enc].contiguous(),
        n_mel=loaded.family.n_mel_frames(audio),
        n_enc=n_enc,
        text=text,
        task=task,
        language=language,
    )


def spectrogram(loaded: LoadedModel, audio: np.ndarray | str) -> np.ndarray:
    """The model's log-mel input over the speech, shape = (mel_frames, mel_bins), for plots."""
    audio = load_audio(audio)
    return (
        features(loaded, audio)[0, :, : loaded.family.n_mel_frames(audio)].T.float().cpu().numpy()
    )

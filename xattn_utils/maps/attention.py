"""Cross-attention of every decoder layer and head for every output token.

Whisper always sees the full 30 s window (its training condition); the returned scores are
cropped afterwards to the encoder frames that hold speech. Rows therefore sum to 1 over all
1500 encoder frames, not over the cropped ones. Speech2Text reads the utterance alone, so its
rows sum to 1 over the speech's enc_frames (40 ms each).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..audio import ENC_FRAME_SECONDS, duration, load_audio
from ..model.decode import Labelled, Transcript, decode, features, teacher_forced
from ..model.loading import LoadedModel

Heads = Iterable[tuple[int, int]]


@dataclass(frozen=True)
class CrossAttention(Labelled):
    """Cross-attention scores with their labels.

    ``scores`` shape = (layers, heads, tokens, enc_frames), float32, cropped to the speech.
    """

    scores: torch.Tensor
    transcript: Transcript
    model: str
    alignment_heads: tuple[tuple[int, int], ...]
    duration: float
    enc_frame_seconds: float = ENC_FRAME_SECONDS

    @property
    def times(self) -> np.ndarray:
        """Start time in seconds of each encoder frame. shape = (enc_frames,)."""
        return np.arange(self.scores.shape[-1]) * self.enc_frame_seconds

    def to_frame(self, heads: Heads | None = None) -> pd.DataFrame:
        """Tidy frame: one row per (layer, head, token, enc_frame) of the chosen heads (all
        when ``None``). Averaging heads: :func:`xattn_utils.maps.views.select`."""
        n_layers, n_heads = self.scores.shape[:2]
        pairs = list(heads) if heads is not None else np.ndindex(n_layers, n_heads)
        n_tok, n_frames = self.scores.shape[2:]
        rows = []
        for layer, head in pairs:
            values = self.scores[layer, head].numpy()
            rows.append(
                pd.DataFrame(
                    {
                        "token_index": np.repeat(np.arange(n_tok), n_frames),
                        "token": np.repeat(np.array(self.tokens, dtype=object), n_frames),
                        "enc_frame": np.tile(np.arange(n_frames), n_tok),
                        "time_s": np.tile(self.times, n_tok),
                        "layer": layer,
                        "head": head,
                        "value": values.reshape(-1),
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)


@torch.no_grad()
def cross_attention(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    *,
    text: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
    crop: bool = True,
) -> CrossAttention:
    """Cross-attention of the model's greedy transcript (or of ``text``, teacher-forced).

    ``audio`` is a path or a 16 kHz mono float array. With ``crop=False`` the scores keep all
    the encoder frames (Whisper's 1500).
    """
    audio = load_audio(audio)
    tr = decode(loaded, audio, text=text, task=task, language=language)
    mel = features(loaded, audio)
    scores, _ = forward_attention(loaded, mel, tr)
    if crop:
        scores = scores[..., : loaded.family.n_enc_frames(audio)]
    return CrossAttention(
        scores=scores.contiguous(),
        transcript=tr,
        model=loaded.name,
        alignment_heads=loaded.alignment_heads,
        duration=duration(audio),
        enc_frame_seconds=loaded.family.enc_frame_seconds,
    )


def forward_attention(
    loaded: LoadedModel, mel: torch.Tensor, tr: Transcript
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced forward returning (CA over all enc_frames, logits (tokens, vocab))."""
    ids = torch.tensor([tr.input_ids], device=mel.device)
    out = teacher_forced(loaded, mel, ids, output_attentions=True)
    if not out.cross_attentions:
        raise RuntimeError(
            "the model returned no cross-attention weights: load it with "
            "attn_implementation='eager' (xattn_utils.load_model does)"
        )
    scores = torch.stack([layer[0] for layer in out.cross_attentions]).float().cpu()
    return scores, out.logits[0].float()

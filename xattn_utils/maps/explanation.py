"""The :class:`Explanation` of one utterance: cross-attention and saliency maps with their labels.

Shapes: CA (layers, heads, tokens, enc_frames); SM_X
(tokens, mel_frames, mel_bins); SM_H (tokens, enc_frames). It is what :func:`~xattn_utils.
saliency.explain` returns and what :class:`~xattn_utils.store.ResultStore` keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..audio import ENC_FRAME_SECONDS, MEL_FRAME_SECONDS
from ..model.decode import Labelled, Transcript


@dataclass(frozen=True, eq=False)
class Explanation(Labelled):
    """Cross-attention and saliency of one utterance, with their labels.

    Shapes: ``cross_attention`` (layers, heads, tokens, enc_frames); ``input_saliency``
    (tokens, mel_frames, mel_bins); ``encoder_saliency`` (tokens, enc_frames). ``*_folds`` hold
    the same maps from two disjoint halves of the masks (perturbation methods only), for
    reliability estimates.
    """

    transcript: Transcript
    cross_attention: torch.Tensor
    input_saliency: torch.Tensor
    encoder_saliency: torch.Tensor
    model: str
    method: str
    params: dict
    alignment_heads: tuple[tuple[int, int], ...]
    duration: float
    utterance: str = ""
    input_saliency_folds: torch.Tensor | None = field(default=None, repr=False)
    encoder_saliency_folds: torch.Tensor | None = field(default=None, repr=False)
    mel_frame_seconds: float = MEL_FRAME_SECONDS
    enc_frame_seconds: float = ENC_FRAME_SECONDS

    @property
    def enc_subsampling(self) -> int:
        """Mel frames per encoder frame: the ``factor`` of ``compare.pool_to_enc``."""
        return round(self.enc_frame_seconds / self.mel_frame_seconds)

    @property
    def n_masks(self) -> int | None:
        return self.params.get("n_masks")

    def to_frame(self, which: str = "encoder") -> pd.DataFrame:
        """Tidy frame of a saliency map: ``which="encoder"`` (token, enc_frame, time_s, value)
        or ``"input"`` (token, mel_frame, mel_bin, time_s, value), with ``map`` and
        ``attribution`` (the method)."""
        sm = self.encoder_saliency if which == "encoder" else self.input_saliency
        step = self.enc_frame_seconds if which == "encoder" else self.mel_frame_seconds
        axes = ["enc_frame"] if which == "encoder" else ["mel_frame", "mel_bin"]
        index = np.indices(sm.shape).reshape(sm.ndim, -1)
        frame = pd.DataFrame({name: index[i + 1] for i, name in enumerate(axes)})
        frame.insert(0, "token_index", index[0])
        frame.insert(1, "token", np.array(self.tokens, dtype=object)[index[0]])
        frame["time_s"] = index[1] * step
        frame["value"] = sm.reshape(-1).numpy()
        frame["map"] = "SM_H" if which == "encoder" else "SM_X"
        frame["attribution"] = self.method
        return frame

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and a JSON-able record, for :mod:`xattn_utils.store`."""
        tensors = {
            "cross_attention": self.cross_attention,
            "input_saliency": self.input_saliency,
            "encoder_saliency": self.encoder_saliency,
        }
        if self.input_saliency_folds is not None:
            tensors["input_saliency_folds"] = self.input_saliency_folds
        if self.encoder_saliency_folds is not None:
            tensors["encoder_saliency_folds"] = self.encoder_saliency_folds
        tr = self.transcript
        record = {
            "utterance": self.utterance,
            "model": self.model,
            "method": self.method,
            "params": self.params,
            "alignment_heads": [list(h) for h in self.alignment_heads],
            "duration": self.duration,
            "enc_frame_seconds": self.enc_frame_seconds,
            "transcript": tr.to_record(),
        }
        return {k: v.contiguous() for k, v in tensors.items()}, record

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], record: dict) -> Explanation:
        return cls(
            transcript=Transcript.from_record(record["transcript"]),
            cross_attention=tensors["cross_attention"],
            input_saliency=tensors["input_saliency"],
            encoder_saliency=tensors["encoder_saliency"],
            input_saliency_folds=tensors.get("input_saliency_folds"),
            encoder_saliency_folds=tensors.get("encoder_saliency_folds"),
            model=record["model"],
            method=record["method"],
            params=record["params"],
            alignment_heads=tuple(tuple(h) for h in record["alignment_heads"]),
            duration=record["duration"],
            utterance=record.get("utterance", ""),
            enc_frame_seconds=record.get("enc_frame_seconds", ENC_FRAME_SECONDS),
        )

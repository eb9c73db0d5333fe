"""The named word-timestamp methods, as ``word_timestamps(method=...)`` takes them.

A :class:`TimestampMethod` is one recipe for the pipeline of :mod:`xattn_utils.analysis.alignment`:
the transcript's unit (BPE tokens or characters), the heads (Whisper's alignment heads, all heads,
per-utterance selection or a calibration), Whisper's median filter and the optional refinements.
:func:`get_method` finds one by name; ``DEFAULT_METHOD`` is the one used when none is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .boundaries import SnapOptions

Unit = Literal["tokens", "chars"]
HeadChoice = Literal["alignment", "all", "select", "calibrated"]


@dataclass(frozen=True)
class TimestampMethod:
    """One named recipe of :func:`~xattn_utils.analysis.aligner.word_timestamps` (see
    :mod:`xattn_utils.analysis.alignment` for the steps).

    ``top_k``: heads kept by ``heads="select"``; ``medfilt_width``: Whisper's median filter;
    ``subframe`` / ``pauses``: the refinements; ``silence_db``: a frame is silent when its
    energy is this far below the utterance's loudest frames; ``min_pause_s``: shortest silence
    a boundary is moved across; ``snap``: boundaries snapped to energy dips and pauses
    (:mod:`xattn_utils.analysis.boundaries`; ``None``: not snapped).
    """

    name: str
    unit: Unit = "tokens"
    heads: HeadChoice = "alignment"
    top_k: int = 0
    medfilt_width: int = 7
    subframe: bool = False
    pauses: bool = False
    silence_db: float = 35.0
    min_pause_s: float = 0.1
    snap: SnapOptions | None = None
    description: str = ""


METHODS: dict[str, TimestampMethod] = {
    m.name: m
    for m in [
        TimestampMethod("whisper", description="Whisper's alignment heads and algorithm"),
        TimestampMethod("all-heads", heads="all", description="every head, Whisper's algorithm"),
        TimestampMethod(
            "all-heads-refined", heads="all", subframe=True, pauses=True,
            description="every head + sub-frame boundaries + pause handling",
        ),
        TimestampMethod(
            "all-heads-snap", heads="all", subframe=True, pauses=True, snap=SnapOptions(),
            description="all-heads-refined + boundaries snapped to energy dips and pauses",
        ),
        TimestampMethod(
            "select", heads="select", top_k=10,
            description="per-utterance unsupervised head selection (peaked, monotone maps)",
        ),
        TimestampMethod(
            "chars", unit="chars", heads="select", top_k=10,
            description="character-level teacher forcing + head selection (arXiv 2509.09987)",
        ),
        TimestampMethod(
            "chars-refined", unit="chars", heads="select", top_k=10, subframe=True, pauses=True,
            description="chars + sub-frame boundaries + pause handling",
        ),
        TimestampMethod(
            "calibrated", unit="chars", heads="calibrated", subframe=True, pauses=True,
            snap=SnapOptions(),
            description="chars with heads and offsets learned on a labelled corpus, snapped",
        ),
    ]
}  # fmt: skip
# the best method that needs no labelled data: all-heads-refined was chosen on the demo's
# synthetic English (32 utterances, exact boundaries); all-heads-snap adds the snaps (knobs fitted
# on synthetic, silence threshold left-one-out on recorded speech) and beats it on recorded speech
# out of sample for tiny.en and base (README, "Word timestamps")
DEFAULT_METHOD = "all-heads-snap"


def list_timestamp_methods() -> list[str]:
    """Names accepted by ``word_timestamps(method=...)``."""
    return list(METHODS)


def get_method(method: str | TimestampMethod | None) -> TimestampMethod:
    """A :class:`TimestampMethod` by name (``None``: the default)."""
    if isinstance(method, TimestampMethod):
        return method
    name = DEFAULT_METHOD if method is None else method
    if name not in METHODS:
        raise ValueError(f"unknown timestamp method {name!r}: use one of {list(METHODS)}")
    return METHODS[name]

"""Word boundaries refined from the waveform: snapped to pauses and to energy dips.

Cross-attention places a boundary to within a few 20 ms enc frames at best, and it places the
boundary *before* a pause too early: the next word's rows take the silence, and often the tail of
the word before it (on the demo's recorded English, starts after a pause came out 110-180 ms
early and the ends before it 80-100 ms early). Two label-free refinements, in the spirit of
stable-ts's silence suppression, use the loudness envelope of the audio (:func:`envelope_db`,
20 ms windows every 5 ms):

1. **dips** (:func:`snap_to_dips`): a boundary two words share moves to the quietest point within
   ``dip_radius_s`` of it (speech is quieter between words than inside them), never into a pause;
2. **pauses** (:func:`snap_to_pauses`): every pause (a run of at least ``min_pause_s`` quieter
   than the audio's loud frames, 95th percentile, by ``silence_db``) is given to the nearest
   boundary within ``window_s``; the word before it then ends where the pause begins and the word
   after it starts where the pause ends (the first word's start and the last word's end too).

The knobs (:class:`SnapOptions`) were chosen on the demo's synthetic English only (see
:mod:`xattn_utils.analysis.timestamp_methods`). Times are in seconds throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..audio import SAMPLE_RATE

ENVELOPE_SECONDS = 0.005  # hop of the loudness envelope
ENVELOPE_WINDOW_SECONDS = 0.02
MIN_WORD_SECONDS = 0.02  # a snap never leaves a word shorter than this

Spans = list[tuple[float, float]]


@dataclass(frozen=True)
class SnapOptions:
    """Knobs of :func:`snap_boundaries`: ``silence_db`` below the 95th percentile of the envelope
    is silent; pauses last at least ``min_pause_s``; a pause snaps a boundary at most
    ``window_s`` away; ``dip_radius_s``: how far a shared boundary may move to an energy dip (0:
    no dip snapping)."""

    silence_db: float = 35.0
    min_pause_s: float = 0.05
    window_s: float = 0.5
    dip_radius_s: float = 0.05


def envelope_db(audio: np.ndarray) -> np.ndarray:
    """RMS loudness (dB re full scale) of 20 ms windows centred every 5 ms, shape =
    (ceil(samples / 80),): value ``i`` belongs to time ``i * ENVELOPE_SECONDS``."""
    hop, win = round(ENVELOPE_SECONDS * SAMPLE_RATE), round(ENVELOPE_WINDOW_SECONDS * SAMPLE_RATE)
    x = np.asarray(audio, dtype=np.float64).ravel()
    n = max(1, -(-x.size // hop))
    padded = np.zeros(n * hop + win)
    padded[win // 2 : win // 2 + x.size] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop][:n]
    return 20 * np.log10(np.maximum(np.sqrt((frames**2).mean(1)), 1e-10))


def silent_frames(energy_db: np.ndarray, silence_db: float) -> np.ndarray:
    """Frames quieter than the utterance's loud frames (95th percentile) by ``silence_db``."""
    return energy_db < np.percentile(energy_db, 95) - silence_db


def find_pauses(envelope: np.ndarray, *, silence_db: float, min_pause_s: float) -> Spans:
    """(start, end) seconds of the silent runs (:func:`silent_frames`) of ``envelope``
    (:func:`envelope_db`) that last at least ``min_pause_s``."""
    silent = silent_frames(envelope, silence_db)
    edges = np.diff(np.concatenate([[0], silent.astype(int), [0]]))
    runs = zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)
    return [
        (a * ENVELOPE_SECONDS, b * ENVELOPE_SECONDS)
        for a, b in runs
        if (b - a) * ENVELOPE_SECONDS >= min_pause_s - 1e-9
    ]


def _inside(t: float, pauses: Spans) -> bool:
    return any(a < t < b for a, b in pauses)


def snap_to_dips(spans: Spans, envelope: np.ndarray, pauses: Spans, *, radius_s: float) -> Spans:
    """Move each boundary two words share (one's end is the next one's start) to the quietest
    envelope point within ``radius_s``, outside ``pauses`` and inside the two words."""
    out = [list(s) for s in spans]
    r = round(radius_s / ENVELOPE_SECONDS)
    for k in range(1, len(out)):
        t = out[k][0]
        if r < 1 or abs(out[k - 1][1] - t) > 1e-9:
            continue
        centre = round(t / ENVELOPE_SECONDS)
        best = None
        for i in range(max(0, centre - r), min(envelope.size, centre + r + 1)):
            ti = i * ENVELOPE_SECONDS
            ok = out[k - 1][0] + MIN_WORD_SECONDS <= ti <= out[k][1] - MIN_WORD_SECONDS
            if ok and not _inside(ti, pauses) and (best is None or envelope[i] < envelope[best]):
                best = i
        if best is not None:
            out[k - 1][1] = out[k][0] = best * ENVELOPE_SECONDS
    return [(a, b) for a, b in out]


def snap_to_pauses(spans: Spans, pauses: Spans, *, window_s: float) -> Spans:
    """Give each pause to the nearest word boundary (the gap between two words, or before the
    first or after the last) within ``window_s``, one pause per boundary (the nearest): the word
    before ends where the pause begins, the word after starts where it ends. A snap that would
    leave a word shorter than ``MIN_WORD_SECONDS`` is not made."""
    out = [list(s) for s in spans]
    n = len(out)
    if not n:
        return []

    def gap(k: int) -> tuple[float, float]:  # boundary k: before word k (k = n: after the last)
        lo = out[k - 1][1] if k > 0 else out[0][0]
        hi = out[k][0] if k < n else out[-1][1]
        return min(lo, hi), max(lo, hi)

    chosen: dict[int, tuple[float, float, float]] = {}
    for pa, pb in pauses:
        dist = [max(0.0, pa - gap(k)[1], gap(k)[0] - pb) for k in range(n + 1)]
        k = int(np.argmin(dist))
        if dist[k] <= window_s and (k not in chosen or dist[k] < chosen[k][0]):
            chosen[k] = (dist[k], pa, pb)
    for k, (_, pa, pb) in sorted(chosen.items()):
        ends_ok = k == 0 or pa >= out[k - 1][0] + MIN_WORD_SECONDS
        starts_ok = k == n or pb <= out[k][1] - MIN_WORD_SECONDS
        if ends_ok and starts_ok:
            if k > 0:
                out[k - 1][1] = pa
            if k < n:
                out[k][0] = pb
    return [(a, b) for a, b in out]


def snap_boundaries(
    spans: Sequence[tuple[float, float]],
    envelope: np.ndarray,
    options: SnapOptions = SnapOptions(),  # noqa: B008 (frozen)
) -> Spans:
    """Word (start, end) seconds refined from the audio's ``envelope`` (:func:`envelope_db`):
    shared boundaries to energy dips, then boundaries next to pauses to the pauses' edges. No
    boundary is moved into a pause, and words keep their order."""
    o = options
    pauses = find_pauses(envelope, silence_db=o.silence_db, min_pause_s=o.min_pause_s)
    out = [(float(a), float(b)) for a, b in spans]
    if o.dip_radius_s > 0:
        out = snap_to_dips(out, envelope, pauses, radius_s=o.dip_radius_s)
    return snap_to_pauses(out, pauses, window_s=o.window_s)

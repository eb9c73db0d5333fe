"""Word timestamps for users: ``word_timestamps(loaded, audio)`` with named alignment methods.

The methods are named in :mod:`xattn_utils.analysis.timestamp_methods`; each runs the pipeline of
:mod:`xattn_utils.analysis.alignment` (a transcript, its cross-attention, a set of heads, Whisper's
DTW, optional refinements); ``calibrated`` takes its heads and offsets from
:mod:`xattn_utils.analysis.calibration`. A ``text=`` to align is first checked against what the
model hears.

Audio over 30 s is cut into consecutive windows at the quietest point near each window's end;
each window is decoded and aligned on its own and the words come back with absolute times.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace

import numpy as np

from ..audio import (
    CHUNK_SECONDS,
    ENC_FRAME_SECONDS,
    SAMPLE_RATE,
    SILENCE_PEAK,
    AudioError,
    duration,
    load_audio,
)
from ..model.decode import DecodeError, decode
from ..model.loading import LoadedModel
from .alignment import (
    TranscriptTooLong,
    align_inputs,
    frame_energy_db,
    timings_from_alignment,
)
from .calibration import Calibration, load_calibration
from .timestamp_methods import TimestampMethod, get_method
from .timestamps import normalize_word
from .timing import WordTiming

MIN_SPLIT_SECONDS = 2.0  # windows whose characters overflow the decoder are halved down to this
MIN_TEXT_MATCH = 0.3  # text= must share this share of its words with the decode


# -- the user-facing verb ------------------------------------------------------------------------


def _check_text(loaded: LoadedModel, audio: np.ndarray, text: str, language: str | None) -> None:
    """Raise when ``text`` shares too few words with what the model hears (wrong file, wrong
    language): forced alignment of an unrelated text gives confident nonsense."""
    words = [normalize_word(w) for w in text.split()]
    words = [w for w in words if w]
    if not words:
        raise DecodeError("the text to align is empty (no letters or digits)")
    heard = [normalize_word(w) for w in decode(loaded, audio, language=language).text.split()]
    matcher = difflib.SequenceMatcher(None, words, [w for w in heard if w], False)
    share = sum(b.size for b in matcher.get_matching_blocks()) / len(words)
    if len(words) >= 3 and share < MIN_TEXT_MATCH:
        raise DecodeError(
            f"the text does not match the audio: the model hears only {share:.0%} of its words "
            f"(language {language or 'en'!r}); check the file, the text and --language"
        )


def split_points(audio: np.ndarray, *, window_s: float = CHUNK_SECONDS) -> list[int]:
    """Sample indices where consecutive windows of at most ``window_s`` start: each cut sits at
    the quietest 100 ms of the last third of its window (a pause where there is one)."""
    cuts, start, win = [0], 0, int(window_s * SAMPLE_RATE)
    hop = int(SAMPLE_RATE * ENC_FRAME_SECONDS)
    while audio.size - start > win:
        lo = start + 2 * win // 3
        seg = audio[lo : start + win]
        energy = frame_energy_db(seg, seg.size // hop)
        smooth = np.convolve(energy, np.ones(5) / 5, mode="same")
        start = lo + int(np.argmin(smooth)) * hop
        cuts.append(start)
    return cuts


def word_timestamps(
    loaded: LoadedModel,
    audio: np.ndarray | str | os.PathLike,
    *,
    text: str | None = None,
    method: str | TimestampMethod | None = None,
    language: str | None = None,
    calibration: Calibration | None = None,
) -> list[WordTiming]:
    """Word start and end times (seconds) of ``audio`` (a path or 16 kHz mono samples).

    ``text``: align this transcript (forced alignment) instead of the greedy decode; it must be
    what is said (checked against the decode). ``method``: a name from
    :func:`list_timestamp_methods` (``None``: the best method that needs no labelled data,
    ``DEFAULT_METHOD``). ``language``: the spoken language (multilingual models; default
    English). ``calibration``: for ``method="calibrated"`` (default: the file shipped for the
    model). Audio over 30 s is aligned in windows cut at pauses (not with ``text=``); with a
    character method, a window whose transcript overflows the decoder is halved at a pause.
    """
    m = get_method(method)
    audio = load_audio(audio, max_seconds=None)
    if text is not None and not text.strip():
        raise DecodeError("the text to align is empty")
    language = language if loaded.multilingual else None
    heads, offsets = None, (0.0, 0.0)
    if m.heads == "calibrated":
        cal = calibration or load_calibration(loaded)
        heads, offsets = list(cal.heads), cal.offsets
        m = replace(get_method(cal.method), name=m.name, heads="calibrated", snap=m.snap)
    guided = m.guide_band_s is not None
    cuts = split_points(audio)
    if text is not None and len(cuts) > 1:
        raise AudioError(
            f"the audio lasts {duration(audio):.1f} s: text= aligns at most {CHUNK_SECONDS} s; "
            "cut the file and its text, or leave text out to align the decode window by window"
        )
    if text is not None:
        _check_text(loaded, audio, text, language)
    out: list[WordTiming] = []
    windows = list(zip(cuts, [*cuts[1:], audio.size], strict=True))
    while windows:
        a, b = windows.pop(0)
        window = audio[a:b]
        if text is None and len(cuts) > 1 and np.abs(window).max() < SILENCE_PEAK:
            continue
        try:
            al = align_inputs(
                loaded, window, unit=m.unit, text=text, language=language, guide=guided
            )
        except TranscriptTooLong:
            if text is not None or window.size < 2 * MIN_SPLIT_SECONDS * SAMPLE_RATE:
                raise
            half = split_points(window, window_s=window.size / SAMPLE_RATE / 2 + 0.5)[1]
            windows[:0] = [(a, a + half), (a + half, b)]  # too many characters: halve it
            continue
        except DecodeError:
            if len(cuts) == 1:
                raise
            continue  # a window without words
        shift = a / SAMPLE_RATE
        words = timings_from_alignment(
            al, m, heads=heads, offsets=offsets, probabilities=al.probabilities
        )
        out += [replace(w, start=w.start + shift, end=w.end + shift) for w in words]
    if not out:
        raise DecodeError("the model heard no words in this audio")
    return out

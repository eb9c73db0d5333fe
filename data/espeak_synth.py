"""libespeak-ng through ctypes: audio plus the synthesiser's own word start events.

libespeak-ng keeps state between calls (the same text synthesised twice in one process gives
different samples), so :func:`synth` runs every call in a fresh Python process that imports
only numpy: that is what makes the demo corpus reproducible bit for bit. Run as a script, this
file is that child process (request as JSON on stdin, result written to an ``.npz``).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIBRARY = "libespeak-ng.so.1"

# Constants from speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
CHARS_UTF8 = 1
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4
EVENT_LIST_TERMINATED, EVENT_WORD = 0, 1


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: ``espeak_SetVoiceByName`` name, words per minute, pitch 0-100."""

    name: str
    rate: int
    pitch: int


@dataclass(frozen=True)
class Synthesis:
    """int16 ``audio`` at ``sample_rate`` Hz; per word (text_position, length, start sample)."""

    audio: np.ndarray
    sample_rate: int
    events: tuple[tuple[int, int, int], ...]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters
        ("length", ctypes.c_int),  # in characters
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # output sample where the event happens
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_void_p),
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


def available() -> bool:
    """True if libespeak-ng can be loaded."""
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return False
    return True


def version() -> str:
    """The library's version string, e.g. ``"1.51"``."""
    lib = ctypes.CDLL(LIBRARY)
    lib.espeak_Info.restype = ctypes.c_char_p
    return lib.espeak_Info(None).decode()


def synth(text: str, voice: Voice) -> Synthesis:
    """Synthesise ``text`` in a fresh process, so that no library state carries over."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.npz"
        request = json.dumps({"text": text, "voice": [voice.name, voice.rate, voice.pitch]})
        done = subprocess.run(
            [sys.executable, __file__, str(out)], input=request, text=True, capture_output=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"espeak-ng failed on {text!r} with {voice}:\n{done.stderr}")
        with np.load(out) as saved:
            events = tuple(tuple(e) for e in saved["events"].tolist())
            return Synthesis(saved["audio"], int(saved["sample_rate"]), events)


def _synth_here(text: str, voice: Voice) -> Synthesis:
    """Synthesise in this process; call at most once per process."""
    lib = ctypes.CDLL(LIBRARY)
    sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sample_rate})")
    chunks: list[np.ndarray] = []
    events: list[tuple[int, int, int]] = []

    def on_audio(wav, n_samples, event):  # type: ignore[no-untyped-def]
        if wav and n_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        i = 0
        while event[i].type != EVENT_LIST_TERMINATED:
            if event[i].type == EVENT_WORD:
                events.append((event[i].text_position, event[i].length, event[i].sample))
            i += 1
        return 0

    callback = _Callback(on_audio)  # must outlive espeak_Synth
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {voice.name!r} (see `espeak-ng --voices`)")
    lib.espeak_SetParameter(PARAM_RATE, voice.rate, 0)
    lib.espeak_SetParameter(PARAM_PITCH, voice.pitch, 0)
    lib.espeak_SetParameter(PARAM_RANGE, 50, 0)
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    data = text.encode()
    status = lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
    if status != 0 or not chunks:
        raise RuntimeError(f"espeak_Synth failed ({status}) on {text!r}")
    return Synthesis(np.concatenate(chunks), sample_rate, tuple(events))


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    result = _synth_here(request["text"], Voice(*request["voice"]))
    events = np.array(result.events, dtype=np.int64).reshape(-1, 3)
    np.savez(sys.argv[1], audio=result.audio, sample_rate=result.sample_rate, events=events)

"""Audio loading, validation and Whisper's time grids.

Two time axes exist and are never both called "frames":

- ``mel_frames``: log-mel spectrogram columns, 10 ms each (``MEL_FRAME_SECONDS``),
  3000 per 30 s window (``N_MEL_FRAMES``).
- ``enc_frames``: encoder output positions, 20 ms each (``ENC_FRAME_SECONDS``),
  1500 per 30 s window (``N_ENC_FRAMES``). Cross-attention reads this axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in one Whisper window
N_MEL_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
MEL_FRAME_SECONDS = 1 / MEL_FRAMES_PER_SECOND  # 0.01 s
ENC_SUBSAMPLING = 2  # Whisper's second conv has stride 2
N_ENC_FRAMES = N_MEL_FRAMES // ENC_SUBSAMPLING  # 1500
ENC_FRAMES_PER_SECOND = MEL_FRAMES_PER_SECOND // ENC_SUBSAMPLING  # 50
ENC_FRAME_SECONDS = 1 / ENC_FRAMES_PER_SECOND  # 0.02 s

SILENCE_PEAK = 1e-4  # peak amplitude below which audio counts as silent (-80 dBFS)


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, silent or too long."""


def load_audio(
    source: str | Path | np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = CHUNK_SECONDS,
) -> np.ndarray:
    """Load and validate audio as 16 kHz mono float32.

    ``source`` is a path to any file libsndfile reads (wav, flac, ogg, ...) or an array at
    ``sample_rate`` Hz, shape = (samples,) or (samples, channels). Multi-channel audio is
    down-mixed by averaging, other rates are resampled. Raises :class:`AudioError` for
    unreadable, empty, all-silent or over-30-second audio (``max_seconds=None``: any length,
    for callers that cut windows themselves).
    """
    if isinstance(source, str | Path):
        name = str(source)
        audio, sample_rate = _read_file(Path(source))
    else:
        name = "<array>"
        audio = np.asarray(source, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise AudioError(f"{name}: expected (samples,) or (samples, channels), got {audio.shape}")
    audio = resample(audio.astype(np.float32), sample_rate, SAMPLE_RATE)
    validate(audio, name=name, max_seconds=max_seconds)
    return audio


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as err:  # libsndfile raises its own error types
        raise AudioError(
            f"{path}: cannot read it as audio ({err}); give a wav, flac or ogg file"
        ) from err
    return audio, int(rate)


def validate(
    audio: np.ndarray, *, name: str = "<array>", max_seconds: float | None = CHUNK_SECONDS
) -> None:
    """Raise :class:`AudioError` if 16 kHz mono ``audio`` is empty, silent, non-finite or > 30 s."""
    if audio.size == 0:
        raise AudioError(f"{name}: the audio is empty")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: the audio holds NaN or infinite samples")
    if float(np.abs(audio).max()) < SILENCE_PEAK:
        raise AudioError(f"{name}: the audio is silent (peak below {SILENCE_PEAK:g})")
    seconds = audio.size / SAMPLE_RATE
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            f"{name}: the audio lasts {seconds:.1f} s; Whisper reads at most {CHUNK_SECONDS} s. "
            "Cut it into shorter utterances first."
        )


def resample(audio: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample with a polyphase filter (scipy); a no-op when the rates match."""
    if source_rate == target_rate:
        return audio
    if source_rate <= 0:
        raise AudioError(f"invalid sample rate {source_rate}")
    from scipy.signal import resample_poly

    g = math.gcd(source_rate, target_rate)
    return resample_poly(audio, target_rate // g, source_rate // g).astype(np.float32)


def n_mel_frames(audio: np.ndarray) -> int:
    """Number of mel frames that hold ``audio`` (the rest of the 3000 are padding)."""
    return min(N_MEL_FRAMES, math.ceil(audio.size / HOP_LENGTH))


def n_enc_frames(audio: np.ndarray) -> int:
    """Number of encoder frames that hold ``audio`` (whisper's ``num_frames // 2``)."""
    return min(N_ENC_FRAMES, math.ceil(n_mel_frames(audio) / ENC_SUBSAMPLING))


def duration(audio: np.ndarray) -> float:
    """Duration in seconds of 16 kHz ``audio``."""
    return audio.size / SAMPLE_RATE

"""load_audio on bad input: clear errors, down-mixing, resampling, and the frame-count grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xattn_utils.audio import (
    N_ENC_FRAMES,
    N_MEL_FRAMES,
    SAMPLE_RATE,
    AudioError,
    load_audio,
    n_enc_frames,
    n_mel_frames,
    resample,
)


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


def test_non_audio_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is text, not audio\n")
    with pytest.raises(AudioError, match=r"notes\.wav: cannot read it as audio"):
        load_audio(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"nowhere\.flac: no such audio file"):
        load_audio(tmp_path / "nowhere.flac")


def test_empty_file_and_array(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"empty\.wav: the audio is empty"):
        load_audio(path)
    with pytest.raises(AudioError, match="the audio is empty"):
        load_audio(np.zeros(0, dtype=np.float32))


def test_all_silent(tmp_path: Path) -> None:
    path = tmp_path / "silence.flac"
    sf.write(path, np.zeros(SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"silence\.flac: the audio is silent"):
        load_audio(path)


def test_non_finite() -> None:
    audio = sine(440, 1, SAMPLE_RATE)
    audio[10] = np.nan
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(audio)


def test_longer_than_30_s(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, sine(220, 31, SAMPLE_RATE), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"long\.wav: the audio lasts 31\.0 s.*at most 30 s"):
        load_audio(path)
    assert load_audio(sine(220, 30, SAMPLE_RATE)).size == 30 * SAMPLE_RATE  # 30 s is allowed


def test_bad_shape() -> None:
    with pytest.raises(AudioError, match=r"expected \(samples,\) or \(samples, channels\)"):
        load_audio(np.ones((2, 3, 4), dtype=np.float32))


def test_stereo_is_down_mixed(tmp_path: Path) -> None:
    left, right = sine(440, 1, SAMPLE_RATE, 0.6), sine(440, 1, SAMPLE_RATE, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.shape == (SAMPLE_RATE,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)
    from_array = load_audio(np.stack([left, right], axis=1))
    np.testing.assert_allclose(from_array, audio, atol=1e-6)


@pytest.mark.parametrize(("rate", "freq"), [(44_100, 440.0), (8_000, 1_000.0), (22_050, 3_000.0)])
def test_other_rates_are_resampled(tmp_path: Path, rate: int, freq: float) -> None:
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, sine(freq, 2, rate), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32
    assert audio.size == 2 * SAMPLE_RATE
    assert abs(peak_frequency(audio) - freq) <= 1.0  # 0.5 Hz FFT bins over 2 s
    middle = audio[SAMPLE_RATE // 2 : -SAMPLE_RATE // 2]  # away from the filter's edges
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_array_at_another_rate() -> None:
    audio = load_audio(sine(500, 1, 48_000), sample_rate=48_000)
    assert audio.size == SAMPLE_RATE
    assert abs(peak_frequency(audio) - 500) <= 1.0


def test_resample_edge_cases() -> None:
    audio = sine(100, 0.1, SAMPLE_RATE)
    assert resample(audio, SAMPLE_RATE) is audio  # a no-op at 16 kHz
    with pytest.raises(AudioError, match="invalid sample rate 0"):
        resample(audio, 0)


def test_frame_counts() -> None:
    assert n_mel_frames(np.zeros(SAMPLE_RATE)) == 100
    assert n_enc_frames(np.zeros(SAMPLE_RATE)) == 50
    assert n_mel_frames(np.zeros(SAMPLE_RATE + 1)) == 101  # a partial frame counts
    assert n_enc_frames(np.zeros(SAMPLE_RATE + 1)) == 51
    assert n_mel_frames(np.zeros(40 * SAMPLE_RATE)) == N_MEL_FRAMES
    assert n_enc_frames(np.zeros(40 * SAMPLE_RATE)) == N_ENC_FRAMES

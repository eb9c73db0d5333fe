"""Shared fixtures: seeded tiny random Whisper and Speech2Text models (offline, fast) and test
audio."""

from __future__ import annotations

import numpy as np
import pytest

import xattn_utils as xu


@pytest.fixture(scope="session")
def tiny() -> xu.LoadedModel:
    """A randomly initialised 2+2-layer Whisper with tiny.en's tokenizer."""
    return xu.load_model("random-tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_s2t() -> xu.LoadedModel:
    """A randomly initialised 2+2-layer Speech2Text ASR model with a demo-trained tokenizer."""
    return xu.load_model("random-tiny-s2t", device="cpu")


@pytest.fixture(scope="session")
def tone() -> np.ndarray:
    """2.5 s of a gliding tone at 16 kHz: not speech, but energy in every frame."""
    t = np.arange(int(2.5 * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_cuda() -> xu.LoadedModel:
    """The tiny random Whisper on CUDA (``gpu`` tests only)."""
    return xu.load_model("random-tiny", device="cuda")

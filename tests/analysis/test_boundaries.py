"""boundaries: the loudness envelope, pauses found where planted, boundaries snapped to pauses
and energy dips, never into a pause, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from xattn_utils.analysis import boundaries as B
from xattn_utils.audio import SAMPLE_RATE


def speech_with_pauses(pauses, seconds=4.0, seed=0) -> np.ndarray:
    """Noise at speech level with digital silence over ``pauses`` ((start, end) seconds)."""
    audio = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))
    for a, b in pauses:
        audio[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] = 0
    return audio.astype(np.float32)


def test_envelope_has_one_value_per_5_ms_and_the_right_level():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    env = B.envelope_db(0.5 * np.sin(2 * np.pi * 440 * t))
    assert env.shape == (SAMPLE_RATE // 80,)
    np.testing.assert_allclose(np.median(env), 20 * np.log10(0.5 / np.sqrt(2)), atol=0.2)


def test_pauses_are_found_where_planted():
    env = B.envelope_db(speech_with_pauses([(1.0, 1.3), (2.0, 2.03)]))
    pauses = B.find_pauses(env, silence_db=30, min_pause_s=0.05)
    assert len(pauses) == 1  # the 30 ms one is too short
    (a, b), tol = pauses[0], B.ENVELOPE_WINDOW_SECONDS / 2 + B.ENVELOPE_SECONDS
    assert abs(a - 1.0) <= tol and abs(b - 1.3) <= tol


def test_words_around_a_pause_end_and_start_at_its_edges():
    env = B.envelope_db(speech_with_pauses([(0.0, 0.4), (1.0, 1.3)]))
    pauses = B.find_pauses(env, silence_db=30, min_pause_s=0.05)
    spans = [(0.0, 0.85), (0.85, 1.6), (1.6, 2.2)]  # the second word took the pause early
    out = B.snap_to_pauses(spans, pauses, window_s=0.5)
    (_, lead_end), (pa, pb) = pauses
    assert out == [(lead_end, pa), (pb, 1.6), (1.6, 2.2)]
    far = B.snap_to_pauses(spans, pauses, window_s=0.05)  # the first word's start is 0 s away
    assert far[1] == (0.85, 1.6)


def test_a_shared_boundary_moves_to_the_energy_dip_within_its_radius():
    audio = speech_with_pauses([])
    audio[int(1.02 * SAMPLE_RATE) : int(1.05 * SAMPLE_RATE)] *= 0.05  # a dip, not a pause
    env = B.envelope_db(audio)
    (_, end), (start, _) = B.snap_to_dips([(0.5, 1.0), (1.0, 1.5)], env, [], radius_s=0.06)
    assert end == start and 1.02 <= start <= 1.05
    (_, near), _ = B.snap_to_dips([(0.5, 1.0), (1.0, 1.5)], env, [], radius_s=0.01)
    assert abs(near - 1.0) <= 0.01 + 1e-9  # the dip is out of reach


@pytest.mark.parametrize("seed", range(20))
def test_no_boundary_is_moved_into_a_planted_silence(seed):
    rng = np.random.default_rng(seed)
    planted = sorted({(round(a, 2), round(a + rng.uniform(0.06, 0.4), 2))
                      for a in rng.uniform(0.1, 3.4, 3)})  # fmt: skip
    planted = [p for i, p in enumerate(planted) if i == 0 or p[0] > planted[i - 1][1] + 0.05]
    env = B.envelope_db(speech_with_pauses(planted, seed=seed))
    cuts = np.sort(rng.uniform(0, 4, 2 * 8))
    spans = [(float(a), float(b)) for a, b in cuts.reshape(-1, 2)]
    spans = [
        (a, spans[i + 1][0] if i + 1 < len(spans) and rng.random() < 0.5 else b)
        for i, (a, b) in enumerate(spans)
    ]  # some words share a boundary
    pauses = B.find_pauses(env, silence_db=30, min_pause_s=0.05)
    options = B.SnapOptions()
    out = B.snap_boundaries(spans, env, options)
    assert out == B.snap_boundaries(spans, env, options)  # deterministic
    flat_in = [t for s in spans for t in s]
    flat_out = [t for s in out for t in s]
    assert flat_out == sorted(flat_out)  # words keep their order and never overlap
    for before, after in zip(flat_in, flat_out, strict=True):
        inside = any(a < after < b for a, b in pauses)
        assert after == before or not inside

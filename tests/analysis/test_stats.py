"""stats: bootstrap CIs, corpus tables, reliability and the correction for attenuation."""

import numpy as np
import pandas as pd
import pytest
import torch

from xattn_utils import compare as C
from xattn_utils import stats as S

L, H, T, E = 3, 2, 5, 40  # layers, heads, tokens, enc_frames: the shape of conftest's ca


def test_bootstrap_deterministic_and_contains_mean(rng):
    values = np.append(rng.normal(0.5, 0.2, size=50), [np.nan, np.nan])
    est = S.bootstrap_ci(values, seed=3)
    assert est == S.bootstrap_ci(values, seed=3)
    assert est != S.bootstrap_ci(values, seed=4)
    assert est.low < est.mean < est.high
    assert (est.n, est.n_nan) == (50, 2)
    assert est.mean == pytest.approx(np.nanmean(values))
    wide = S.bootstrap_ci(values, seed=3, level=0.99)
    assert wide.low <= est.low and wide.high >= est.high
    assert np.isnan(S.bootstrap_ci([np.nan]).mean) and S.bootstrap_ci([np.nan]).n_nan == 1
    assert est.to_frame().columns.tolist() == ["mean", "low", "high", "n", "n_nan", "level"]


def test_corpus_table_groups_over_utterances(ca, rng):
    frames = []
    for u in range(6):
        sm = rng.random((T, E))
        sm[0] = 1.0 if u == 0 else sm[0]  # one constant token in utterance 0
        frames.append(C.compare_maps(ca, sm, special=[False] * T, utterance=f"u{u}"))
    df = pd.concat(frames, ignore_index=True)
    table = S.corpus_table(df, seed=1)
    assert len(table) == L * H + L + 1
    row = table.set_index("map").loc["CA L0H0"]
    assert row["n"] == 6 and row["n_nan"] == 0 and row["n_nan_tokens"] == 1
    est = S.bootstrap_ci(df.loc[df["map"] == "CA L0H0", "r"], seed=1)
    assert row["mean"] == pytest.approx(est.mean) and row["low"] == pytest.approx(est.low)
    by_kind = S.corpus_table(df, by=["kind"]).set_index("kind")
    assert by_kind.loc["head", "n"] == 6  # averaged over heads within each utterance
    heads = df[df["kind"] == "head"].groupby("utterance")["r"].mean()
    assert by_kind.loc["head", "mean"] == pytest.approx(heads.mean())
    assert S.corpus_table(df, seed=1).equals(table)


def test_spearman_brown_and_disattenuation():
    from xattn_utils.analysis.stats import disattenuate, spearman_brown

    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert spearman_brown(0.25, factor=4) == pytest.approx(0.5714285714)
    assert disattenuate(0.3, 0.36) == pytest.approx(0.5)
    assert np.isnan(disattenuate(0.3, -0.1))


def test_split_half_reliability_tracks_noise():
    from xattn_utils.analysis.stats import reliability

    gen = torch.Generator().manual_seed(0)
    signal = torch.rand(5, 40, generator=gen)
    same = reliability(torch.stack([signal, signal]))
    assert same.half == pytest.approx(1.0) and same.full == pytest.approx(1.0)
    noise = torch.randn(2, 5, 40, generator=gen)
    pure = reliability(noise)
    assert abs(pure.half) < 0.2
    noisy = reliability(signal + 0.3 * torch.randn(2, 5, 40, generator=gen) / 3**0.5)
    # var(signal) = 1/12, noise var = 0.03: r_half ~ 0.083 / 0.113 ~ 0.74
    assert 0.6 < noisy.half < 0.85 and noisy.full > noisy.half
    sm_x = torch.rand(2, 3, 20, 8, generator=gen)
    assert reliability(sm_x, special=[True, False, False]).n_tokens == 2

"""compare: pooling, CA views and correlations against reference implementations."""

import warnings

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from xattn_utils import compare as C
from xattn_utils.maps.views import select

L, H, T, E = 3, 2, 5, 40  # layers, heads, tokens, enc_frames: the shape of conftest's ca


@pytest.mark.parametrize("mel_frames", [80, 81])
@pytest.mark.parametrize("how", ["max", "mean", "sum"])
def test_pool_to_enc_matches_torch_pooling(how, mel_frames):
    sm_x = torch.randn(T, mel_frames, 16, generator=torch.Generator().manual_seed(1))
    got = C.pool_to_enc(sm_x, how=how)
    assert got.shape == (T, (mel_frames + 1) // 2)
    x = sm_x[:, None]  # (tokens, 1, mel_frames, mel_bins)
    if how == "max":
        ref = F.max_pool2d(x, kernel_size=(2, 16), ceil_mode=True)
    else:
        ref = F.avg_pool2d(x, kernel_size=(2, 16), ceil_mode=True)
        if how == "sum":  # ceil-mode windows divide by their real size: undo it
            ref = (
                ref * torch.tensor([32.0] * (mel_frames // 2) + [16.0] * (mel_frames % 2))[:, None]
            )
    torch.testing.assert_close(got, ref[:, 0, :, 0])


def test_pool_to_enc_accepts_numpy(rng):
    sm_x = rng.standard_normal((T, 10, 4)).astype(np.float32)
    torch.testing.assert_close(C.pool_to_enc(sm_x), C.pool_to_enc(torch.from_numpy(sm_x)))


@pytest.mark.parametrize("correlation", ["pearson", "spearman"])
def test_token_correlations_match_scipy(correlation, rng):
    a = rng.standard_normal((T, E))
    b = a + rng.standard_normal((T, E))
    b[1, :10] = 0.0  # ties for spearman
    ref_fn = scipy.stats.pearsonr if correlation == "pearson" else scipy.stats.spearmanr
    ref = [ref_fn(a[t], b[t])[0] for t in range(T)]
    got = C.token_correlations(torch.from_numpy(a).float(), b, correlation=correlation)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(C.token_correlations(a, b, correlation=correlation), ref, rtol=1e-10)


def test_token_correlations_broadcast_over_views(ca, rng):
    sm = rng.random((T, E))
    got = C.token_correlations(ca.reshape(L * H, T, E), sm)
    assert got.shape == (L * H, T)
    np.testing.assert_allclose(got[3], C.token_correlations(ca[1, 1], sm))


def test_constant_rows_give_nan_and_are_counted(rng):
    a, b = rng.standard_normal((T, E)), rng.standard_normal((T, E))
    a[0] = 0.1
    b[2] = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = C.token_correlations(a, b)
        rs = C.token_correlations(a, b, correlation="spearman")
    assert np.isnan(r[[0, 2]]).all() and np.isfinite(r[[1, 3, 4]]).all()
    assert np.isnan(rs[[0, 2]]).all()
    score = C.utterance_score(a, b)
    assert (score.n_tokens, score.n_nan) == (3, 2)
    assert score.mean == pytest.approx(r[[1, 3, 4]].mean())
    kept = C.utterance_score(a, b, keep=[False, True, True, True, True])
    assert (kept.n_tokens, kept.n_nan) == (3, 1)
    assert kept.to_frame().loc[0, "n_nan"] == 1


def test_flattened_pearson_equals_mean_token_r_after_zscore(rng):
    a, b = rng.standard_normal((T, E)), rng.standard_normal((T, E))
    za, zb = C.normalize(a).numpy(), C.normalize(b).numpy()
    flat = scipy.stats.pearsonr(za.ravel(), zb.ravel())[0]
    assert flat == pytest.approx(C.token_correlations(a, b).mean(), rel=1e-5)


def test_normalize(rng):
    x = rng.standard_normal((T, 6, 4)) * 5 + 2
    z = C.normalize(x, axis=(-2, -1)).double()
    torch.testing.assert_close(z.mean((-2, -1)), torch.zeros(T, dtype=z.dtype))
    m = C.normalize(x, how="minmax")
    assert m.amin(-1).eq(0).all() and torch.allclose(m.amax(-1), torch.ones(T, 6).to(m))
    torch.testing.assert_close(C.normalize(x, how="zscore_minmax"), m)
    assert C.normalize(np.ones((2, 3))).eq(0).all()


def test_planted_head_gives_r_one(ca, rng):
    sm_h = torch.from_numpy(rng.random((T, E))).float()
    planted = ca.clone()
    planted[1, 0] = sm_h
    special = [True, False, False, False, False]
    df = C.compare_maps(planted, sm_h, special=special, alignment_heads=[(1, 0)])
    assert len(df) == L * H + L + 2
    assert list(df.columns[:7]) == [
        "utterance",
        "against",
        "map",
        "kind",
        "layer",
        "head",
        "correlation",
    ]
    row = df.set_index("map").loc["CA L1H0"]
    assert row["r"] == pytest.approx(1.0) and row["n_tokens"] == T - 1 and row["n_nan"] == 0
    assert (row["kind"], row["layer"], row["head"], row["against"]) == ("head", 1, 0, "SM_H")
    assert df.set_index("map").loc["CA alignment heads", "r"] == pytest.approx(1.0)
    other_heads = df[(df["kind"] == "head") & (df["map"] != "CA L1H0")]
    assert other_heads["r"].lt(0.5).all()
    all_tokens = C.compare_maps(planted, sm_h, special=special, include_special=True)
    assert all_tokens.set_index("map").loc["CA L1H0", "n_tokens"] == T


def test_compare_maps_pools_sm_x_and_crops_time(ca, rng):
    sm_x = rng.random((T, 2 * E - 11, 8))  # fewer (and odd) mel frames than CA covers
    views = ["CA L0H1", "CA all heads"]
    df = C.compare_maps(ca, sm_x, special=[False] * T, views=views, pooling="mean")
    assert list(df["map"]) == views and (df["against"] == "SM_X").all()
    pooled = C.pool_to_enc(sm_x, how="mean")
    n = pooled.shape[1]
    assert n == E - 5
    expected = C.utterance_score(ca[0, 1, :, :n], pooled).mean
    assert df.loc[0, "r"] == pytest.approx(expected)
    with pytest.raises(ValueError):
        C.compare_maps(ca, sm_x[:-1], special=[False] * (T - 1))
    with pytest.raises(ValueError):
        C.compare_maps(ca, sm_x, special=[False] * T, views=["CA L9"])
    with pytest.raises(ValueError, match="unknown CA view"):
        C.compare_maps(ca, sm_x, special=[False] * T, views=["L0"])


def test_compare_maps_spearman(ca, rng):
    sm = rng.random((T, E))
    df = C.compare_maps(ca, sm, special=[False] * T, views=["CA L0H0"], correlation="spearman")
    assert (df["correlation"] == "spearman").all()
    ref = np.mean([scipy.stats.spearmanr(ca[0, 0, t], sm[t])[0] for t in range(T)])
    assert df.loc[0, "r"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("from_top", [False, True])
def test_cumulative_layers(ca, rng, from_top):
    sm = rng.random((T, E))
    special = [False] * T
    df = C.cumulative_layers(ca, sm, special=special, from_top=from_top)
    assert len(df) == L + 1 and df["kind"].tolist() == ["cumulative"] * L + ["all"]
    first = df.iloc[0]
    layer = L - 1 if from_top else 0
    assert (first["first_layer"], first["last_layer"]) == (layer, layer)
    single = C.compare_maps(ca, sm, special=special, views=[f"CA L{layer}", "CA all heads"])
    assert df["map"].iloc[-1] == "CA all heads"
    assert df["map"].iloc[1] == (f"CA L{L - 2}-L{L - 1}" if from_top else "CA L0-L1")
    close = dict(rel=1e-4, abs=1e-6)  # float32 sums in a different order
    assert first["r"] == pytest.approx(single.loc[0, "r"], **close)
    assert df.iloc[-2]["r"] == pytest.approx(df.iloc[-1]["r"], **close)
    assert df.iloc[-1]["r"] == pytest.approx(single.loc[1, "r"], **close)
    two = df.iloc[1]
    layers = [L - 2, L - 1] if from_top else [0, 1]
    heads = [(ly, h) for ly in layers for h in range(H)]
    expected = C.utterance_score(select(ca, heads), sm).mean
    assert two["r"] == pytest.approx(expected, **close) and two["n_layers"] == 2

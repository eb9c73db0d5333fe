"""Context mixing (value zeroing, rollout), the CA views built on it, and the gap it closes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from xattn_utils import compare, context, mixing
from xattn_utils.model.decode import features


@pytest.fixture(scope="module")
def states(tiny, tone):
    return mixing.encoder_states(tiny, features(tiny, tone))


@pytest.fixture(scope="module")
def mixed(tiny, tone):
    return mixing.encoder_mixing(tiny, tone)


def test_encoder_states_are_the_encoders(tiny, tone, states):
    enc = tiny.model.model.encoder
    with torch.no_grad():
        expected = enc(features(tiny, tone)).last_hidden_state[0]
    assert states.shape == (len(enc.layers) + 1, 1500, tiny.model.config.d_model)
    torch.testing.assert_close(enc.layer_norm(states[-1]), expected)


def test_batched_value_zeroing_equals_the_real_layer_looped(tiny, states):
    enc = tiny.model.model.encoder
    groups = [torch.tensor([i]) for i in (0, 5, 60)] + [torch.arange(3, 7), torch.arange(125, 1500)]
    rows = torch.cat([torch.arange(125), torch.arange(125, 1500, 25)])
    for ly, norm in ((0, None), (1, enc.layer_norm)):
        layer = enc.layers[ly]
        fast = mixing.layer_distances(
            layer, states[ly], groups, rows, final_norm=norm, batch_size=2
        )
        slow = mixing.layer_distances_looped(layer, states[ly], groups, rows, final_norm=norm)
        assert fast.shape == (len(rows), len(groups))
        assert fast.max() > 1e-8
        torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-9)
    assert not enc.layers[0].self_attn.v_proj._forward_hooks  # no hook left behind


def test_zeroing_a_frame_nothing_attends_to_changes_nothing(tiny, states):
    layer = tiny.model.model.encoder.layers[0]
    key_mask = torch.ones(1500, dtype=torch.bool)
    key_mask[40] = False  # planted: no query may attend to frame 40
    groups = [torch.tensor([j]) for j in (39, 40, 41)]
    rows = torch.arange(125)
    fast = mixing.layer_distances(layer, states[0], groups, rows, key_mask=key_mask)
    slow = mixing.layer_distances_looped(layer, states[0], groups, rows, key_mask=key_mask)
    assert torch.all(fast[:, 1] == 0) and torch.all(slow[:, 1] == 0)
    assert torch.all(fast[:, [0, 2]] > 0)
    plain = mixing.layer_distances(layer, states[0], groups, rows)
    assert torch.all(plain[:, 1] > 0)  # unmasked, the same frame does matter


def test_rows_and_rollout_sum_to_one(tiny, mixed):
    s = mixed.n_speech
    assert s == 125 and mixed.padding
    assert mixed.matrices.shape == (2, s + 1, s + 1)
    assert torch.all(mixed.matrices >= 0)
    torch.testing.assert_close(mixed.matrices.sum(-1), torch.ones(2, s + 1))
    rolled = mixed.rollout()
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, s + 1))
    torch.testing.assert_close(rolled[1], mixed.matrices[1] @ mixed.matrices[0])
    shares = mixed.shares(rolled_out=True).groupby("layer")["value"].sum()
    np.testing.assert_allclose(shares, 1.0, rtol=1e-5)
    assert mixed.value_norms.shape == (tiny.n_layers, tiny.n_heads, s)


def test_groups_spread_evenly_and_keep_rows_stochastic(tiny, tone, mixed):
    grouped = mixing.encoder_mixing(tiny, tone, group=4)
    assert grouped.matrices.shape == mixed.matrices.shape
    torch.testing.assert_close(grouped.matrices.sum(-1), torch.ones(2, 126))
    block = grouped.distances[0, :, 8:12]  # frames 8..11 are one group
    torch.testing.assert_close(block, block[:, :1].expand(-1, 4))
    # the group's total is the distance of zeroing its four frames together
    layer, x = tiny.model.model.encoder.layers[0], mixing.encoder_states(tiny, features(tiny, tone))
    rows = torch.arange(125)
    together = mixing.layer_distances_looped(layer, x[0], [torch.arange(8, 12)], rows)
    torch.testing.assert_close(block.sum(1)[:125], together[:, 0], rtol=1e-3, atol=1e-9)


def test_bad_group_is_a_clear_error(tiny, tone):
    with pytest.raises(ValueError, match="group"):
        mixing.encoder_mixing(tiny, tone, group=0)


def test_propagated_map_is_ca_under_identity_mixing():
    ca = torch.rand(3, 2, 5, 7)
    ca = ca / ca.sum(-1, keepdim=True) * 0.8  # 20% of the mass beyond the speech
    torch.testing.assert_close(compare.propagate(ca, torch.eye(7)), ca)
    torch.testing.assert_close(compare.propagate(ca, torch.eye(8), padding_block=True), ca)
    m = torch.rand(8, 8)
    m = m / m.sum(-1, keepdim=True)
    full = torch.cat([ca, torch.full((3, 2, 5, 1), 0.2)], dim=-1)
    torch.testing.assert_close(compare.propagate(ca, m, padding_block=True), (full @ m)[..., :7])
    with pytest.raises(ValueError, match="square"):
        compare.propagate(ca, torch.eye(7), padding_block=True)


def test_norm_weighted_view_equals_hand_computation(tiny, states):
    hidden = tiny.model.model.encoder.layer_norm(states[-1]).detach()
    norms = mixing.cross_value_norms(tiny, hidden)
    layer, head = 1, tiny.n_heads - 1
    attn = tiny.model.model.decoder.layers[layer].encoder_attn
    dh = attn.head_dim
    cols = slice(head * dh, (head + 1) * dh)
    with torch.no_grad():
        v = hidden @ attn.v_proj.weight.T + attn.v_proj.bias
        f = v[:, cols] @ attn.out_proj.weight[:, cols].T
    ca = torch.rand(tiny.n_layers, tiny.n_heads, 4, 1500)
    weighted = compare.norm_weighted(ca, norms)
    torch.testing.assert_close(weighted[layer, head], ca[layer, head] * f.norm(dim=-1))
    assert compare.norm_weighted(ca[..., :100], norms).shape == (
        tiny.n_layers,
        tiny.n_heads,
        4,
        100,
    )


def _table(x0, h0, x1, rx, rh) -> pd.DataFrame:
    rows = []
    for u, vals in enumerate(zip(x0, h0, x1, strict=True)):
        for name, r_x in (("CA all heads", vals[0]), ("CA -> input", vals[2])):
            rows.append({"model": "m", "subset": "s", "utterance": f"u{u}", "map": name,
                         "r_x": r_x, "r_h": vals[1], "reliability_x": rx,
                         "reliability_h": rh})  # fmt: skip
    return pd.DataFrame(rows)


def test_gap_closed_observed_and_corrected():
    noise = np.array([-0.02, 0.0, 0.02, 0.01, -0.01])
    table = _table(0.1 + noise, 0.5 + noise, 0.3 + noise, 0.25, 1.0)
    got = context.gap_closed(table)
    assert got.n == 5 and got.share == pytest.approx(0.5)
    assert got.share_low == pytest.approx(0.5) and got.share_high == pytest.approx(0.5)
    assert got.gap == pytest.approx(0.4) and got.closed == pytest.approx(0.2)
    # corrected: (0.2 / 0.5) / (0.5 / 1 - 0.1 / 0.5)
    assert got.share_corrected == pytest.approx(0.4 / 0.3)
    assert got.gap_corrected == pytest.approx(0.3)
    assert np.isnan(context.gap_closed(_table([0.1], [0.5], [0.3], 0.0, 1.0)).share_corrected)
    no_folds = context.gap_closed(_table(0.1 + noise, 0.5 + noise, 0.3 + noise, np.nan, np.nan))
    assert no_folds.share == pytest.approx(0.5) and np.isnan(no_folds.share_corrected)
    frame = context.gap_closed_table(table, views=["CA -> input"])
    assert list(frame["subset"]) == ["s", "all"] and frame["share"].iloc[0] == got.share


def test_rollout_with_residual_stays_row_stochastic(mixed):
    rolled = mixed.rollout(residual=0.5)
    torch.testing.assert_close(rolled.sum(-1), torch.ones_like(rolled.sum(-1)))
    eye = torch.eye(mixed.matrices.shape[-1])
    half = 0.5 * mixed.matrices + 0.5 * eye
    torch.testing.assert_close(rolled[1], half[1] @ half[0])
    torch.testing.assert_close(mixing.rollout(mixed.matrices, residual=1.0)[-1], eye)
    with pytest.raises(ValueError, match="residual"):
        mixed.rollout(residual=1.5)


def test_plot_mixing_draws_the_speech_block(mixed):
    import matplotlib.pyplot as plt

    from xattn_utils import plots

    ax = plots.plot_mixing(mixed, layer=0, rolled_out=False)
    assert ax.images[0].get_array().shape == (mixed.n_speech, mixed.n_speech)
    assert "layer 0" in ax.get_title()
    assert "rollout through layer 1" in plots.plot_mixing(mixed).get_title()
    plt.close("all")

"""CA views: labels, pairs, selection (the one head-picking code), stacking and bad input."""

import numpy as np
import pytest
import torch

from xattn_utils import views as V
from xattn_utils.maps.views import View

L, H, T, E = 3, 2, 4, 30  # layers, heads, tokens, enc_frames


@pytest.fixture
def ca():
    g = torch.Generator().manual_seed(0)
    return torch.rand(L, H, T, E, generator=g).softmax(-1)


def test_labels_round_trip():
    built = [View.all(), View.of_layer(3), View.of_head(3, 2), View.of_layers(0, 3),
             View.alignment()]  # fmt: skip
    labels = ["CA all heads", "CA L3", "CA L3H2", "CA L0-L3", "CA alignment heads"]
    assert [v.label for v in built] == labels
    assert [V.parse(label) for label in labels] == built
    assert V.parse(View.of_head(1, 0)) == View.of_head(1, 0)
    assert View.of_heads([(0, 1)], "calibrated").label == "calibrated"


@pytest.mark.parametrize("bad", ["all", "L3", "CA L3H", "CA", "SM_X", "CA L-1"])
def test_unknown_labels_are_rejected(bad):
    with pytest.raises(ValueError, match="unknown CA view"):
        V.parse(bad)


def test_custom_names_must_not_shadow_built_ins():
    for name in ["CA all heads", "CA alignment heads", "CA L1", "CA L1H0", "CA L0-L1", ""]:
        with pytest.raises(ValueError, match="clashes"):
            View.of_heads([(0, 0)], name)
    with pytest.raises(ValueError, match="no heads"):
        View.of_heads([], "mine")
    with pytest.raises(ValueError, match="comes after"):
        View.of_layers(2, 1)


def test_select_values(ca):
    torch.testing.assert_close(V.select(ca), ca.mean((0, 1)))
    torch.testing.assert_close(V.select(ca, "CA L1"), ca[1].mean(0))
    torch.testing.assert_close(V.select(ca, View.of_head(2, 1)), ca[2, 1])
    torch.testing.assert_close(V.select(ca, View.of_layers(1, 2)), ca[1:].mean((0, 1)))
    torch.testing.assert_close(V.select(ca, [(0, 1), (2, 0)]), (ca[0, 1] + ca[2, 0]) / 2)
    aligned = V.select(ca, "CA alignment heads", alignment_heads=[(2, 0), (2, 1)])
    torch.testing.assert_close(aligned, ca[2].mean(0))
    torch.testing.assert_close(V.select(ca.numpy(), "CA L0H0"), ca[0, 0])  # numpy in


def test_select_reads_a_cross_attention_and_its_alignment_heads(ca):
    class FakeCA:  # what a CrossAttention offers: scores and alignment_heads
        scores, alignment_heads = ca, ((1, 1), (0, 0))

    got = V.select(FakeCA(), "CA alignment heads")
    torch.testing.assert_close(got, (ca[1, 1] + ca[0, 0]) / 2)
    override = V.select(FakeCA(), "CA alignment heads", alignment_heads=[(2, 1)])
    torch.testing.assert_close(override, ca[2, 1])


def test_all_heads_mean_is_bitwise_the_plain_mean(ca):
    """The analyses averaged all heads as ``ca.mean((0, 1))`` before; numbers stay identical."""
    assert torch.equal(V.select(ca), ca.mean((0, 1)))


def test_stack_keeps_heads_apart_in_layer_head_order(ca):
    st = V.stack(ca, [(2, 1), (0, 1)])
    assert st.shape == (2, T, E)
    torch.testing.assert_close(st[0], ca[0, 1])  # sorted: whisper's order
    torch.testing.assert_close(st[1], ca[2, 1])
    assert V.stack(ca).shape == (L * H, T, E)


def test_bad_input_is_named(ca):
    with pytest.raises(ValueError, match="out-of-range"):
        V.select(ca, View.of_head(L, 0))
    with pytest.raises(ValueError, match="out-of-range"):
        V.select(ca, [(0, H)])
    with pytest.raises(ValueError, match="alignment heads"):
        V.select(ca, "CA alignment heads")
    with pytest.raises(ValueError, match=r"\(layers, heads, tokens, enc_frames\)"):
        V.select(ca[0], "CA all heads")


def test_standard_views(ca):
    views = V.standard(L, H)
    assert len(views) == L * H + L + 1
    more = V.standard(L, H, alignment_heads=[(2, 0), (2, 1)], extra={"top": [(1, 1)]})
    assert len(more) == L * H + L + 1 + 2
    labels = [v.label for v in more]
    assert len(set(labels)) == len(labels) and labels[-2:] == ["CA alignment heads", "top"]
    assert {v.kind for v in more} == {"all", "layer", "head", "alignment", "custom"}
    maps = V.select_all(ca, more[:3])
    assert list(maps) == ["CA all heads", "CA L0", "CA L1"]
    with pytest.raises(ValueError):
        V.standard(L, H, extra={"bad": [(L, 0)]})
    with pytest.raises(ValueError):
        V.standard(L, H, extra={"CA all heads": [(0, 0)]})


def test_is_ca():
    assert V.is_ca("CA L1") and V.is_ca(np.str_("CA all heads"))
    assert not any(V.is_ca(x) for x in ["SM_X", "SM_H", "random", None, 3])

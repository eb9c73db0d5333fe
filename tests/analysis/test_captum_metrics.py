"""Captum's infidelity and sensitivity_max for the maps notebook 05 ranks."""

import math

import pytest
import torch

from xattn_utils import captum_metrics as cm
from xattn_utils import faithfulness as fa
from xattn_utils import occlusion as oc
from xattn_utils.maps.saliency import explain

TEXT = "hello there world"


def test_infidelity_is_zero_for_the_exact_effects_and_shares_its_occlusions():
    """A probability that is additive in the frames: the map of its per-frame effects has
    infidelity 0 (normalised), a random map does not; every map and token reuses the same
    occlusions (n + 1 distinct inputs)."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(10, 3, generator=gen, dtype=torch.float64)  # (enc_frames, tokens)
    seen = set()

    def probs(x):
        seen.update(row.numpy().tobytes() for row in x)
        return x.double() @ weights

    maps = {"exact": weights.T.clone(), "noisy": weights.T + torch.rand(3, 10, generator=gen)}
    options = cm.CaptumMetricOptions(n_infidelity=12)
    inf = cm.infidelities(probs, maps, [0, 2], 10, options=options, seed=0)
    assert inf.shape == (3, 2)  # exact, noisy, random x tokens
    assert inf[0].abs().max() < 1e-12
    assert (inf[1] > 1e-3).all() and (inf[2] > inf[0]).all()
    assert len(seen) <= options.n_infidelity + 1


def test_metrics_of_every_ranked_map_on_the_random_model(tiny, tone):
    e = explain(tiny, tone, text=TEXT, n_masks=4, progress=False, utterance="u")
    options = oc.FaithfulnessOptions(fractions=(0.5,), n_random=1, max_tokens=2)
    curves = fa.curves(tiny, tone, e.transcript, fa.time_maps(e), options=options, utterance="u",
                       progress=False)  # fmt: skip
    small = cm.CaptumMetricOptions(n_infidelity=3, n_sensitivity=1, radius=1e-6,
                                   sensitivity_masks=2)  # fmt: skip
    result = cm.captum_metrics(tiny, tone, e, curves, options=small)
    assert result.maps == (*fa.time_maps(e), "random")
    evaluated = torch.tensor(curves.evaluated)
    assert torch.isfinite(result.infidelity[:, evaluated]).all()
    assert torch.isnan(result.infidelity[:, ~evaluated]).all()
    assert torch.isfinite(result.sensitivity[:-1]).all() and math.isnan(result.sensitivity[-1])
    # CA is recomputed exactly: noise of 1e-6 on the log-mel moves it by far less than 1%
    assert result.sensitivity[0] < 1e-2
    table = cm.captum_table([result])
    assert set(table["measure"]) == set(cm.METRICS)
    assert (table["n"] == 1).all() and table["mean"].notna().all()
    assert not ((table["map"] == "random") & (table["measure"] == "sensitivity_max")).any()


@pytest.mark.parametrize(
    "kwargs",
    [{"n_infidelity": 0}, {"n_sensitivity": 1.5}, {"occlusion": 1.0}, {"radius": 0},
     {"sensitivity_masks": 0}],
)  # fmt: skip
def test_bad_options_raise(kwargs):
    with pytest.raises(oc.FaithfulnessError, match=next(iter(kwargs))):
        cm.CaptumMetricOptions(**kwargs)

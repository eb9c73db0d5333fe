"""Deletion and insertion curves: toy probability functions with known answers, then the tiny
random Whisper (endpoints and one interior point against direct forwards, store reuse)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xattn_utils import faithfulness as ff
from xattn_utils import occlusion as oc
from xattn_utils.analysis.faithfulness import (
    Curves,
    auc_table,
    curves,
    curves_corpus,
    faithfulness_table,
    time_maps,
)
from xattn_utils.analysis.occlusion import (
    RANDOM,
    FaithfulnessError,
    FaithfulnessOptions,
    curve_probabilities,
)
from xattn_utils.audio import n_mel_frames
from xattn_utils.maps.saliency import explain
from xattn_utils.model.decode import Transcript, features
from xattn_utils.store import ResultStore

# --- toys: no model --------------------------------------------------------------------------


def _transcript(n_text: int) -> Transcript:
    """A transcript of a prompt output, ``n_text`` text tokens and end-of-text."""
    n = n_text + 2
    return Transcript(
        input_ids=tuple(range(n)),
        output_ids=tuple(range(1, n + 1)),
        tokens=tuple(f"t{i}" for i in range(n)),
        special=(True, *[False] * n_text, True),
        text="toy",
        task="transcribe",
        language="en",
    )


def test_transcript_record_round_trips_through_json():
    tr = _transcript(3)
    record = json.loads(json.dumps(tr.to_record()))  # what a result store holds
    assert record["special"] == [True, False, False, False, True] and record["task"] == "transcribe"
    assert Transcript.from_record(record) == tr


def _toy_curves(probs, maps, tr, options, seed=0) -> Curves:
    fractions, p, n = curve_probabilities(probs, maps, tr.special, options=options, seed=seed)
    params = options.params() | {"seed": seed, "forwards": n}
    return Curves(tr, (*maps, RANDOM), fractions, p.float(), "toy", "u0", params)


N_ENC = 100
REGIONS = [(10, 20), (40, 45), (70, 90)]  # text token i depends on enc frames REGIONS[i]


def _planted(occluded: torch.Tensor) -> torch.Tensor:
    """Text token i's probability: 0.05 + 0.9 * the share of its region left unoccluded."""
    kept = (~occluded).double()
    text = [0.05 + 0.9 * kept[:, a:b].mean(1) for a, b in REGIONS]
    filler = torch.full((occluded.shape[0],), 0.5, dtype=torch.float64)
    return torch.stack([filler, *text, filler], dim=1)


def _region_maps(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.rand(len(REGIONS) + 2, N_ENC, generator=gen)
    inside = torch.zeros(len(REGIONS) + 2, N_ENC)
    for i, (a, b) in enumerate(REGIONS):
        inside[i + 1, a:b] = 1
    return {"right": inside + noise, "wrong": (1 - inside) + noise}


def test_planted_dependency_beats_random_and_pointing_away_loses():
    tr = _transcript(len(REGIONS))
    options = FaithfulnessOptions(fractions=(0.05, 0.1, 0.2, 0.5), n_random=4)
    result = _toy_curves(_planted, _region_maps(), tr, options)
    dele, ins = result.auc("deletion"), result.auc("insertion")
    right, wrong, rand = (result.maps.index(m) for m in ("right", "wrong", RANDOM))
    text = [i + 1 for i in range(len(REGIONS))]
    assert (dele[right, text] < dele[rand, text] - 0.1).all()
    assert (dele[rand, text] < dele[wrong, text]).all()
    assert (ins[right, text] > ins[rand, text] + 0.1).all()
    assert (ins[rand, text] > ins[wrong, text]).all()
    # the right map removes a whole region within its top share: the curve reaches the floor
    torch.testing.assert_close(result.probabilities[right, 0, 3, 3:], torch.full((3,), 0.05))
    table = faithfulness_table(auc_table([result]))
    gains = table[table["measure"] == "gain_vs_random"].set_index("map")["mean"]
    assert gains["right"] > 0.2 and gains["wrong"] < 0 and gains[RANDOM] == 0
    assert set(table["measure"]) == set(ff.MEASURES) and (table["n"] == 1).all()
    assert (table["tokens"] == len(REGIONS)).all()


def test_linear_model_deletion_plus_insertion_is_constant():
    """p = w . kept: deleting the top k leaves W - w(top k), inserting them gives w(top k)."""
    tr = _transcript(3)
    w = torch.rand(5, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 40

    def linear(occluded):
        return (~occluded).double() @ w.T

    maps = {"w": w.float(), "minus w": -w.float()}
    result = _toy_curves(linear, maps, tr, FaithfulnessOptions(fractions=(0.1, 0.3, 0.6)))
    p = result.probabilities.double()
    total = p[:, 0] + p[:, 1]  # (methods, tokens, steps)
    text = torch.tensor([not s for s in tr.special])
    expected = w.sum(1)[text].expand(3, -1)[..., None].expand(-1, -1, 5)
    torch.testing.assert_close(total[:, text], expected.float().double(), atol=1e-6, rtol=0)
    assert (p[0, 0, text, 1:-1] <= p[2, 0, text, 1:-1]).all()  # top weights first: lowest
    assert p[:, :, ~text].isnan().all()


def test_max_tokens_evaluates_the_same_seeded_sample_for_every_map():
    tr = _transcript(6)
    seen = []

    def probs(occluded):
        seen.append(len(occluded))
        return torch.full((len(occluded), len(tr)), 0.3, dtype=torch.float64)

    maps = {"a": torch.rand(8, 50), "b": torch.rand(8, 50)}
    options = FaithfulnessOptions(fractions=(0.2, 0.4), max_tokens=2, n_random=1)
    result = _toy_curves(probs, maps, tr, options, seed=3)
    evaluated = [t for t, e in enumerate(result.evaluated) if e]
    assert len(evaluated) == 2 and not any(tr.special[t] for t in evaluated)
    assert result.probabilities[:, :, evaluated].isfinite().all()
    assert sum(seen) == result.params["forwards"] <= 2 * 2 * (2 * 2 + 1) + 2
    assert set(auc_table([result])["token_index"]) == set(evaluated)
    again = _toy_curves(probs, maps, tr, options, seed=3)
    assert again.evaluated == result.evaluated  # same seed, same tokens
    others = {_toy_curves(probs, maps, tr, options, seed=s).evaluated for s in range(8)}
    assert len(others) > 1  # the seed picks them


def test_same_seed_same_curves_and_identical_inputs_run_once():
    tr = _transcript(len(REGIONS))
    maps = _region_maps()
    options = FaithfulnessOptions(fractions=(0.1, 0.3), n_random=2)
    a = _toy_curves(_planted, maps, tr, options, seed=5)
    b = _toy_curves(_planted, maps, tr, options, seed=5)
    c = _toy_curves(_planted, maps, tr, options, seed=6)
    assert torch.equal(a.probabilities.nan_to_num(), b.probabilities.nan_to_num())
    assert not torch.equal(a.probabilities[-1].nan_to_num(), c.probabilities[-1].nan_to_num())
    bound = 2 * 2 * (2 * len(REGIONS) + 2) + 2
    assert a.params["forwards"] == bound  # no two inputs coincide here
    twins = _toy_curves(_planted, {"x": maps["right"], "y": maps["right"].clone()}, tr, options)
    assert twins.params["forwards"] == bound - 2 * 2 * len(REGIONS)  # no ties: same orders
    assert torch.equal(twins.probabilities[0].nan_to_num(), twins.probabilities[1].nan_to_num())


def test_bad_modes_and_groupings_name_the_problem():
    tr = _transcript(2)

    def probs(occluded):
        return torch.zeros(len(occluded), 4)

    good = torch.rand(4, 20)
    with pytest.raises(FaithfulnessError, match="unknown mode"):
        _toy_curves(probs, {"CA": good}, tr, FaithfulnessOptions()).auc("ablation")
    with pytest.raises(FaithfulnessError, match="must include 'map'"):
        faithfulness_table(auc_table([_toy_curves(probs, {"CA": good}, tr, FaithfulnessOptions())]),
                           by=("model",))  # fmt: skip


# --- on the tiny random Whisper ----------------------------------------------------------------

OPTIONS = FaithfulnessOptions(fractions=(0.2, 0.6), n_random=1, max_tokens=2)
TEXT = "the cat sat"


@pytest.fixture(scope="module")
def audio(tone) -> np.ndarray:
    return tone[:12000]  # 75 mel frames: the last encoder frame covers one


@pytest.fixture(scope="module")
def explanation(tiny, audio):
    return explain(tiny, audio, text=TEXT, n_masks=4, progress=False, utterance="u0")


@pytest.fixture(scope="module")
def gradient(tiny, audio):
    return explain(tiny, audio, text=TEXT, method="saliency", progress=False, utterance="u0")


@pytest.fixture(scope="module")
def utterances(audio):
    return [SimpleNamespace(id="u0", subset="synthetic", language="en", load=lambda: audio)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ResultStore:
    return ResultStore(tmp_path_factory.mktemp("faithfulness-store"))


@pytest.fixture(scope="module")
def result(tiny, explanation, utterances, store) -> Curves:
    (out,) = curves_corpus(
        tiny, [explanation], utterances, store=store, options=OPTIONS, progress=False
    )
    return out


def _direct(tiny, audio, tr: Transcript, occluded_enc: torch.Tensor | None) -> torch.Tensor:
    """Reference-token probabilities from one eager forward, the occlusion built by hand."""
    mel = features(tiny, audio).clone()
    if occluded_enc is not None:
        fill = mel.min()
        for frame in torch.nonzero(occluded_enc).flatten().tolist():
            mel[0, :, 2 * frame : min(2 * frame + 2, n_mel_frames(audio))] = fill
    with torch.no_grad():
        logits = tiny.model(
            input_features=mel, decoder_input_ids=torch.tensor([tr.input_ids]), use_cache=False
        ).logits[0]
    return torch.softmax(logits.float(), -1)[torch.arange(len(tr)), torch.tensor(tr.output_ids)]


def test_time_maps_are_token_by_enc_frame(explanation, gradient):
    grad = gradient
    maps = time_maps(explanation, gradient=grad)
    assert list(maps) == ["CA all heads", "CA alignment heads", "SM_X", "SM_H",
                          "SM_X saliency"]  # fmt: skip
    n_enc = explanation.encoder_saliency.shape[1]
    assert n_enc == 38
    for m in maps.values():
        assert m.shape == (len(explanation.transcript), n_enc) and m.dtype == torch.float32
    assert list(time_maps(grad)) == ["CA all heads", "CA alignment heads", "SM_X saliency",
                                     "SM_H saliency"]  # fmt: skip


def test_curves_shapes_and_labels(result, explanation):
    tr = explanation.transcript
    assert result.maps == ("CA all heads", "CA alignment heads", "SM_X", "SM_H", RANDOM)
    assert result.probabilities.shape == (5, 2, len(tr), 4)
    assert result.fractions == (0.0, 8 / 38, 23 / 38, 1.0)
    assert result.params["forwards"] <= 2 * 2 * (4 * 2 + 1) + 2
    evaluated = [t for t, e in enumerate(result.evaluated) if e]
    assert len(evaluated) == 2 and not any(tr.special[t] for t in evaluated)
    p = result.probabilities
    assert p[:, :, evaluated].isfinite().all() and p[:, :, list(tr.special)].isnan().all()
    assert ((p[:, :, evaluated] >= 0) & (p[:, :, evaluated] <= 1)).all()
    aucs = result.auc_frame()
    assert len(aucs) == 5 * 2 and set(aucs["token_index"]) == set(evaluated)
    assert np.allclose(aucs["gain"], aucs["insertion"] - aucs["deletion"])
    frame = result.to_frame()
    assert len(frame) == 5 * 2 * 2 * 4
    assert sorted(set(frame["target"])) == [0.0, 0.2, 0.6, 1.0]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The random model's probabilities are about 2e-5 and occlusion moves them by about 1e-4
    of themselves; batched sdpa and one eager forward agree to about 1e-7 of themselves."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=2e-6, atol=0)


def _moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.double() - b.double()).abs() / b.double() > 1e-5).all())


def test_endpoints_are_the_original_and_the_silent_input(tiny, audio, result, explanation):
    tr = explanation.transcript
    evaluated = list(result.evaluated)
    p = result.probabilities[:, :, evaluated]
    original = _direct(tiny, audio, tr, None)[evaluated]
    silent = _direct(tiny, audio, tr, torch.ones(38, dtype=torch.bool))[evaluated]
    assert _moved(silent, original)  # occlusion changes the probabilities well beyond noise
    for i in range(len(result.maps)):  # identical across maps
        _close(p[i, 0, :, 0], original)
        _close(p[i, 0, :, -1], silent)
        _close(p[i, 1, :, 0], silent)
        _close(p[i, 1, :, -1], original)


def test_an_interior_point_is_the_forward_with_the_top_frames_occluded(
    tiny, audio, result, explanation
):
    """CA has no ties: its order is plain argsort; occlude its top 8 by hand, run it eagerly."""
    tr = explanation.transcript
    t = result.evaluated.index(True)
    ca = time_maps(explanation)["CA all heads"][t]
    top = torch.argsort(-ca.double(), stable=True)[:8]
    occluded = torch.zeros(38, dtype=torch.bool)
    occluded[top] = True
    deletion = _direct(tiny, audio, tr, occluded)[t]
    insertion = _direct(tiny, audio, tr, ~occluded)[t]
    original = _direct(tiny, audio, tr, None)[t]
    assert _moved(deletion, original) and _moved(insertion, original)
    _close(result.probabilities[0, 0, t, 1], deletion)
    _close(result.probabilities[0, 1, t, 1], insertion)


def test_store_round_trip_and_reuse_without_forwards(
    tiny, explanation, utterances, store, result, monkeypatch
):
    key = store.keys()
    assert len(key) == 1 and "faithfulness" in key[0]
    back = Curves.from_tensors(*store.get(key[0]))
    assert back.transcript == result.transcript and back.maps == result.maps
    assert back.fractions == result.fractions and back.params == result.params
    assert torch.equal(back.probabilities.nan_to_num(), result.probabilities.nan_to_num())
    assert back.auc_frame().equals(result.auc_frame())

    def no_forwards(*args, **kwargs):
        raise AssertionError("curves() ran although the store holds the result")

    monkeypatch.setattr(ff, "curves", no_forwards)
    (again,) = curves_corpus(
        tiny, [explanation], utterances, store=store, options=OPTIONS, progress=False
    )
    assert torch.equal(again.probabilities.nan_to_num(), result.probabilities.nan_to_num())
    other = FaithfulnessOptions(fractions=(0.2, 0.6), n_random=2, max_tokens=2)
    with pytest.raises(AssertionError, match="store holds"):  # other options: another key
        curves_corpus(tiny, [explanation], utterances, store=store, options=other, progress=False)


def test_curves_reject_maps_that_do_not_fit_the_audio(tiny, tone, explanation):
    maps = time_maps(explanation)
    with pytest.raises(FaithfulnessError, match="map 'CA all heads' has shape"):
        curves(tiny, tone[:16000], explanation.transcript, maps, progress=False)
    with pytest.raises(FaithfulnessError, match="no utterance 'u0'"):
        curves_corpus(tiny, [explanation], [], options=OPTIONS, progress=False)


def test_a_gradient_map_joins_the_curves_under_its_own_store_key(
    tiny, explanation, gradient, utterances, store, result
):
    options = FaithfulnessOptions(fractions=(0.5,), n_random=1, max_tokens=1)
    (with_grad,) = curves_corpus(tiny, [explanation], utterances, store=store,
                                 gradients=[gradient], options=options, progress=False)  # fmt: skip
    assert with_grad.maps == (*result.maps[:-1], "SM_X saliency", RANDOM)
    assert with_grad.probabilities.shape[:2] == (6, 2) and len(store.keys()) >= 2
    with pytest.raises(FaithfulnessError, match="gradient explanations for"):
        curves_corpus(tiny, [explanation], utterances, gradients=[], options=options)


def test_plot_faithfulness_curves_draws_one_line_per_method():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    from xattn_utils import charts

    tr = _transcript(len(REGIONS))
    result = _toy_curves(_planted, _region_maps(), tr, FaithfulnessOptions(fractions=(0.1, 0.3)))
    try:
        for curves_ in ([result], ff.curves_table([result])):
            for mode in oc.MODES:
                ax = charts.plot_faithfulness_curves(curves_, mode=mode)
                assert isinstance(ax, Axes) and ax.get_title() == mode
                labels = [t.get_text() for t in ax.get_legend().get_texts()]
                assert labels == ["right", "wrong", RANDOM]
                assert [round(x, 2) for x in ax.lines[0].get_xdata()] == [0, 0.1, 0.3, 1]
        _, ax = plt.subplots()
        assert charts.plot_faithfulness_curves([], ax=ax) is ax  # nothing to draw: a note
    finally:
        plt.close("all")

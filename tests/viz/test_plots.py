"""Every map of one utterance returns Axes (Agg backend) on a tiny Explanation (fixtures in
conftest.py), and the tables the charts draw from (:mod:`xattn_utils.report`) hold what the
notebooks expect."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from xattn_utils import plots, report, views, widgets  # noqa: E402
from xattn_utils.maps.perturbation import PerturbationOptions  # noqa: E402
from xattn_utils.maps.views import View  # noqa: E402


@pytest.fixture(scope="module")
def spectrogram(tiny, tone):
    return report.spectrogram(tiny, tone[:16000])


def test_spectrogram_is_the_speech_part_of_the_input(spectrogram, explanations):
    assert spectrogram.shape == explanations[0].input_saliency.shape[1:]  # (mel_frames, bins)


@pytest.mark.parametrize(
    "overlays",
    [("SM_X", "CA all heads", "SM_H"), ("SM_X",), ("CA L1",), ()],
    ids=lambda o: "+".join(o),
)
def test_plot_spectrogram(explanations, spectrogram, overlays):
    ax = plots.plot_spectrogram(explanations[0], spectrogram, overlays=overlays, token=2)
    assert isinstance(ax, Axes)
    assert ax.get_xlabel() == "time (s)" and ax.get_ylabel() == "mel bin"
    assert ax.get_xlim()[1] == pytest.approx(explanations[0].duration, abs=0.011)


def test_plot_spectrogram_without_spectrogram_draws_on_given_axes(explanations):
    _, ax = plt.subplots()
    assert plots.plot_spectrogram(explanations[0], overlays=("CA L1H0",), ax=ax) is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CA L1H0"]


@pytest.mark.parametrize(
    "map_",
    ["SM_H", "SM_X", "CA all heads", "CA L0", "CA L1H2", "CA alignment heads", View.of_head(0, 1)],
    ids=str,
)
def test_plot_token_map(explanations, map_):
    e = explanations[0]
    ax = plots.plot_token_map(e, map_, highlight=1)
    assert isinstance(ax, Axes)
    assert ax.get_title() == (map_ if isinstance(map_, str) else map_.label).replace(
        "SM_X", "SM_X (max-pooled)"
    )
    n_text = sum(not s for s in e.special)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        t for t, s in zip(e.tokens, e.special, strict=True) if not s
    ]
    assert len(ax.get_yticks()) == n_text
    assert ax.get_xlabel() == "time (s)"


def test_token_map_shapes_and_errors(explanations):
    e = explanations[0]
    n_tok, n_enc = e.encoder_saliency.shape
    for name in plots.MAPS:
        assert plots.token_map(e, name).shape == (n_tok, n_enc)
    with pytest.raises(ValueError, match="out-of-range"):
        plots.token_map(e, "CA L9")
    with pytest.raises(ValueError, match="unknown CA view"):
        plots.token_map(e, "CA everything")
    with pytest.raises(ValueError, match="map must be"):
        plots.token_map(e, "attention")


def test_set_theme_is_idempotent():
    plots.set_theme()
    plots.set_theme(**{"figure.dpi": 80})
    assert matplotlib.rcParams["figure.dpi"] == 80
    plots.set_theme()


def test_explorer_figure_and_widget(explanations, utterances, spectrogram):
    fig = widgets.explorer_figure(explanations[0], spectrogram, token=3, layer=1, head=0)
    assert len(fig.axes) >= 4  # spectrogram, three token maps (+ colorbars)
    assert fig.axes[1].get_title() == "CA L1H0"
    assert widgets.ca_view(1) == View.of_layer(1) and widgets.ca_view() == View.all()
    with pytest.raises(ValueError, match="choose a layer"):
        widgets.explorer_figure(explanations[0], head=1)
    pytest.importorskip("ipywidgets")
    box = widgets.explorer(explanations, utterances)
    assert "explorer" in repr(box)
    controls = box.children[0].children
    controls[0].value = 1  # pick the second utterance: tokens follow
    assert len(controls[1].options) == sum(not s for s in explanations[1].special)


# -- the tables behind the plots ------------------------------------------------------------------


def test_correlation_table(table, explanations):
    n_layers, n_heads = explanations[0].cross_attention.shape[:2]
    n_views = len(views.standard(n_layers, n_heads, alignment_heads=[(1, 0)]))
    per_utt = table.groupby("utterance").size()
    assert (per_utt == 2 * n_views + 1).all()  # CA views x (SM_X, SM_H) + SM_X vs SM_H
    assert set(table["comparison"]) == set(report.COMPARISONS)
    assert set(table["subset"]) == {"synthetic", "real"}
    n_text = sum(not s for s in explanations[0].special)
    u0 = table[table["utterance"] == "u0"]
    assert (u0["n_tokens"] + u0["n_nan"] == n_text).all()  # NaN: a constant row (few masks)


def test_headline_and_gap_tables(table):
    head = report.headline(table)
    assert len(head) == 6  # (best head, best layer, all heads) x (CA vs SM_X, CA vs SM_H)
    assert np.isfinite(head[["mean", "low", "high"]].to_numpy(float)).all()
    assert (head["low"] <= head["mean"]).all() and (head["mean"] <= head["high"]).all()
    gain = report.aggregation_gain(table)
    assert len(gain) == 4 and np.isfinite(gain["mean"]).all()
    gap = report.gap_table(table)
    assert list(gap["subset"].unique()) == ["all", "synthetic", "real"]
    wide = gap[gap["subset"] == "all"].set_index("comparison")["mean"]
    assert wide[report.GAP] == pytest.approx(wide["CA vs SM_H"] - wide["CA vs SM_X"])


def test_reliability_and_attenuation_tables(explanations, utterances, table):
    rel = report.reliability_table(explanations, utterances)
    assert len(rel) == 4 and set(rel["map"]) == {"SM_X", "SM_H"}
    assert rel["half"].dropna().between(-1, 1).all()
    att = report.attenuation_table(table, rel)
    assert len(att) == 4  # (synthetic, real) x (SM_X, SM_H)
    assert set(att.columns) >= {"r", "reliability", "r_corrected"}
    usable = att[att["reliability"] > 0]
    expected = usable["r"] / np.sqrt(usable["reliability"].clip(upper=1))
    assert np.allclose(usable["r_corrected"], expected)
    assert att[~(att["reliability"] > 0)]["r_corrected"].isna().all()
    assert report.attenuation_table(table, rel.iloc[:0])["r_corrected"].isna().all()


def test_select_utterances_is_balanced_and_prefix_stable():
    corpus = [SimpleNamespace(id=f"s{i}", subset="synthetic", language="en") for i in range(4)]
    corpus += [SimpleNamespace(id=f"r{i}", subset="real", language="en") for i in range(2)]
    corpus += [SimpleNamespace(id="it0", subset="synthetic", language="it")]
    four = [u.id for u in report.select_utterances(corpus, 4)]
    assert four == ["s0", "r0", "s1", "r1"]
    assert [u.id for u in report.select_utterances(corpus, 6)][:4] == four
    assert [u.id for u in report.select_utterances(corpus, 9, task="translate")] == ["it0"]


def test_save_metrics(tmp_path, table):
    path = report.save_metrics(report.headline(table), tmp_path / "m", "01_x.random-tiny")
    assert path.name == "01_x.random-tiny_headline.csv" and path.is_file()


def test_headline_carries_reliability_and_corrected_r(explanations, utterances, table):
    rel = report.reliability_table(explanations, utterances)
    head = report.headline(table, rel)
    assert {"reliability", "r_corrected", "r_corrected_low", "r_corrected_high"} <= set(head)
    for row in head.itertuples():
        sm = row.comparison.split()[-1]  # "CA vs SM_X" -> "SM_X"
        expected = rel[rel["map"] == sm]["full"].mean()
        assert row.reliability == pytest.approx(expected, nan_ok=True)
    ok = head["reliability"] > 0
    assert (np.sign(head.loc[ok, "r_corrected"]) == np.sign(head.loc[ok, "mean"])).all()


def test_index_states_the_maps_reliability(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    pd.DataFrame([
        {"model": "tiny.en", "task": "transcribe", "map": "SM_X",
         "design": PerturbationOptions().design, "n_masks": 128, "mean": 0.05,
         "masks_for_0.9": 21000.0, "extrapolated": True},
        {"model": "tiny.en", "task": "transcribe", "map": "SM_X", "design": "no-default",
         "n_masks": 128, "mean": 0.06, "masks_for_0.9": 19000.0, "extrapolated": True},
    ]).to_csv(metrics / "06_convergence.tiny.en_headline.csv", index=False)  # fmt: skip
    page = report.write_index(tmp_path, ["06_convergence.tiny.en"], {}, 60).read_text()
    assert "Reliability of the saliency maps" in page
    assert "reliability 0.05 at 128 masks; 0.9 needs about 21,000 masks (extrapolated)" in page
    assert "19,000" not in page  # only the default design is stated

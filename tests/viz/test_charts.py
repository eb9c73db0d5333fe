"""Every chart of a corpus table returns Axes (Agg backend), drawn from the correlation tables
of a tiny corpus (fixtures in conftest.py)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from xattn_utils import charts, report, stats  # noqa: E402


def test_plot_head_heatmap_marks_alignment_heads(table, explanations):
    heads = explanations[0].alignment_heads
    summary = stats.corpus_table(table[table["kind"] == "head"])
    ax = charts.plot_head_heatmap(summary, against="SM_X", alignment_heads=heads)
    assert isinstance(ax, Axes)
    outlined = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(outlined) == len(heads)
    one_utterance = table[(table["utterance"] == "u0") & (table["against"] == "SM_H")]
    assert isinstance(charts.plot_head_heatmap(one_utterance), Axes)  # column r
    with pytest.raises(ValueError, match="no per-head rows"):
        charts.plot_head_heatmap(table[table["kind"] == "layer"])


def test_plot_correlations(table):
    by_kind = stats.corpus_table(table[table["kind"] != "saliency"], by=["against", "kind"])
    ax = charts.plot_correlations(by_kind)
    assert isinstance(ax, Axes)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["single head", "one layer", "alignment heads", "all heads"]
    layers = stats.corpus_table(table[table["kind"].isin(["layer", "all"])])
    ax = charts.plot_correlations(layers[layers["against"] == "SM_X"], x="map", hue=None)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["CA L0", "CA L1", "CA all heads"]
    with pytest.raises(ValueError, match="several rows"):
        charts.plot_correlations(layers, x="map", hue=None)


def test_plot_cumulative(explanations, utterances):
    cumulative = report.cumulative_table(explanations, utterances)
    assert isinstance(charts.plot_cumulative(cumulative), Axes)  # per utterance: seaborn CIs
    summary = stats.corpus_table(cumulative, by=["against", "kind", "n_layers"])
    ax = charts.plot_cumulative(summary)
    assert isinstance(ax, Axes)
    assert list(ax.get_xticks()) == [1, 2]

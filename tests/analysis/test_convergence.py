"""Convergence of perturbation maps: replayed mask counts, designs, masks needed, store."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import xattn_utils as xu
from xattn_utils.analysis.convergence import (
    checkpoints,
    convergence,
    convergence_corpus,
    corrected_table,
    masks_needed,
    summary_table,
)
from xattn_utils.analysis.stats import reliability, spearman_brown
from xattn_utils.maps.perturbation import DESIGNS, PerturbationError, PerturbationOptions


def test_checkpoints_halve_down_to_eight():
    assert checkpoints(256) == [16, 32, 64, 128, 256]
    assert checkpoints(100) == [8, 24, 48, 96, 100]
    with pytest.raises(PerturbationError, match="at least 8 masks"):
        checkpoints(4)


def test_masks_needed_reads_the_curve_or_extrapolates():
    counts = [16, 32, 64]
    # reached between 32 and 64: interpolated in log count
    n, extrapolated = masks_needed([0.5, 0.8, 0.95], counts, 0.9)
    assert not extrapolated and 32 < n < 64
    # the curve crosses for good only at the end: its last crossing counts
    n, extrapolated = masks_needed([0.92, 0.85, 0.95], counts, 0.9)
    assert not extrapolated and 32 < n < 64
    # above the target everywhere: Spearman-Brown below the first count
    n, extrapolated = masks_needed([0.95, 0.97, 0.99], counts, 0.9)
    assert extrapolated and n < 16 and math.isclose(spearman_brown(0.95, n / 16), 0.9)
    n, extrapolated = masks_needed([0.2, 0.5, 0.7], counts, 0.7)
    assert not extrapolated and math.isclose(n, 64)
    # not reached: Spearman-Brown from the last point, and it inverts spearman_brown
    n, extrapolated = masks_needed([0.2, 0.3, 0.5], counts, 0.9)
    assert extrapolated and math.isclose(spearman_brown(0.5, n / 64), 0.9)
    assert math.isnan(masks_needed([0.1, 0.0, -0.2], counts, 0.9)[0])


@pytest.fixture(scope="module")
def table(tiny, tone):
    return convergence(tiny, tone, n_masks=32, text="hello there world", progress=False,
                       utterance="tone")  # fmt: skip


def test_every_design_map_and_count_has_a_row(table):
    assert set(table["design"]) == set(DESIGNS) and set(table["map"]) == {"SM_X", "SM_H"}
    counts = table.groupby("map")["n_masks"].unique()  # SM_H: 4x the masks, by default
    assert sorted(counts["SM_X"]) == checkpoints(32) and sorted(counts["SM_H"]) == checkpoints(128)
    assert len(table) == len(DESIGNS) * (len(checkpoints(32)) + len(checkpoints(128)))
    assert table["r"].notna().all()
    # a few complementary masks can leave a max-pooled half map constant: r NaN at 8 masks
    top = table["n_masks"] == table.groupby("map")["n_masks"].transform("max")
    assert table.loc[top, "half"].notna().all()
    rel = table["reliability"]  # Spearman-Brown is undefined for half-correlations <= -1/2
    assert (rel.notna() == (table["half"] > -0.5)).all() and (rel.dropna().abs() <= 1).all()


def test_largest_count_replays_explain_exactly(tiny, tone, table):
    """The default design's row at the full count is the reliability of explain()'s own fold
    maps under the mean estimator (same masks, same scores, same control variate)."""
    options = PerturbationOptions(estimator="mean")
    e = xu.explain(tiny, tone, text="hello there world", n_masks=32, options=options,
                   progress=False)  # fmt: skip
    full = table["n_masks"] == table.groupby("map")["n_masks"].transform("max")
    top = table[full & (table["design"] == PerturbationOptions().design)].set_index("map")
    for name, folds in (("SM_X", e.input_saliency_folds), ("SM_H", e.encoder_saliency_folds)):
        expected = reliability(folds, special=e.special).full
        assert math.isclose(top.loc[name, "reliability"], expected, rel_tol=1e-6, abs_tol=1e-9)


def test_control_designs_share_the_plain_designs_forwards(table):
    """Control variates change the estimate, not the masks: at every count the control map
    differs from the plain one (different reliability), yet both exist for the same counts."""
    plain = table[table["design"] == "iid"].set_index(["map", "n_masks"])["reliability"]
    ctrl = table[table["design"] == "control"].set_index(["map", "n_masks"])["reliability"]
    assert plain.index.equals(ctrl.index)
    assert not np.allclose(plain.to_numpy(), ctrl.to_numpy())


def test_summaries(table):
    summary = summary_table(table)
    assert set(summary["design"]) == set(DESIGNS)
    iid = summary[summary["design"] == "iid"]
    assert np.allclose(iid["speedup_vs_iid"].dropna(), 1.0)  # i.i.d. matches itself at its count
    corrected = corrected_table(pd.concat([table, table.assign(utterance="again")]))
    assert (corrected["n"] == 2).all()
    ok = corrected["reliability"] > 0
    expected = corrected.loc[ok, "r"] / np.sqrt(corrected.loc[ok, "reliability"].clip(upper=1))
    assert np.allclose(corrected.loc[ok, "r_corrected"], expected)


def test_bad_designs_are_named(tiny, tone):
    with pytest.raises(PerturbationError, match="sobol"):
        convergence(tiny, tone, n_masks=16, designs=["sobol"], text="hi", progress=False)


def test_corpus_results_come_back_from_the_store(tiny, tmp_path, monkeypatch):
    utts = xu.report.select_utterances(xu.load_corpus("demo"), 1)
    store = xu.ResultStore(tmp_path)
    kw = {"n_masks": 16, "designs": ["iid", "control"], "use_reference_text": True}
    first = convergence_corpus(tiny, utts, store=store, progress=False, **kw)
    monkeypatch.setattr("xattn_utils.analysis.convergence.convergence", _no_forwards)
    again = convergence_corpus(tiny, utts, store=store, progress=False, **kw)
    pd.testing.assert_frame_equal(first, again)
    assert set(again["subset"]) == {utts[0].subset}


def _no_forwards(*args, **kwargs):
    raise AssertionError("recomputed although the store holds the result")


def test_plot_convergence_draws_one_line_per_design(table):
    import matplotlib

    matplotlib.use("Agg")
    from xattn_utils import charts

    ax = charts.plot_convergence(table, map="SM_H", y="reliability", target=0.9)
    assert len(ax.get_lines()) == len(DESIGNS) + 1  # + the target line
    ax = charts.plot_convergence(table, map="SM_X", y="r")
    assert len(ax.get_lines()) == 2 * len(DESIGNS)  # observed and corrected

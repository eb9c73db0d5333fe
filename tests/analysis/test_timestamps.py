"""timestamps: word timings scored against gold boundaries, and notebook 04's corpus tables."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_timing import BOUNDS, TOKENS, diagonal_map  # the planted map of the timing tests

import xattn_utils as xu
from xattn_utils import timestamps as T
from xattn_utils import whisper_ref
from xattn_utils.analysis.timing import WordTiming, word_timings
from xattn_utils.data import Word

# -- scoring -------------------------------------------------------------------------------------

GOLD = [Word("The", 0.0, 0.3), Word("cat", 0.3, 0.7), Word("sat", 0.8, 1.2)]


def wt(word, start, end):
    return WordTiming(word, start, end, (word,), (0,))


def test_score_timings_exact_numbers():
    pred = [wt(" the", 0.04, 0.32), wt(" cat,", 0.32, 0.9), wt(" sat.", 0.9, 1.2)]
    s = T.score_timings(pred, GOLD)
    np.testing.assert_allclose(s.start_errors, [0.04, 0.02, 0.1], atol=1e-12)
    np.testing.assert_allclose(s.end_errors, [0.02, 0.2, 0.0], atol=1e-12)
    assert s.mae_ms() == pytest.approx(380 / 6)
    assert s.mae_ms("start") == pytest.approx(160 / 3)
    assert s.mae_ms("end") == pytest.approx(220 / 3)
    assert s.bias_ms == pytest.approx(380 / 6)
    assert s.rates(50) == pytest.approx((4 / 6, 4 / 6, 4 / 6))
    assert s.rates(100) == pytest.approx((5 / 6, 5 / 6, 5 / 6))  # 100 ms counts (inclusive)
    row = s.to_frame().iloc[0]
    assert row["within_50ms"] == pytest.approx(4 / 6) and row["n_matched_words"] == 3


def test_score_timings_unmatched_words_and_skipped_start():
    pred = [wt(" The", 0.1, 0.3), wt(" big", 0.3, 0.5), wt(" cat", 0.5, 0.7)]
    s = T.score_timings(pred, [dict(word=w.word, start=w.start, end=w.end) for w in GOLD])
    assert (s.n_matched_words, s.n_gold, s.n_predicted) == (2, 6, 6)
    np.testing.assert_allclose(s.start_errors, [0.1, 0.2])
    np.testing.assert_allclose(s.end_errors, [0.0, 0.0])
    precision, recall, f1 = s.rates(50)
    assert (precision, recall, f1) == pytest.approx((2 / 6, 2 / 6, 2 / 6))
    skipped = T.score_timings(pred, GOLD, skip_first_start=True)
    assert (skipped.n_gold, skipped.n_predicted) == (5, 5)
    np.testing.assert_allclose(skipped.start_errors, [0.2])
    assert skipped.rates(50) == pytest.approx((2 / 5, 2 / 5, 2 / 5))
    pooled = T.pool_scores([s, skipped])
    assert pooled.n_gold == 11 and len(pooled.errors) == 7
    empty = T.score_timings([], GOLD)
    assert empty.n_matched_words == 0 and empty.rates(50)[1] == 0 and np.isnan(empty.mae_ms())
    assert T.normalize_word(" Don't,") == "dont"


def test_pooled_rate_ci_resamples_utterances_and_pairs_methods():
    rng = np.random.default_rng(0)
    scores = [
        T.score_timings([wt(w.word, w.start + e, w.end - e) for w in GOLD], GOLD)
        for e in rng.uniform(0, 0.12, size=8)
    ]
    est = T.pooled_rate_ci(scores, 50, n_boot=500)
    assert est.mean == pytest.approx(T.pool_scores(scores).rates(50)[1])
    assert est.low <= est.mean <= est.high and est.low < est.high and est.n == 8
    same = T.pooled_rate_ci(scores, 50, baseline=scores, n_boot=200)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    perfect = [T.score_timings(GOLD, GOLD)] * 8
    diff = T.pooled_rate_ci(perfect, 50, baseline=scores, n_boot=500)
    assert diff.mean == pytest.approx(1 - est.mean) and diff.low > 0
    assert T.pooled_rate_ci(scores, 50, seed=3) == T.pooled_rate_ci(scores, 50, seed=3)


# -- corpus tables ------------------------------------------------------------------------------

GOLD_DIAGONAL = [  # the words of diagonal_map(), at the times its blocks give them
    Word(w, BOUNDS[a] * 0.02, BOUNDS[b] * 0.02)
    for w, a, b in [("The", 0, 1), ("cat", 1, 2), ("sat", 3, 4), ("on", 4, 5), ("the", 5, 6),
                    ("mat", 6, 7)]
]  # fmt: skip


def planted_explanation(uid: str, *, task: str = "transcribe") -> xu.Explanation:
    """Layer 1 (the alignment heads) and both saliency maps hold diagonal_map(); layer 0 noise."""
    m = torch.from_numpy(diagonal_map()).float()
    noise = torch.rand((2, *m.shape), generator=torch.Generator().manual_seed(0))
    ca = torch.stack([noise / noise.sum(-1, keepdim=True), torch.stack([m, m])])
    special = tuple(t.startswith("<|") for t in TOKENS)
    n = len(TOKENS)
    transcript = xu.Transcript(tuple(range(n)), tuple(range(1, n + 1)), tuple(TOKENS), special,
                               "The cat, sat on the mat.", task, "en")  # fmt: skip
    return xu.Explanation(
        transcript=transcript,
        cross_attention=ca,
        input_saliency=m.repeat_interleave(2, 1)[:, :, None].repeat(1, 1, 8),
        encoder_saliency=m,
        model="planted",
        method="spes",
        params={"task": task},
        alignment_heads=((1, 0), (1, 1)),
        duration=2.2,
        utterance=uid,
    )


def gold_utterance(uid, subset, shift=0.0, words=GOLD_DIAGONAL):
    words = tuple(dataclasses.replace(w, start=w.start + shift, end=w.end + shift) for w in words)
    return SimpleNamespace(id=uid, subset=subset, words=words, skip_first_start=False)


@pytest.fixture(scope="module")
def planted_table():
    utts = [gold_utterance("u1", "synthetic"), gold_utterance("u2", "real", shift=0.06)]
    utts.append(gold_utterance("u3", "real", words=()))
    exps = [planted_explanation(u) for u in ("u1", "u2", "u3")]
    exps.append(planted_explanation("u1", task="translate"))
    extra = {"gold": {"u1": GOLD_DIAGONAL}}
    return T.timing_table(exps, utts, extra=extra)


def test_timing_table_recovers_planted_word_times(planted_table):
    t = planted_table.set_index(["utterance", "map"])
    assert set(t.loc["u1"].index) == {
        "CA alignment heads", "CA all heads", "CA best layer", "SM_H", "SM_X", "gold",
    }  # fmt: skip
    assert t.loc[("u1", "CA best layer"), "layer"] == 1  # the planted layer, not the noise
    assert t.loc[("u1", "SM_H"), "layer"] is pd.NA
    for name in ["CA alignment heads", "CA best layer", "SM_H", "SM_X", "gold"]:
        row = t.loc[("u1", name)]
        assert row["mae_ms"] == pytest.approx(0, abs=1e-6), name
        assert row["within_50ms"] == 1 and row["f1_50ms"] == 1 and row["n_matched_words"] == 6
        # gold 60 ms later: every boundary 60 ms early
        row = t.loc[("u2", name)] if name != "gold" else None
        if row is not None:
            assert row["bias_ms"] == pytest.approx(-60) and row["mae_ms"] == pytest.approx(60)
            assert (row["within_50ms"], row["within_100ms"]) == (0, 1)
    assert planted_table.attrs["skipped"] == {
        "planted/transcribe/u3": "no gold word timings",
        "planted/translate/u1": "translation: the gold words are in the source language",
    }
    assert set(planted_table["task"]) == {"transcribe"}
    layers = T.timing_table([planted_explanation("u1")], [gold_utterance("u1", "s")],
                            best_layer_by=None)  # fmt: skip
    assert {"CA L0", "CA L1"} <= set(layers["map"])


def test_timing_summary_pools_utterances(planted_table):
    summary = T.timing_summary(planted_table, seed=0)
    s = summary.set_index(["subset", "map", "metric"])
    assert s.loc[("all", "SM_H", "within_50ms"), "mean"] == pytest.approx(0.5)
    assert s.loc[("all", "SM_H", "within_50ms"), "pooled"] == pytest.approx(0.5)
    assert s.loc[("all", "SM_H", "mae_ms"), "mean"] == pytest.approx(30)
    row = s.loc[("all", "SM_H", "within_100ms")]
    assert (row["mean"], row["low"], row["high"], row["n"], row["n_words"]) == (1, 1, 1, 2, 12)
    assert s.loc[("real", "SM_H", "bias_ms"), "mean"] == pytest.approx(-60)
    assert s.loc[("synthetic", "SM_H", "within_50ms"), "n"] == 1
    assert s.loc[("all", "gold", "within_50ms"), "n"] == 1  # extra maps only where given
    assert set(summary["metric"]) == set(T.METRICS)
    assert T.timing_summary(planted_table.iloc[:0]).empty
    errors = T.boundary_errors(planted_table)
    sm_h = errors[errors["map"] == "SM_H"]
    assert len(sm_h) == 24 and set(sm_h["boundary"]) == {"start", "end"}
    np.testing.assert_allclose(sm_h.groupby("utterance")["error_ms"].mean(), [0, -60], atol=1e-6)


def test_whisper_comparison_and_skips(tiny):
    ours = word_timings(diagonal_map(), TOKENS)
    later = [{"word": w.word, "start": w.start + 0.01, "end": w.end + 0.02} for w in ours]
    table = whisper_ref.whisper_comparison([planted_explanation("u1")], {"u1": later[1:]})
    assert list(table["word"]) == ["cat", "sat", "on", "the", "mat"]
    np.testing.assert_allclose(table["d_start_ms"], -10, atol=1e-6)
    np.testing.assert_allclose(table["d_end_ms"], -20, atol=1e-6)
    assert whisper_ref.whisper_comparison([planted_explanation("u1")], {}).empty
    words, note = whisper_ref.whisper_words(tiny, [], task="translate")
    assert words == {} and "skipped" in note
    words, note = whisper_ref.whisper_words(tiny, [])
    assert words == {} and "random test model" in note


def test_plot_timing_errors_returns_axes(planted_table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xattn_utils import charts

    ax = charts.plot_timing_errors(T.boundary_errors(planted_table))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:4] == ["CA alignment heads", "CA all heads", "CA best layer", "SM_H"]
    summary = T.timing_summary(planted_table)
    ax = charts.plot_timing_errors(summary, metric="within_50ms")
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == [
        "CA alignment heads", "CA all heads", "CA best layer",
    ]  # fmt: skip
    assert len(ax.get_legend().get_texts()) == 3  # all, synthetic, real
    for empty in [T.boundary_errors(T.timing_table([], [])), summary.iloc[:0]]:
        ax = charts.plot_timing_errors(empty, metric=None if "error_ms" in empty else "mae_ms")
        assert "no boundaries" in ax.texts[0].get_text()
    plt.close("all")

"""One vocabulary in every table: ``map``, ``against``, ``attribution``, ``correlation``; never
the ambiguous ``method``, ``which``, ``view`` (or the old ``map_name``). Builds each table the
library makes from a tiny random model and checks its columns and its CA labels."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from xattn_utils import (
    context,
    convergence,
    faithfulness,
    mixing,
    occlusion,
    tables,
    timestamps,
    views,
)
from xattn_utils.maps.perturbation import PerturbationOptions
from xattn_utils.maps.saliency import explain

FORBIDDEN = {"method", "which", "view", "map_name"}
TEXTS = ["the cat sat on the mat", "open the door"]


def _words(text: str, seconds: float) -> tuple[dict, ...]:
    step = seconds / len(text.split())
    return tuple({"word": w, "start": i * step, "end": (i + 1) * step}
                 for i, w in enumerate(text.split()))  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tiny, tone):
    utts, exps = [], []
    for i, text in enumerate(TEXTS):
        audio = tone[: 16000 + 8000 * i]
        utts.append(SimpleNamespace(
            id=f"u{i}", subset=["synthetic", "real"][i], language="en", text=text,
            words=_words(text, len(audio) / 16000), skip_first_start=False,
            load=lambda audio=audio: audio,
        ))  # fmt: skip
        exps.append(explain(tiny, audio, text=text, n_masks=6, progress=False, utterance=f"u{i}",
                            options=PerturbationOptions(design="iid")))  # fmt: skip
    return exps, utts


@pytest.fixture(scope="module")
def produced(tiny, corpus) -> dict[str, pd.DataFrame]:
    exps, utts = corpus
    out = {"correlation": tables.correlation_table(exps, utts)}
    out["cumulative"] = tables.cumulative_table(exps, utts)
    out["reliability"] = rel = tables.reliability_table(exps, utts)
    corr = out["correlation"]
    out["headline"] = tables.headline(corr, rel, aggregates=tables.HEADLINE_AGGREGATES, n_boot=50)
    out["gain"] = tables.aggregation_gain(corr, n_boot=50)
    out["attenuation"] = tables.attenuation_table(corr, rel, n_boot=50)
    out["gap"] = tables.gap_table(corr, n_boot=50)
    timing = timestamps.timing_table(exps, utts, best_layer_by=None)
    out["timing"] = timing.drop(columns="score")
    out["timing_best_layer"] = timestamps.timing_table(exps, utts).drop(columns="score")
    out["timing_summary"] = timestamps.timing_summary(timing, n_boot=50)
    out["boundaries"] = timestamps.boundary_errors(timing)
    options = occlusion.FaithfulnessOptions(fractions=(0.5,), n_random=1, max_tokens=2)
    curves = faithfulness.curves_corpus(tiny, exps, utts, options=options, progress=False)
    out["auc"] = aucs = faithfulness.auc_table(curves, utts)
    out["curves"] = faithfulness.curves_table(curves, utts)
    out["faithfulness"] = faithfulness.faithfulness_table(aucs, n_boot=50)
    mixings = mixing.mixing_corpus(tiny, utts, progress=False)
    out["context"] = ctx = context.context_table(exps, mixings, utts)
    out["gap_closed"] = context.gap_closed_table(ctx, n_boot=50)
    out["convergence"] = convergence.convergence_corpus(
        tiny, utts[:1], n_masks=16, designs=("iid",), progress=False
    )
    out["sm_frame"] = exps[0].to_frame("encoder")
    return out


def test_no_table_has_an_ambiguous_column(produced):
    for name, table in produced.items():
        assert not table.empty, name
        bad = FORBIDDEN & set(table.columns)
        assert not bad, f"{name} has the ambiguous columns {sorted(bad)}: use map / attribution"


def test_map_columns_hold_one_label_per_view(produced, corpus):
    exps, _ = corpus
    n_layers, n_heads = exps[0].cross_attention.shape[:2]
    labels = {v.label for v in views.standard(n_layers, n_heads, alignment_heads=[(1, 0)])}
    corr = produced["correlation"]
    assert set(corr.loc[corr["kind"] != "saliency", "map"]) <= labels
    assert {"CA all heads", "CA L1H0", "CA L0"} <= set(corr["map"])
    assert set(corr["against"]) == {"SM_X", "SM_H"} and set(corr["correlation"]) == {"pearson"}
    assert set(produced["headline"]["map"]) <= labels
    assert set(produced["reliability"]["map"]) == {"SM_X", "SM_H"}
    assert {"CA all heads", "CA alignment heads", "CA L0", "SM_H"} <= set(produced["timing"]["map"])
    best = produced["timing_best_layer"]
    chosen = best.loc[best["map"] == "CA best layer", "layer"]
    assert len(chosen) == 2 and chosen.nunique() == 1 and chosen.iloc[0] in range(n_layers)
    assert best.loc[best["map"] != "CA best layer", "layer"].isna().all()
    assert {"CA all heads", "CA alignment heads", "random"} <= set(produced["auc"]["map"])
    assert produced["context"]["map"].iloc[0] == "CA all heads"
    assert set(produced["convergence"]["map"]) == {"SM_X", "SM_H"}
    assert set(produced["sm_frame"]["attribution"]) == {"spes"}
    for name in ("correlation", "timing", "auc", "context"):  # every CA map parses or is derived
        ca = [m for m in produced[name]["map"].unique() if views.is_ca(m)]
        derived = {"CA x |f(x)|", "CA -> input", "CA -> input (+0.5 I)", "CA best layer"}
        assert all(m in derived or views.parse(m).label == m for m in ca), name

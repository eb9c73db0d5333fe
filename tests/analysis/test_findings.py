"""The report's front page: the study's findings with verdicts that follow from their CIs, the
headline figure, and ``index.html`` rendered from a small store on the random model."""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

import xattn_utils as xu  # noqa: E402
from xattn_utils import charts, findings  # noqa: E402
from xattn_utils.analysis.findings import FAILS, HOLDS, UNMEASURABLE, verdict  # noqa: E402
from xattn_utils.data import Utterance  # noqa: E402
from xattn_utils.maps.perturbation import PerturbationOptions  # noqa: E402
from xattn_utils.report.index import write_index  # noqa: E402
from xattn_utils.report.runner import Steps, render_html  # noqa: E402

TEXTS = ["the cat sat on the mat", "open the door", "a cold wind", "seven green apples"]


@pytest.fixture(scope="module")
def corpus(tone):
    return [
        Utterance(
            f"u{i}",
            None,
            t,
            "en",
            "synthetic" if i % 2 == 0 else "real",
            audio_array=tone[: 16000 + 4000 * i],
        )  # fmt: skip
        for i, t in enumerate(TEXTS)
    ]


@pytest.fixture(scope="module")
def stored(tiny, corpus, tmp_path_factory):
    """Four utterances explained into a store with a few i.i.d. masks, then read back."""
    store = xu.ResultStore(tmp_path_factory.mktemp("store"))
    kw = dict(store=store, use_reference_text=True, n_masks=6, progress=False, seed=0,
              options=PerturbationOptions(design="iid"))  # fmt: skip
    xu.explain_corpus(tiny, corpus, **kw)
    n_entries = len(store.keys())
    explanations = xu.explain_corpus(tiny, corpus, **kw)  # from the store
    assert len(store.keys()) == n_entries == len(corpus)
    return explanations


@pytest.fixture(scope="module")
def page(stored, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    steps = pd.DataFrame([{"step": "explain random-tiny", "kind": "explain", "seconds": 3.0},
                          {"step": "01_head_level", "kind": "notebook", "seconds": 9.0,
                           "html_s": 1.0},
                          {"step": "total (wall)", "kind": "", "seconds": 90.0}])  # fmt: skip
    path = write_index(out, ["01_head_level.random-tiny"], {"data": "demo-like"},
                       steps=steps, explanations=stored, utterances=corpus, n_boot=300)  # fmt: skip
    return out, path.read_text(encoding="utf-8")


# -- the verdict rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "claim", "expected"),
    [
        (0.1, 0.3, {"above": 0.0}, HOLDS),
        (-0.3, -0.1, {"above": 0.0}, FAILS),
        (-0.1, 0.1, {"above": 0.0}, UNMEASURABLE),
        (0.1, 0.3, {"below": 0.4}, HOLDS),
        (0.5, 0.9, {"below": 0.4}, FAILS),
        (0.4, 0.6, {"above": 0.35, "below": 0.65}, HOLDS),
        (0.7, 0.9, {"above": 0.35, "below": 0.65}, FAILS),
        (0.1, 0.2, {"above": 0.35, "below": 0.65}, FAILS),
        (0.5, 0.8, {"above": 0.35, "below": 0.65}, UNMEASURABLE),
        (math.nan, math.nan, {"above": 0.0}, UNMEASURABLE),
    ],
)
def test_verdict_follows_the_ci(low, high, claim, expected):
    assert verdict(low, high, **claim) == expected


def _planted(gain: float, n: int = 6, seed: int = 0) -> findings.Evidence:
    """A correlation table where the all-head mean beats every single head by ``gain``, and
    the later layer beats the earlier by ``gain``, with noise of sd 0.02."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n):
        for comparison, map_name in (("CA vs SM_X", "SM_X"), ("CA vs SM_H", "SM_H")):
            base = {"utterance": f"u{u}", "model": "m", "task": "transcribe",
                    "comparison": comparison, "against": map_name}  # fmt: skip
            for layer in range(2):
                for head in range(2):
                    r = 0.3 + layer * gain + rng.normal(0, 0.02)
                    rows.append(base | {"map": f"CA L{layer}H{head}", "kind": "head", "r": r})
                rows.append(base | {"map": f"CA L{layer}", "kind": "layer",
                                    "r": 0.3 + layer * gain + rng.normal(0, 0.02)})  # fmt: skip
            rows.append(base | {"map": "CA all heads", "kind": "all", "r": 0.3 + 2 * gain})
    return findings.Evidence(pd.DataFrame(rows), pd.DataFrame(), n_boot=500)


@pytest.mark.parametrize(("gain", "expected"), [(0.2, HOLDS), (-0.2, FAILS), (0.0, None)])
def test_findings_measure_what_they_claim(gain, expected):
    table = findings.findings_table(_planted(gain))
    for name in ("aggregation over heads and layers helps", "later layers correlate best"):
        rows = table[table["finding"] == name]
        assert len(rows) == 2  # vs SM_X and vs SM_H
        if expected is None:  # no effect: the CI must not exclude 0 in the wrong direction
            assert (rows["verdict"] != FAILS).all()
        else:
            assert (rows["verdict"] == expected).all(), rows
    # no reliability table: levels cannot be corrected, so they get no verdict
    assert (table[table["finding"] == "CA vs SM_X is moderate to strong"]["verdict"]
            == UNMEASURABLE).all()  # fmt: skip


def test_corrected_gap_undoes_the_attenuation():
    n = 8
    rel_x, rel_h = np.full(n, 0.25), np.full(n, 1.0)
    per = pd.DataFrame({"r_SM_X": 0.5 * np.sqrt(rel_x), "rel_SM_X": rel_x,
                        "r_SM_H": np.full(n, 0.6), "rel_SM_H": rel_h})  # fmt: skip
    est = findings.corrected_gap(per, n_boot=200)
    assert est.mean == pytest.approx(0.1) and est.n == n
    assert math.isnan(findings.corrected_gap(per.assign(rel_SM_X=-0.1)).mean)


def test_plot_headline_returns_axes_with_the_study_labelled(stored, corpus):
    views = findings.headline_views(findings.Evidence.from_explanations(stored, corpus))
    assert set(views["aggregate"]) == {"best head", "best layer", "all heads", "alignment heads"}
    ax = charts.plot_headline(views, findings.study_values())
    assert isinstance(ax, Axes)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sum("the study's" in lab for lab in labels) == len(findings.STUDY_MODELS)
    assert "unitless" in ax.get_xlabel()


# -- the index ----------------------------------------------------------------------------------


def _claim(text: str) -> dict:
    if text.startswith("in ["):
        a, b = (float(v) for v in text[4:-1].split(","))
        return {"above": a, "below": b}
    sign, value = text.split()
    return {"above" if sign == ">" else "below": float(value)}


def test_index_shows_the_figure_and_findings_whose_verdicts_follow_from_their_cis(page, corpus):
    out, text = page
    assert re.search(r"<figure id='headline'><img[^>]+src='data:image/png;base64,", text)
    assert (out / "metrics" / "headline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "the study's published values on its own models and data" in text
    table = pd.read_csv(out / "metrics" / "findings.csv")
    assert set(table["finding"]) == {
        "single heads correlate weakly and noisily", "aggregation over heads and layers helps",
        "later layers correlate best", "CA vs SM_X is moderate to strong",
        "SM_H is closer to CA than SM_X", "CA covers about half of the relevance",
    }  # fmt: skip
    shown = re.findall(r'class="verdict">([^<]+)</td>', text)
    assert shown == list(table["verdict"])
    for row in table.itertuples():
        assert row.n <= len(corpus)  # utterances whose map has no reliability are left out
        expected = UNMEASURABLE  # the rule, written out again
        if np.isfinite(row.estimate) and row.n >= findings.MIN_UTTERANCES:
            c = _claim(row.claim)
            lo, hi = c.get("above", -np.inf), c.get("below", np.inf)
            if row.low > lo and row.high < hi:
                expected = HOLDS
            elif row.high < lo or row.low > hi:
                expected = FAILS
        assert row.verdict == expected, row


def test_index_says_what_produced_it_and_how_long_it_took(page):
    _, text = page
    for needed in ["random-tiny", "data</th><td>demo-like", "SM_X masks per map</th><td>6",
                   "SM_H masks per map</th><td>24", "SM_X estimator</th><td>grid",
                   "mask design</th><td>iid", "Written 20", "2 synthetic", "01_head_level",
                   "of which HTML s", "in 1.5 min"]:  # fmt: skip
        assert needed in text, needed


def test_steps_print_one_line_per_step(capsys):
    steps = Steps(total=2)
    with steps.step("explain", "explain"):
        pass
    with steps.step("01_head_level", "notebook") as row:
        row["html_s"] = 0.5
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/2] explain ..."
    assert re.fullmatch(r"\[2/2\] 01_head_level \.\.\. \d+ s \(html \d+ s\)", lines[-1])
    assert list(steps.table()["step"]) == ["explain", "01_head_level", "total (wall)"]


def test_notebook_pages_link_back_to_the_index(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# hello")])
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, str(path))
    page = render_html(path, tmp_path / "n.html").read_text(encoding="utf-8")
    code = render_html(path, tmp_path / "code" / "n.html", code=True).read_text(encoding="utf-8")
    assert page.count('href="index.html"') == 2 and 'href="../index.html"' in code


@pytest.mark.parametrize(
    ("share", "low", "high", "expected"),
    [(0.8, 0.6, 0.9, HOLDS), (0.0, -0.04, 0.02, FAILS), (0.5, 0.1, 0.9, UNMEASURABLE)],
)
def test_context_mixing_finding_reads_notebook_07s_gap_table(share, low, high, expected):
    gaps = pd.DataFrame([
        {"model": "m", "subset": "all", "map": "CA -> input", "mean": share, "low": low,
         "high": high, "n": 4},
        {"model": "m", "subset": "real", "map": "CA -> input", "mean": 9.0, "low": 9.0,
         "high": 9.0, "n": 2},
    ])  # fmt: skip
    ev = findings.Evidence(pd.DataFrame(), pd.DataFrame(), extras={"context_mixing": gaps})
    rows = findings.mixing_explains_gap(ev)
    assert len(rows) == 1 and rows[0]["estimate"] == share and rows[0]["verdict"] == expected
    assert findings.mixing_explains_gap(findings.Evidence(pd.DataFrame(), pd.DataFrame())) == []

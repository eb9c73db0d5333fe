"""The report's front page, ``index.html``: what produced it, the headline figure, the study's
findings tested on Whisper with verdicts, the maps' reliability, links to every notebook page,
the time each step took, and the notebooks' headline tables.

Everything here is computed from the explanations in the store
(:mod:`xattn_utils.analysis.findings`) or read from the notebooks' CSVs under ``out/metrics``;
nothing is written by hand.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..analysis.findings import (
    FAILS,
    HALF,
    HOLDS,
    MIN_UTTERANCES,
    MODERATE,
    STUDY_BEST_RANGE,
    Evidence,
    findings_table,
    headline_views,
    study_values,
)

_VERDICT_COLORS = {HOLDS: "#d8f0d8", FAILS: "#f6d5d5"}
_CSS = """body{font-family:sans-serif;max-width:72em;margin:2em auto;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:2px 10px;text-align:left;
border-bottom:1px solid #ddd}figcaption{font-size:.9em;color:#444;max-width:60em}
.small{font-size:.9em;color:#444}"""


def provenance(explanations: Sequence, utterances: Sequence = ()) -> dict:
    """Which models, data, utterances, method, mask counts and estimator the explanations come
    from (read from each :class:`~xattn_utils.maps.explanation.Explanation`'s ``params``; the SM_X
    estimator is ``params["estimator"]`` where the run recorded one, else ``"mean"``)."""

    def values(get) -> str:
        found = list(dict.fromkeys(str(get(e)) for e in explanations))
        return ", ".join(found)

    subsets = pd.Series([getattr(u, "subset", "unknown") for u in utterances]).value_counts()
    spes = [e for e in explanations if e.params.get("n_masks") is not None]
    out = {
        "models": values(lambda e: e.model),
        "tasks": values(lambda e: e.params.get("task", "transcribe")),
        "utterances": f"{len(explanations)} explained ("
        + ", ".join(f"{n} {s}" for s, n in subsets.items())
        + ")",
        "attribution": values(lambda e: e.method),
    }
    if spes:
        out |= {
            "SM_X masks per map": ", ".join(dict.fromkeys(str(e.params["n_masks"]) for e in spes)),
            "SM_H masks per map": ", ".join(dict.fromkeys(
                str(e.params["n_masks"] * e.params.get("enc_mask_factor", 1)) for e in spes)),
            "mask design": ", ".join(dict.fromkeys(str(e.params.get("design")) for e in spes)),
            "SM_X estimator": ", ".join(
                dict.fromkeys(str(e.params.get("estimator", "mean")) for e in spes)),
            "scorer": ", ".join(dict.fromkeys(str(e.params.get("scorer")) for e in spes)),
        }  # fmt: skip
    return out


def headline_figure(views: pd.DataFrame, path: Path) -> str:
    """Draw :func:`~xattn_utils.viz.charts.plot_headline` with the study's values, save it as PNG at
    ``path`` and return it base64-encoded for the page."""
    import matplotlib.pyplot as plt

    from ..viz.charts import plot_headline
    from ..viz.plots import set_theme

    set_theme()
    ax = plot_headline(views, study_values())
    fig = ax.figure
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, na_rep="",
                      classes="t")  # fmt: skip


def findings_html(findings: pd.DataFrame) -> str:
    """The findings table with the verdict cells coloured, and the rule that gives them."""
    rows = []
    for r in findings.to_dict("records"):
        ci = f"[{r['low']:.2f}, {r['high']:.2f}]" if pd.notna(r["low"]) else "no CI"
        color = _VERDICT_COLORS.get(r["verdict"], "#eee")
        cells = [r["finding"], f"{r['model']} ({r['task']})", r["measure"],
                 f"{r['estimate']:.2f}", ci, str(r["n"]), r["claim"]]  # fmt: skip
        tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
        rows.append(f'<tr>{tds}<td style="background:{color}" class="verdict">'
                    f"{html.escape(r['verdict'])}</td></tr>")  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in ["finding (the study)", "model (task)", "number here",
                   "estimate", "95% CI", "n utt.", "claim", "verdict"])  # fmt: skip
    rule = (
        "<p class='small'>The verdict is computed from the CI: <b>holds</b> when the whole 95% "
        "CI is on the claimed side of the threshold (inside the band), <b>does not hold</b> when "
        "it is wholly on the other side, <b>not measurable at this budget</b> when it straddles "
        f"a threshold or there is none (fewer than {MIN_UTTERANCES} utterances, or a map too "
        "noisy to correct): more utterances or masks narrow it. Thresholds: 'moderate to "
        f"strong' r &gt; {MODERATE:g}; 'about half' r in [{HALF[0]:g}, {HALF[1]:g}]. Levels "
        "are corrected for the map's reliability (r / &radic;reliability); differences between "
        "CA views against one map are observed (the correction cannot change their sign). "
        '"all heads" is the unselected mean of every head. Rules and thresholds: '
        "<code>xattn_utils/findings.py</code>.</p>"
    )
    return f"<table id='findings'><tr>{head}</tr>{''.join(rows)}</table>{rule}"


def _reliability_note(metrics: Path) -> str:
    """A paragraph on how reliable the report's saliency maps are, from the convergence
    notebook's headline CSVs (empty when it did not run)."""
    from ..maps.perturbation import PerturbationOptions

    design, lines = PerturbationOptions().design, []
    for csv in sorted(metrics.glob("06_convergence*_headline.csv")):
        df = pd.read_csv(csv)
        for row in df[df["design"] == design].to_dict("records"):
            how = "extrapolated" if row["extrapolated"] else "measured"
            label = html.escape(f"{row['model']} {row['task']} {row['map']}")
            lines.append(
                f"<li>{label}: reliability {row['mean']:.2f} at {row['n_masks']} masks; 0.9 "
                f"needs about {row['masks_for_0.9']:,.0f} masks ({how})</li>"
            )
    if not lines:
        return ""
    return (
        "<h2>Reliability of the saliency maps</h2><p>Split-half reliability (Spearman-Brown) of "
        f"each perturbation map with the default mask design ({html.escape(design)}), from "
        "06_convergence. Below 0.9 a map's noise visibly pulls its correlations with CA toward "
        "0: the <code>r_corrected</code> columns undo that. Where 0.9 needs more masks than "
        "this run used, a CPU cannot afford it at the report's scale; read the correlations "
        "as lower bounds.</p><ul>" + "".join(lines) + "</ul>"
    )


def _steps_html(steps: pd.DataFrame) -> str:
    df = steps.copy()
    df["seconds"] = df["seconds"].map("{:.0f}".format)
    if "html_s" in df:
        df["html_s"] = df["html_s"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    df = df.rename(columns={"seconds": "wall s", "html_s": "of which HTML s"})
    return (
        "<h2>Time</h2><p class='small'>Wall time of each step of this run (the index step "
        "is still running while this page is written).</p>" + _table(df)
    )


def write_index(
    out: Path,
    pages: Sequence[str],
    params: dict,
    seconds: float | None = None,
    *,
    steps: pd.DataFrame | None = None,
    explanations: Sequence = (),
    utterances: Sequence = (),
    seed: int = 0,
    n_boot: int = 2000,
) -> Path:
    """``out/index.html``. ``explanations`` (with their ``utterances``) give the provenance, the
    headline figure (``out/metrics/headline.png``) and the findings (``findings.csv``);
    ``steps`` (``step, kind, seconds, html_s``) the time table; ``params`` the settings table;
    the notebooks' ``out/metrics/*_headline.csv`` the tables at the end."""
    esc = html.escape
    out = Path(out)
    metrics = out / "metrics"
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if seconds is None and steps is not None:  # wall time so far: the total row, if any
        total = steps["step"].str.startswith("total")
        seconds = float(
            steps.loc[total, "seconds"].max() if total.any() else steps["seconds"].sum()
        )
    took = "" if seconds is None else f" in {seconds / 60:.1f} min"
    parts = [f"<h1>xattn: how much does cross-attention explain?</h1><p>Written {esc(when)}"
             f"{took}.</p>"]  # fmt: skip
    if explanations:
        prov = {"data": params["data"]} if "data" in params else {}
        prov |= provenance(explanations, utterances)
        parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                                         for k, v in prov.items()) + "</table>")  # fmt: skip
        mixing_csv = metrics / "07_context_mixing_headline.csv"  # notebook 07's gap table
        extras = {"context_mixing": pd.read_csv(mixing_csv)} if mixing_csv.exists() else {}
        evidence = Evidence.from_explanations(
            explanations, utterances, n_boot=n_boot, seed=seed, extras=extras
        )
        views = headline_views(evidence)
        findings = findings_table(evidence)
        metrics.mkdir(parents=True, exist_ok=True)
        views.to_csv(metrics / "headline_figure.csv", index=False)
        findings.to_csv(metrics / "findings.csv", index=False)
        png = headline_figure(views, metrics / "headline.png")
        parts.append(
            "<h2>Headline</h2><figure id='headline'><img alt='headline figure' "
            f"src='data:image/png;base64,{png}' style='max-width:100%'><figcaption>Pearson r "
            "(unitless, per token, averaged per utterance, special tokens excluded) of each CA "
            "view with SM_X and SM_H, observed (filled) and corrected for the map's split-half "
            "reliability (hollow), with 95% bootstrap CIs over utterances, clipped to the axis; "
            "best head and best layer are chosen on the same utterances (optimistic). In grey "
            "below the line: <b>the study's published values on its own models and data</b> "
            "(Conformer models, Europarl-ST; best CA vs SM_X per model, CA vs SM_H higher by "
            f"0.03-0.18; best case across its conditions {STUDY_BEST_RANGE[0]:g}-"
            f"{STUDY_BEST_RANGE[1]:g}), not measured here. Also <a href='metrics/headline.png'>"
            "headline.png</a>, numbers in <a href='metrics/headline_figure.csv'>"
            "headline_figure.csv</a>.</figcaption></figure>"
        )
        parts.append("<h2>The study's findings on Whisper</h2>" + findings_html(findings))
    parts.append(_reliability_note(metrics))
    links = "".join(
        f'<li><a href="{esc(p)}.html">{esc(p)}</a> (<a href="code/{esc(p)}.html">with code</a>)'
        "</li>"
        for p in pages
    )
    parts.append(f"<h2>Notebooks</h2><ul>{links}</ul>")
    if steps is not None:
        parts.append(_steps_html(steps))
    settings = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in params.items()
    )
    parts.append(f"<h2>Settings</h2><table>{settings}</table>")
    tables = ""
    for csv in sorted(metrics.glob("*_headline.csv")):
        title = csv.name.removesuffix("_headline.csv")
        tables += f"<h3>{esc(title)}</h3>" + _table(pd.read_csv(csv))
    if tables:
        parts.append(
            "<h2>Headline tables of the notebooks</h2><p class='small'>Correlations are Pearson "
            "r between CA and saliency per token, averaged per utterance, special tokens "
            'excluded; [low, high] are 95% bootstrap CIs over utterances. "best head" and '
            '"best layer" are chosen on the same utterances (optimistic); "all heads" is '
            f"not selected.</p>{tables}"
        )
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>xattn report</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

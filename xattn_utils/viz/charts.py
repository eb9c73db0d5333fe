"""Charts of the corpus tables: ``plot_*(table, *, ax=None, **style) -> Axes``.

Every function draws on ``ax`` (a new figure when ``None``), returns the Axes and never calls
``plt.show()``. Inputs are tidy DataFrames: correlations per head and view
(:func:`~xattn_utils.analysis.compare.compare_maps`, ``cumulative_layers``;
:func:`~xattn_utils.analysis.stats.corpus_table`),
word-timing errors, convergence rows, faithfulness curves and the report's headline views. Maps
of one utterance (spectrogram, token maps, encoder mixing) are in :mod:`xattn_utils.viz.plots`,
which also holds the theme (:func:`~xattn_utils.viz.plots.set_theme`) and the map colours.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from ..maps.views import ALL
from .plots import _COLORS, _axes

_KIND_ORDER = ("head", "layer", "alignment", "all", "custom", "cumulative")


def plot_head_heatmap(
    table: pd.DataFrame,
    *,
    against: str | None = None,
    alignment_heads: tuple[tuple[int, int], ...] | list = (),
    ax: Axes | None = None,
    cmap: str = "vlag",
) -> Axes:
    """Layer x head heatmap of per-head correlations; alignment heads outlined in black.

    ``table``: rows of ``kind == "head"`` from :func:`~xattn_utils.analysis.compare.compare_maps`
    (column ``r``, averaged over utterances if several) or
    :func:`~xattn_utils.analysis.stats.corpus_table` (column ``mean``). ``against`` picks "SM_X"
    or "SM_H" when the table holds both.
    """
    heads = table[table["kind"] == "head"]
    if against is not None:
        heads = heads[heads["against"] == against]
    if heads.empty:
        raise ValueError("the table has no per-head rows (kind == 'head')")
    value = "mean" if "mean" in heads.columns else "r"
    grid = heads.groupby(["layer", "head"])[value].mean().unstack("head").sort_index()
    ax = _axes(ax, (1.2 + 0.7 * grid.shape[1], 0.9 + 0.55 * grid.shape[0]))
    limit = max(float(np.nanmax(np.abs(grid.to_numpy()))), 1e-6)
    sns.heatmap(
        grid,
        ax=ax,
        cmap=cmap,
        center=0,
        vmin=-limit,
        vmax=limit,
        annot=True,
        fmt=".2f",
        annot_kws={"fontsize": "x-small"},
        cbar_kws={"label": "Pearson r"},
        linewidths=0.5,
    )
    layers, cols = list(grid.index), list(grid.columns)
    for layer, head in alignment_heads:
        if layer in layers and head in cols:
            ax.add_patch(
                Rectangle(
                    (cols.index(head), layers.index(layer)), 1, 1, fill=False, ec="black", lw=2.2
                )
            )
    what = f"CA vs {against}" if against else "CA vs saliency"
    note = "\n(outlined: alignment heads)" if len(alignment_heads) else ""
    ax.set(xlabel="head", ylabel="decoder layer", title=f"{what}, Pearson r per head{note}")
    return ax


def plot_correlations(
    summary: pd.DataFrame,
    *,
    x: str = "kind",
    hue: str | None = "against",
    ax: Axes | None = None,
    order: list | None = None,
    ylabel: str = "Pearson r (mean over utterances)",
) -> Axes:
    """Point plot of mean correlations with their 95% CIs (columns ``mean``, ``low``, ``high``).

    ``summary`` is a :func:`~xattn_utils.analysis.stats.corpus_table` (one row per ``x`` and
    ``hue`` value). Kinds are ordered head, layer, alignment, all; other ``x`` values as they come,
    "CA all heads" last.
    """
    ax = _axes(ax, (7, 3.8))
    data = summary.copy()
    data[x] = data[x].astype(str)
    if order is None:  # kinds in _KIND_ORDER, anything else as it comes with "all" last
        seen = list(dict.fromkeys(data[x]))
        rank = {k: i for i, k in enumerate(_KIND_ORDER)} if x == "kind" else {ALL: 1}
        order = sorted(seen, key=lambda k: rank.get(k, 0 if x != "kind" else 99))
    keys = [x, hue] if hue else [x]
    if data.duplicated(keys).any():
        raise ValueError(f"several rows per {keys}: filter the table or pass another hue")
    groups = list(dict.fromkeys(data[hue])) if hue else [None]
    width = 0.6 / max(len(groups), 1)
    palette = sns.color_palette(n_colors=max(len(groups), 1))
    for g, (group, color) in enumerate(zip(groups, palette, strict=True)):
        sub = data if group is None else data[data[hue] == group]
        sub = sub.set_index(x).reindex(order)
        pos = np.arange(len(order)) + (g - (len(groups) - 1) / 2) * width
        mean, low, high = (sub[c].to_numpy(dtype=float) for c in ("mean", "low", "high"))
        ax.errorbar(
            pos,
            mean,
            yerr=[mean - low, high - mean],
            fmt="o",
            color=color,
            capsize=4,
            label=None if group is None else _pretty(group),
            ms=7,
        )
    ax.axhline(0, color="0.5", lw=0.8)
    labels = [_pretty(o) for o in order]
    widest = max((len(line) for label in labels for line in label.split("\n")), default=0)
    crowded = widest * len(labels) > 70
    ax.set_xticks(range(len(order)), labels, rotation=90 if crowded else 0)
    ax.set(xlabel="", ylabel=ylabel, title="Correlation with saliency (95% bootstrap CI)")
    if hue:
        ax.legend(title=_pretty(hue), fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return ax


def _pretty(name) -> str:
    names = {
        "head": "single head",
        "layer": "one layer",
        "all": "all heads",
        "alignment": "alignment heads",
        "SM_X": "CA vs SM_X",
        "SM_H": "CA vs SM_H",
        "against": "",
        "comparison": "",
    }
    return names.get(str(name), str(name))


def plot_cumulative(table: pd.DataFrame, *, hue: str = "against", ax: Axes | None = None) -> Axes:
    """Correlation of CA averaged over the first k decoder layers, against k.

    ``table``: :func:`~xattn_utils.analysis.compare.cumulative_layers` rows (column ``r``, one per
    utterance: seaborn draws the mean and a 95% bootstrap CI) or their
    :func:`~xattn_utils.analysis.stats.corpus_table` (``mean``, ``low``, ``high``) with
    ``n_layers``.
    """
    ax = _axes(ax, (6, 3.8))
    data = table[table["kind"] == "cumulative"] if "kind" in table.columns else table
    if "mean" in data.columns:
        for (group, sub), color in zip(
            data.groupby(hue, sort=False), sns.color_palette(), strict=False
        ):
            sub = sub.sort_values("n_layers")
            ax.plot(sub["n_layers"], sub["mean"], "o-", color=color, label=_pretty(group))
            ax.fill_between(sub["n_layers"], sub["low"], sub["high"], color=color, alpha=0.2)
    else:
        sns.lineplot(
            data.assign(**{hue: data[hue].map(_pretty)}),
            x="n_layers",
            y="r",
            hue=hue,
            marker="o",
            errorbar=("ci", 95),
            ax=ax,
            seed=0,
        )
    ax.set_xticks(sorted(data["n_layers"].unique()))
    ax.set(
        xlabel="decoder layers averaged (from layer 0)",
        ylabel="Pearson r (mean over utterances)",
        title="Cumulative layer aggregation (95% CI)",
    )
    ax.legend(title="", fontsize="small")
    return ax


def plot_timing_errors(
    table: pd.DataFrame,
    *,
    metric: str | None = None,
    x: str = "map",
    hue: str | None = "subset",
    tolerances_ms: tuple[float, ...] = (50, 100),
    ax: Axes | None = None,
) -> Axes:
    """Word timestamps against gold, per map (``x``) and ``hue``.

    ``metric=None``: ``table`` is :func:`~xattn_utils.analysis.timestamps.boundary_errors` (one row
    per boundary): box plots of the signed errors (predicted minus gold, ms; > 0 late; whiskers 1.5
    IQR, outliers not drawn) over shaded bands of +-``tolerances_ms``. ``metric`` (e.g.
    ``"within_100ms"``, ``"mae_ms"``): ``table`` is a
    :func:`~xattn_utils.analysis.timestamps.timing_summary`; its means with their 95% CIs.
    """
    data = table if metric is None else table[table["metric"] == metric]
    order = list(dict.fromkeys(data[x])) if len(data) else []
    groups = list(dict.fromkeys(data[hue])) if hue and len(data) else [None]
    if metric is not None:
        ax = _axes(ax, (7, 3.8))
        width = 0.6 / len(groups)
        for g, (group, color) in enumerate(zip(groups, sns.color_palette(), strict=False)):
            sub = (data if group is None else data[data[hue] == group]).set_index(x).reindex(order)
            pos = np.arange(len(order)) + (g - (len(groups) - 1) / 2) * width
            mean, low, high = (sub[c].to_numpy(dtype=float) for c in ("mean", "low", "high"))
            ax.errorbar(pos, mean, yerr=[mean - low, high - mean], fmt="o", color=color,
                        capsize=4, ms=7, label=group)  # fmt: skip
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set(xlabel="", ylabel=metric, title=f"{metric} (mean over utterances, 95% CI)")
    else:
        ax = _axes(ax, (8, 1.2 + 0.5 * len(order)))
        for tol, alpha in zip(
            sorted(tolerances_ms, reverse=True), (0.08, 0.16, 0.24), strict=False
        ):
            ax.axvspan(-tol, tol, color="0.4", alpha=alpha, lw=0, label=f"+-{tol:g} ms")
        ax.axvline(0, color="0.3", lw=0.8)
        if order:
            sns.boxplot(data, x="error_ms", y=x, hue=hue, order=order, showfliers=False, ax=ax)
        ax.set(xlabel="boundary error, ms (predicted - gold; > 0 late)", ylabel="")
        ax.set_title("Word-boundary errors against gold (outliers not drawn)")
    if not order:
        ax.text(0.5, 0.5, "no boundaries to score", ha="center", transform=ax.transAxes)
    elif hue:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return ax


def plot_convergence(
    table: pd.DataFrame,
    *,
    map: str = "SM_X",
    y: str = "reliability",
    target: float | None = None,
    ax: Axes | None = None,
) -> Axes:
    """A map's ``y`` (``"reliability"`` or ``"r"``, with ``r_corrected`` dotted) against the
    number of masks, one line per mask design (mean over utterances); ``table`` holds
    :func:`~xattn_utils.analysis.convergence.convergence` rows. ``target`` draws a dashed line."""
    ax = _axes(ax, (6, 3.8))
    data = table[table["map"] == map]
    means = data.groupby(["design", "n_masks"], sort=False)[[y, "r_corrected"]].mean()
    for (design, sub), color in zip(means.groupby(level=0, sort=False), sns.color_palette(),
                                    strict=False):  # fmt: skip
        n = sub.index.get_level_values("n_masks")
        ax.plot(n, sub[y], "o-", color=color, label=design)
        if y == "r":
            ax.plot(n, sub["r_corrected"], ":", color=color)
    if target is not None:
        ax.axhline(target, color="0.4", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    label = {"reliability": "reliability (Spearman-Brown)", "r": "r with CA (dotted: corrected)"}
    ax.set(xlabel="masks", ylabel=label.get(y, y), title=f"{map}: {label.get(y, y)}")
    ax.legend(title="design", fontsize="small")
    return ax


def plot_faithfulness_curves(curves, *, mode: str = "deletion", ax: Axes | None = None) -> Axes:
    """Deletion or insertion curves: the reference token's probability (mean over evaluated
    tokens) against the share of speech frames occluded (deletion) or revealed (insertion),
    most relevant first, one line per explanation; ``"random"`` dashed. ``curves`` is a tidy
    frame (``faithfulness.curves_table``) or a list of ``faithfulness.Curves``; the x axis is
    the requested fraction (``target``), which the used one differs from by under a frame."""
    ax = _axes(ax, (6, 3.8))
    if not isinstance(curves, pd.DataFrame):
        curves = pd.concat([c.to_frame() for c in curves] or [pd.DataFrame(columns=["mode"])])
    data = curves[curves["mode"] == mode]
    if data.empty:
        ax.text(0.5, 0.5, f"no {mode} curves", ha="center", transform=ax.transAxes)
        return ax
    x = "target" if "target" in data else "fraction"
    maps = list(dict.fromkeys(data["map"]))
    dashes = {m: (4, 2) if m == "random" else "" for m in maps}
    sns.lineplot(data, x=x, y="probability", hue="map", hue_order=maps, style="map",
                 dashes=dashes, markers=True, errorbar=None, ax=ax)  # fmt: skip
    verb = "occluded" if mode == "deletion" else "revealed"
    ax.set(xlabel=f"share of speech frames {verb}, most relevant first",
           ylabel="p(reference token), mean", xlim=(0, 1), ylim=(0, None), title=mode)  # fmt: skip
    ax.legend(fontsize="small", title=None)
    return ax


def plot_headline(
    views: pd.DataFrame, study: pd.DataFrame | None = None, *, ax: Axes | None = None
) -> Axes:
    """The report's headline: r of each CA view with SM_X and SM_H, observed (filled) and
    corrected for the map's reliability (hollow), with 95% CIs, one row per model and view.

    ``views`` is a :func:`~xattn_utils.analysis.findings.headline_views` table; ``study`` (a
    :func:`~xattn_utils.analysis.findings.study_values` table) adds the study's published values
    below, in grey: its own models and data, not a measurement here. CIs are clipped to the axis.
    """
    rows = views[["model", "task", "aggregate"]].drop_duplicates()
    labels = [f"{m}{'' if t == 'transcribe' else f' ({t})'}: {a}" for m, t, a in rows.values]
    n_study = 0 if study is None else study["model"].nunique()
    ax = _axes(ax, (11, 0.45 * (len(labels) + n_study) + 1.5))
    xlim = (-0.4, 1.2)
    marks = [("SM_X", "r", -0.24), ("SM_X", "r_corrected", -0.08),
             ("SM_H", "r", 0.08), ("SM_H", "r_corrected", 0.24)]  # fmt: skip
    for y, (model, task, aggregate) in enumerate(rows.values):
        here = views[(views["model"] == model) & (views["task"] == task)]
        here = here[here["aggregate"] == aggregate].set_index("comparison")
        for sm, col, dy in marks:
            if f"CA vs {sm}" not in here.index or col not in ("r", *here.columns):
                continue
            row = here.loc[f"CA vs {sm}"]
            mean = row["mean" if col == "r" else col]
            lo, hi = (row["low"], row["high"]) if col == "r" else (row[f"{col}_low"],
                                                                   row[f"{col}_high"])  # fmt: skip
            if not np.isfinite(mean):  # no correction possible: nothing to draw
                continue
            ax.plot(np.clip([lo, hi], *xlim), [y + dy] * 2, color=_COLORS[sm], lw=1.5)
            face = _COLORS[sm] if col == "r" else "white"
            ax.plot([mean], [y + dy], "o", color=_COLORS[sm], mfc=face, ms=6)
    if study is not None:
        y0 = len(labels)
        ax.axhline(y0 - 0.5, color="0.3", lw=0.8)
        for i, (model, sub) in enumerate(study.groupby("model", sort=False)):
            for _, row in sub.iterrows():
                dy = -0.12 if row["comparison"] == "CA vs SM_X" else 0.12
                ax.plot([row["low"], row["high"]], [y0 + i + dy] * 2, color="0.45", lw=3)
                ax.plot([row["mean"]], [y0 + i + dy], "D" if dy < 0 else "|", color="0.45")
            labels.append(f"the study's {model} (its data)")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(*xlim)
    ax.axvline(0, color="0.5", lw=0.8)
    handles = [plt.Line2D([], [], marker="o", color=_COLORS[m], mfc=f, label=lab)
               for m, f, lab in [("SM_X", _COLORS["SM_X"], "CA vs SM_X, observed"),
                                 ("SM_X", "white", "CA vs SM_X, corrected"),
                                 ("SM_H", _COLORS["SM_H"], "CA vs SM_H, observed"),
                                 ("SM_H", "white", "CA vs SM_H, corrected")]]  # fmt: skip
    if study is not None:
        handles.append(plt.Line2D([], [], color="0.45", lw=3, marker="D",
                                  label="the study (SM_X point, SM_H range)"))  # fmt: skip
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    ax.set(xlabel="Pearson r per token, mean over utterances (unitless), 95% bootstrap CI",
           title="CA vs saliency: each CA view, observed and reliability-corrected")  # fmt: skip
    return ax

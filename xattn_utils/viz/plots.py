"""Maps of one utterance: ``plot_*(result, *, ax=None, **style) -> Axes``.

Every function draws on ``ax`` (a new figure when ``None``), returns the Axes and never calls
``plt.show()``. Inputs are result objects of one utterance: an
:class:`~xattn_utils.maps.explanation.Explanation` (its spectrogram with a token's maps, a
tokens x time map) or an :class:`~xattn_utils.analysis.mixing.EncoderMixing`. Time axes are in
seconds, spectrogram rows in mel bins. Charts of the corpus tables are in
:mod:`xattn_utils.viz.charts`, which draws with this module's theme and colours. Call
:func:`set_theme` once per notebook.

Map names, as in every table's ``map`` column: a CA view label (``"CA all heads"``, ``"CA L3"``,
``"CA L3H2"``, ``"CA alignment heads"``; :mod:`xattn_utils.maps.views`), ``"SM_H"`` (encoder-output
saliency) and ``"SM_X"`` (input saliency, max-pooled onto the encoder grid where a (tokens,
time) map is drawn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from ..analysis.compare import normalize, pool_to_enc
from ..maps.views import ALL, View, is_ca, select

if TYPE_CHECKING:  # no model code at import time
    from ..analysis.mixing import EncoderMixing
    from ..maps.explanation import Explanation

MAPS = (ALL, "SM_H", "SM_X")
_COLORS = {"CA": "#1f77b4", "SM_H": "#2ca02c", "SM_X": "#d62728"}


def set_theme(**rc) -> None:
    """The one seaborn theme of xattn's figures (``rc`` overrides matplotlib settings)."""
    sns.set_theme(
        context="notebook",
        style="whitegrid",
        rc={"figure.figsize": (9, 4), "figure.dpi": 100, "axes.titlesize": "medium", **rc},
    )


def _axes(ax: Axes | None, figsize: tuple[float, float] | None = None) -> Axes:
    if ax is not None:
        return ax
    return plt.subplots(figsize=figsize, layout="constrained")[1]


def token_map(explanation: Explanation, map: str | View = ALL) -> np.ndarray:
    """A (tokens, enc_frames) map of one utterance: ``"SM_H"``, ``"SM_X"`` (max-pooled) or a CA
    view (its label, e.g. ``"CA L3H2"``, or a :class:`~xattn_utils.maps.views.View`)."""
    if map == "SM_H":
        m = explanation.encoder_saliency
    elif map == "SM_X":
        m = pool_to_enc(explanation.input_saliency, factor=explanation.enc_subsampling)
    elif isinstance(map, View) or is_ca(map):
        m = select(explanation.cross_attention, map, alignment_heads=explanation.alignment_heads)
    else:
        raise ValueError(f"map must be 'SM_H', 'SM_X' or a CA view label ('CA ...'), got {map!r}")
    return m.float().cpu().numpy()


def _label(map: str | View) -> str:
    if map == "SM_X":
        return "SM_X (max-pooled)"
    return map if isinstance(map, str) else map.label


def default_token(explanation: Explanation) -> int:
    """The text token in the middle of the utterance (row index), shown when none is picked."""
    text = [i for i, special in enumerate(explanation.special) if not special]
    return text[len(text) // 2] if text else 0


def plot_spectrogram(
    explanation: Explanation,
    spectrogram: np.ndarray | None = None,
    *,
    token: int | None = None,
    overlays: tuple[str | View, ...] = ("SM_X", ALL, "SM_H"),
    ax: Axes | None = None,
    top: float = 0.2,
    cmap: str = "gray_r",
    sm_cmap: str = "autumn",
    alpha: float = 0.55,
) -> Axes:
    """Log-mel spectrogram of one utterance with one token's maps drawn over it.

    ``spectrogram``: shape = (mel_frames, mel_bins) (see :func:`xattn_utils.report.spectrogram`);
    without it SM_X is drawn alone. ``token``: row index (default: :func:`default_token`).
    ``overlays`` are map names (module docstring). ``"SM_X"`` is shown at full resolution: the
    ``top`` share of its cells (per-token min-max) in colour; a CA view and ``"SM_H"`` are
    curves over time, min-max scaled to the height of the plot.
    """
    ax = _axes(ax, (10, 3.5))
    token = default_token(explanation) if token is None else token
    sm_x = explanation.input_saliency[token].float().cpu().numpy()  # (mel_frames, mel_bins)
    n_mel, n_bins = sm_x.shape
    seconds = n_mel * explanation.mel_frame_seconds
    extent = (0.0, seconds, 0, n_bins)
    if spectrogram is not None:
        spec = np.asarray(spectrogram)[:n_mel]
        ax.imshow(spec.T, origin="lower", aspect="auto", extent=extent, cmap=cmap)
    if "SM_X" in overlays:
        m = normalize(sm_x, how="minmax", axis=(0, 1)).numpy()
        cut = np.quantile(m, 1 - top) if spectrogram is not None else -np.inf
        shown = np.ma.masked_less(m, cut)
        ax.imshow(
            shown.T,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap=sm_cmap if spectrogram is not None else "magma",
            alpha=alpha if spectrogram is not None else 1.0,
            interpolation="nearest",
        )
    curves = [m for m in overlays if m != "SM_X"]
    for name in curves:
        curve = normalize(token_map(explanation, name)[token], how="minmax").numpy()
        t = (np.arange(curve.size) + 0.5) * explanation.enc_frame_seconds
        color = _COLORS.get(name, _COLORS["CA"])
        ax.plot(t, curve * (n_bins - 1), color=color, lw=1.6, label=_label(name))
    if curves:
        ax.legend(loc="upper right", fontsize="small", title="curves: min-max to plot height")
    ax.set(xlim=(0, seconds), ylim=(0, n_bins), xlabel="time (s)", ylabel="mel bin")
    ax.grid(False)
    shown_as = " + ".join(map(_label, overlays)) if overlays else "spectrogram"
    ax.set_title(
        f"{explanation.utterance or 'utterance'}: token {token} "
        f"{explanation.tokens[token]!r} ({shown_as})"
    )
    return ax


def plot_token_map(
    explanation: Explanation,
    map: str | View = ALL,
    *,
    include_special: bool = False,
    highlight: int | None = None,
    ax: Axes | None = None,
    cmap: str = "viridis",
) -> Axes:
    """Tokens x time heatmap of a CA view, SM_H or pooled SM_X; each row min-max scaled.

    Rows are output tokens (special tokens left out unless ``include_special``); columns are
    encoder frames, labelled in seconds. ``highlight`` outlines one token row.
    """
    m = normalize(token_map(explanation, map), how="minmax").numpy()
    rows = [i for i, s in enumerate(explanation.special) if include_special or not s]
    n_tok = len(rows)
    ax = _axes(ax, (9, 0.8 + 0.25 * n_tok))
    seconds = m.shape[1] * explanation.enc_frame_seconds
    image = ax.imshow(
        m[rows],
        aspect="auto",
        cmap=cmap,
        extent=(0, seconds, n_tok - 0.5, -0.5),
        interpolation="nearest",
        vmin=0,
        vmax=1,
    )
    ax.set_yticks(range(n_tok), [explanation.tokens[i] for i in rows], fontsize="small")
    if highlight is not None and highlight in rows:
        y = rows.index(highlight)
        ax.add_patch(Rectangle((0, y - 0.5), seconds, 1, fill=False, ec="white", lw=1.5))
    ax.set(xlabel="time (s)", ylabel="output token", title=_label(map))
    ax.grid(False)
    ax.figure.colorbar(image, ax=ax, label="per-token min-max", fraction=0.04, pad=0.01)
    return ax


def plot_mixing(
    mixing: EncoderMixing,
    *,
    layer: int = -1,
    rolled_out: bool = True,
    ax: Axes | None = None,
    cmap: str = "magma",
) -> Axes:
    """Output frame x input frame heatmap of one utterance's encoder mixing over the speech
    (value zeroing, :mod:`xattn_utils.analysis.mixing`), rolled out through ``layer`` or that layer
    alone; axes in seconds, colour on a square-root scale (a frame's share of its own row)."""
    from matplotlib.colors import PowerNorm

    stack = mixing.rollout() if rolled_out else mixing.matrices
    m, number = stack[layer], range(stack.shape[0])[layer]
    s = mixing.n_speech
    seconds = s * mixing.enc_frame_seconds
    ax = _axes(ax, (5, 4.4))
    image = ax.imshow(m[:s, :s].numpy(), cmap=cmap, norm=PowerNorm(0.5), origin="upper",
                      extent=(0, seconds, seconds, 0), interpolation="nearest")  # fmt: skip
    what = f"rollout through layer {number}" if rolled_out else f"layer {number}"
    ax.set(xlabel="input frame time (s)", ylabel="output frame time (s)",
           title=f"{mixing.model} {mixing.utterance}: encoder mixing, {what}")  # fmt: skip
    ax.grid(False)
    ax.figure.colorbar(image, ax=ax, label="share of the output row", fraction=0.04, pad=0.01)
    return ax

"""The interactive explorer: pick an utterance, a token, a layer and a head; see the spectrogram
with CA and saliency overlays, the token maps, and hear the audio.

Built only from :mod:`xattn_utils.viz.plots`; ``ipywidgets`` and ``IPython`` are imported inside
:func:`explorer`, so this module imports without them. :func:`explorer_figure` draws the same
view as a static figure, for headless runs and HTML reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt

from ..maps.views import View
from ..viz import plots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..maps.explanation import Explanation


def ca_view(layer: int | None = None, head: int | None = None) -> View:
    """CA view of a (layer, head) choice: ``None`` means the mean over that axis (a head
    without a layer means nothing: the mean of all heads is used)."""
    if layer is None:
        return View.all()
    return View.of_layer(layer) if head is None else View.of_head(layer, head)


def explorer_figure(
    explanation: Explanation,
    spectrogram=None,
    *,
    token: int | None = None,
    layer: int | None = None,
    head: int | None = None,
) -> Figure:
    """Spectrogram with one token's SM_X, CA and SM_H overlaid, above the three token maps.

    ``layer``/``head`` pick the CA view (``None``: mean over all layers / all heads of the layer;
    a head without a layer is not a view, so ``head`` needs ``layer``).
    """
    if layer is None and head is not None:
        raise ValueError("choose a layer for a single head")
    view = ca_view(layer, head).label
    token = plots.default_token(explanation) if token is None else token
    n_text = sum(not s for s in explanation.special)
    maps_height = 1.0 + 0.22 * max(n_text, 4)  # inches for the token maps
    fig = plt.figure(figsize=(12, 3.6 + maps_height), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[3.6, maps_height])
    plots.plot_spectrogram(explanation, spectrogram, token=token, overlays=("SM_X", view, "SM_H"),
                           ax=fig.add_subplot(grid[0, :]))  # fmt: skip
    for col, name in enumerate((view, "SM_H", "SM_X")):
        ax = fig.add_subplot(grid[1, col])
        plots.plot_token_map(explanation, name, highlight=token, ax=ax)
        if col:
            ax.set(ylabel="", yticklabels=[])
    return fig


def explorer(
    explanations: Sequence[Explanation],
    utterances: Sequence = (),
    *,
    loaded=None,
):
    """An ipywidgets explorer over ``explanations`` (with their ``utterances`` for audio and,
    given the ``loaded`` model, the log-mel spectrogram). Returns the widget to display."""
    import ipywidgets as w
    from IPython.display import Audio, display

    from ..maps.prepare import spectrogram

    by_id = {u.id: u for u in utterances}
    cache: dict[str, object] = {}
    first = explanations[0]
    n_layers, n_heads = first.cross_attention.shape[:2]
    pick_utt = w.Dropdown(
        options=[(e.utterance or f"#{i}", i) for i, e in enumerate(explanations)],
        description="utterance",
    )
    pick_token = w.Dropdown(description="token")
    pick_layer = w.Dropdown(
        options=[("mean of all", None), *[(str(i), i) for i in range(n_layers)]],
        description="layer",
    )
    pick_head = w.Dropdown(
        options=[("mean of layer", None), *[(str(i), i) for i in range(n_heads)]],
        description="head",
    )
    tokens_box, figure_box, audio_box = w.HTML(), w.Output(), w.Output()

    def set_tokens(*_):
        e = explanations[pick_utt.value]
        pick_token.options = [
            (f"{i}: {t!r}", i)
            for i, (t, s) in enumerate(zip(e.tokens, e.special, strict=True))
            if not s
        ]
        pick_token.value = plots.default_token(e)
        utt = by_id.get(e.utterance)
        audio_box.clear_output()
        if utt is not None:
            with audio_box:
                display(Audio(utt.load(), rate=16_000))

    def draw(*_):
        e = explanations[pick_utt.value]
        utt = by_id.get(e.utterance)
        if loaded is not None and utt is not None and e.utterance not in cache:
            cache[e.utterance] = spectrogram(loaded, utt.load())
        layer = pick_layer.value
        head = pick_head.value if layer is not None else None
        tokens_box.value = " ".join(
            f"<b><u>{t}</u></b>" if i == pick_token.value else t for i, t in enumerate(e.tokens)
        )
        figure_box.clear_output(wait=True)
        with figure_box:
            fig = explorer_figure(
                e, cache.get(e.utterance), token=pick_token.value, layer=layer, head=head
            )
            display(fig)
            plt.close(fig)

    pick_utt.observe(set_tokens, names="value")
    for control in (pick_utt, pick_token, pick_layer, pick_head):
        control.observe(draw, names="value")
    set_tokens()
    draw()

    class Explorer(w.VBox):
        def __repr__(self) -> str:  # what static HTML reports show instead of the widget
            return "xattn explorer (interactive: open this notebook in Jupyter to use it)"

    controls = w.HBox([pick_utt, pick_token, pick_layer, pick_head])
    return Explorer([controls, tokens_box, audio_box, figure_box])

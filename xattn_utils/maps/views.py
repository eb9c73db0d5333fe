"""CA views: which (layer, head) pairs of a cross-attention tensor are averaged, and the one
label each view has in every table, plot and timing.

CA shape = (layers, heads, tokens, enc_frames). A :class:`View` is symbolic (a layer, a head,
all heads, the alignment heads, a list of heads); it gets its pairs from the tensor's shape
and, for the alignment heads, from the model. Labels, everywhere:

- mean of all heads: ``"CA all heads"`` (:meth:`View.all`);
- mean of one layer's heads: ``"CA L3"`` (:meth:`View.of_layer`);
- one head: ``"CA L3H2"`` (:meth:`View.of_head`);
- the model's alignment heads: ``"CA alignment heads"`` (:meth:`View.alignment`);
- mean of layers 0..3: ``"CA L0-L3"`` (:meth:`View.of_layers`);
- a named list of heads: its name (:meth:`View.of_heads`).

Tables put the label in their ``map`` column, beside ``"SM_X"`` and ``"SM_H"``. :func:`select`
is the one place that picks heads and averages them; :func:`stack` keeps them apart (word
timings normalise each head alone). No model code here: a CA is a tensor, or any object with
``scores`` and ``alignment_heads`` (a :class:`~xattn_utils.maps.attention.CrossAttention`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Head = tuple[int, int]
Kind = Literal["all", "layer", "head", "alignment", "custom", "layers"]
ALL = "CA all heads"
ALIGNMENT = "CA alignment heads"
_LAYERS = re.compile(r"CA L(\d+)(?:H(\d+)|-L(\d+))?")


@dataclass(frozen=True)
class View:
    """A named set of CA heads whose maps are averaged; build it with the class methods.

    ``heads`` holds the pairs of ``"alignment"`` (empty: the model's, resolved by
    :meth:`pairs`) and ``"custom"`` views; ``layer``/``head`` (and ``last_layer`` for a layer
    range) those of the others.
    """

    kind: Kind
    layer: int | None = None
    head: int | None = None
    heads: tuple[Head, ...] = ()
    name: str | None = None
    last_layer: int | None = None

    @classmethod
    def all(cls) -> View:
        return cls("all")

    @classmethod
    def of_layer(cls, layer: int) -> View:
        return cls("layer", layer=int(layer))

    @classmethod
    def of_head(cls, layer: int, head: int) -> View:
        return cls("head", layer=int(layer), head=int(head))

    @classmethod
    def of_layers(cls, first: int, last: int) -> View:
        """The mean of layers ``first..last`` (inclusive), every head of each."""
        if first > last:
            raise ValueError(f"first layer {first} comes after last layer {last}")
        return cls("layers", layer=int(first), last_layer=int(last))

    @classmethod
    def alignment(cls, heads: Sequence[Head] = ()) -> View:
        """The alignment heads: ``heads``, or (empty) the model's, given to :meth:`pairs`."""
        return cls("alignment", heads=_pairs(heads))

    @classmethod
    def of_heads(cls, heads: Sequence[Head], name: str) -> View:
        """A named list of heads (e.g. calibrated ones); the name must not look built in."""
        if not name or name == ALL or name == ALIGNMENT or _LAYERS.fullmatch(name):
            raise ValueError(f"custom view name {name!r} is empty or clashes with a built-in view")
        if not heads:
            raise ValueError(f"custom view {name!r} has no heads")
        return cls("custom", heads=_pairs(heads), name=name)

    @property
    def label(self) -> str:
        """The view's one name in tables and plots (see the module docstring)."""
        if self.kind == "all":
            return ALL
        if self.kind == "alignment":
            return ALIGNMENT
        if self.kind == "layer":
            return f"CA L{self.layer}"
        if self.kind == "head":
            return f"CA L{self.layer}H{self.head}"
        if self.kind == "layers":
            return f"CA L{self.layer}-L{self.last_layer}"
        return str(self.name)

    def pairs(
        self, n_layers: int, n_heads: int, *, alignment_heads: Sequence[Head] | None = None
    ) -> tuple[Head, ...]:
        """The (layer, head) pairs of this view in a CA with ``n_layers`` x ``n_heads``."""
        if self.kind == "all":
            out = tuple((ly, hd) for ly in range(n_layers) for hd in range(n_heads))
        elif self.kind == "layer":
            out = tuple((self.layer, hd) for hd in range(n_heads))
        elif self.kind == "layers":
            layers = range(self.layer, self.last_layer + 1)
            out = tuple((ly, hd) for ly in layers for hd in range(n_heads))
        elif self.kind == "head":
            out = ((self.layer, self.head),)
        elif self.kind == "alignment":
            out = self.heads or _pairs(alignment_heads or ())
            if not out:
                raise ValueError("the alignment-heads view needs the model's alignment heads")
        else:
            out = self.heads
        bad = [p for p in out if not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads)]
        if bad or not out:
            raise ValueError(
                f"view {self.label!r}: empty or out-of-range (layer, head) pairs {bad} for a CA "
                f"with {n_layers} layers and {n_heads} heads"
            )
        return out


def _pairs(heads: Sequence[Head]) -> tuple[Head, ...]:
    return tuple((int(ly), int(hd)) for ly, hd in heads)


def parse(view: View | str) -> View:
    """A :class:`View` from itself or from its label (``"CA L3H2"``, ``"CA all heads"``...)."""
    if isinstance(view, View):
        return view
    if view == ALL:
        return View.all()
    if view == ALIGNMENT:
        return View.alignment()
    m = _LAYERS.fullmatch(str(view))
    if m is None:
        raise ValueError(
            f"unknown CA view {view!r}: use {ALL!r}, {ALIGNMENT!r}, 'CA L3', 'CA L3H2', "
            "'CA L0-L3' or a View"
        )
    layer, head, last = m.groups()
    if head is not None:
        return View.of_head(int(layer), int(head))
    return View.of_layer(int(layer)) if last is None else View.of_layers(int(layer), int(last))


def standard(
    n_layers: int,
    n_heads: int,
    *,
    alignment_heads: Sequence[Head] | None = None,
    extra: Mapping[str, Sequence[Head]] | None = None,
) -> list[View]:
    """Every view of a CA: all heads, each layer, each head, the alignment heads (when given)
    and the named head lists of ``extra``: L*H + L + 1 (+1) (+ len(extra)) views."""
    out = [View.all(), *(View.of_layer(ly) for ly in range(n_layers))]
    out += [View.of_head(ly, hd) for ly in range(n_layers) for hd in range(n_heads)]
    if alignment_heads:
        out.append(View.alignment(alignment_heads))
    out += [View.of_heads(heads, name) for name, heads in (extra or {}).items()]
    for v in out:
        v.pairs(n_layers, n_heads)
    return out


def _scores(ca) -> tuple[torch.Tensor, Sequence[Head] | None]:
    """(CA tensor, the model's alignment heads or None) of a tensor, array or CrossAttention."""
    heads = getattr(ca, "alignment_heads", None)
    x = torch.as_tensor(getattr(ca, "scores", ca)).detach()
    x = x if x.is_floating_point() else x.float()
    if x.ndim != 4:
        raise ValueError(f"CA must be (layers, heads, tokens, enc_frames), got {tuple(x.shape)}")
    return x, heads


def resolve(
    ca, view: View | str | Sequence[Head], *, alignment_heads: Sequence[Head] | None = None
) -> tuple[torch.Tensor, tuple[Head, ...]]:
    """(CA tensor, the view's pairs). ``view`` is a View, a label or a list of pairs;
    ``alignment_heads`` defaults to those of a CrossAttention."""
    x, own = _scores(ca)
    if not isinstance(view, View | str):
        view = View("custom", heads=_pairs(view), name="heads")
    pairs = parse(view).pairs(*x.shape[:2], alignment_heads=alignment_heads or own)
    return x, pairs


def select(
    ca, view: View | str | Sequence[Head] = ALL, *, alignment_heads: Sequence[Head] | None = None
) -> torch.Tensor:
    """The mean CA of a view, shape = (tokens, enc_frames), same dtype and device as CA.

    ``ca``: a CA tensor or array (layers, heads, tokens, enc_frames), or a CrossAttention;
    ``view``: a :class:`View`, its label (default ``"CA all heads"``) or a list of
    (layer, head) pairs, averaged in the order given.
    """
    x, pairs = resolve(ca, view, alignment_heads=alignment_heads)
    if isinstance(view, View | str) and parse(view).kind == "all":
        return x.mean((0, 1))  # the plain mean (bitwise what the analyses always computed)
    layers, heads = zip(*pairs, strict=True)
    return x[list(layers), list(heads)].mean(0)


def stack(
    ca, view: View | str | Sequence[Head] = ALL, *, alignment_heads: Sequence[Head] | None = None
) -> torch.Tensor:
    """The view's heads apart, shape = (heads, tokens, enc_frames), in (layer, head) order (as
    openai-whisper stacks its alignment heads)."""
    x, pairs = resolve(ca, view, alignment_heads=alignment_heads)
    pairs = sorted(pairs)
    return x[[p[0] for p in pairs], [p[1] for p in pairs]]


def select_all(
    ca, views: Sequence[View | str], *, alignment_heads: Sequence[Head] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`select` of several views, keyed by label, each (tokens, enc_frames)."""
    return {parse(v).label: select(ca, v, alignment_heads=alignment_heads) for v in views}


def is_ca(label: str) -> bool:
    """Whether a ``map`` label names a CA view (rather than SM_X, SM_H or a baseline)."""
    return isinstance(label, str | np.str_) and label.startswith("CA ")

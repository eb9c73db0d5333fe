"""Compare cross-attention (CA) with saliency maps: pooling, correlations, CA views.

Shapes: CA ``(layers, heads, tokens, enc_frames)``, SM_X ``(tokens, mel_frames, mel_bins)``,
SM_H ``(tokens, enc_frames)``. Inputs may be torch tensors or numpy arrays; maps come back as
torch tensors, correlations as numpy arrays.

Metric. The study correlates the flattened (tokens x enc_frames) matrices after mean-variance
normalisation. With per-token z-normalisation that flattened Pearson r equals the mean of the
per-token correlations, so we compute per-token r and average it per utterance (tokens whose r
is NaN, e.g. constant rows, are counted in ``n_nan``, never dropped silently); the percentile
bootstrap CI over utterances is in :mod:`~xattn_utils.analysis.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from xattn_utils.audio import ENC_SUBSAMPLING
from xattn_utils.maps.views import View, parse, select, standard

Array = torch.Tensor | np.ndarray
Head = tuple[int, int]
Correlation = Literal["pearson", "spearman"]
Pooling = Literal["max", "mean", "sum"]
_CHUNK = 64  # views correlated at once in compare_maps


def _tensor(x: Array) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    return t if t.is_floating_point() else t.float()


def _numpy64(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# -- grids and normalisation --------------------------------------------------------------------


def enc_factor(n_mel: int, n_enc: int) -> int:
    """The smallest subsampling (at least Whisper's 2) that fits ``n_mel`` mel frames into
    ``n_enc`` encoder frames: 2 for Whisper (cropped or not), 4 for Speech2Text."""
    factor = ENC_SUBSAMPLING
    while math.ceil(n_mel / factor) > n_enc:
        factor += 1
    return factor


def pool_to_enc(
    sm_x: Array, *, how: Pooling = "max", factor: int = ENC_SUBSAMPLING
) -> torch.Tensor:
    """Pool SM_X onto the encoder grid: all mel bins and ``factor`` mel frames per enc frame.

    shape = (tokens, mel_frames, mel_bins) -> (tokens, ceil(mel_frames / factor)). With an odd
    number of mel frames the last enc frame pools the single leftover frame (``ceil_mode``).
    """
    x = _tensor(sm_x)
    if x.ndim != 3 or x.shape[1] == 0 or factor < 1 or how not in ("max", "mean", "sum"):
        raise ValueError(
            f"need SM_X (tokens, mel_frames > 0, mel_bins), factor >= 1 and how max|mean|sum; "
            f"got {tuple(x.shape)}, {factor}, {how!r}"
        )
    n_tok, n_mel, n_bins = x.shape
    n_enc = math.ceil(n_mel / factor)
    pad = n_enc * factor - n_mel
    x = F.pad(x, (0, 0, 0, pad), value=-math.inf if how == "max" else 0.0)
    blocks = x.reshape(n_tok, n_enc, factor * n_bins)
    if how == "max":
        return blocks.amax(-1)
    total = blocks.sum(-1)
    if how == "sum":
        return total
    count = torch.full((n_enc,), float(factor * n_bins), dtype=x.dtype, device=x.device)
    count[-1] = (factor - pad) * n_bins
    return total / count


def normalize(
    map_: Array,
    *,
    how: Literal["zscore", "minmax", "zscore_minmax"] = "zscore",
    axis: int | tuple[int, ...] = -1,
) -> torch.Tensor:
    """Normalise a map per token over ``axis`` (use ``(-2, -1)`` for a whole SM_X row).

    ``"zscore"``: mean 0, std 1; ``"minmax"``: into [0, 1]; ``"zscore_minmax"``: the study's
    plot normalisation (equal to ``"minmax"``, min-max being affine invariant). Constant slices
    become 0. Pearson r is invariant to all three: this is for plots.
    """
    x = _tensor(map_)
    dims = (axis,) if isinstance(axis, int) else tuple(axis)
    if how in ("zscore", "zscore_minmax"):
        centred = x - x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, correction=0)
        x = torch.where(std > 0, centred / std.clamp_min(1e-30), torch.zeros_like(x))
        if how == "zscore":
            return x
    elif how != "minmax":
        raise ValueError(f"how must be 'zscore', 'minmax' or 'zscore_minmax', got {how!r}")
    low = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-30), torch.zeros_like(x))


# -- correlations -------------------------------------------------------------------------------


def token_correlations(a: Array, b: Array, *, correlation: Correlation = "pearson") -> np.ndarray:
    """Correlation of each row of ``a`` with the row of ``b`` over the last axis (frames).

    shape = (..., tokens, frames) x (tokens, frames) -> (..., tokens) (numpy broadcasting).
    Spearman ranks with average ties. A row where either side is constant (or holds NaN)
    gives NaN, without warnings.
    """
    x, y = _numpy64(a), _numpy64(b)
    if x.shape[-1] < 2 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"need equal frame counts >= 2, got {x.shape} and {y.shape}")
    if correlation == "spearman":
        x, y = rankdata(x, axis=-1), rankdata(y, axis=-1)
    elif correlation != "pearson":
        raise ValueError(f"correlation must be 'pearson' or 'spearman', got {correlation!r}")
    constant = np.logical_or(x.max(-1) == x.min(-1), y.max(-1) == y.min(-1))
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(-1) / np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


@dataclass(frozen=True)
class UtteranceScore:
    """Mean per-token r of one utterance: ``n_tokens`` averaged, ``n_nan`` kept but NaN."""

    mean: float
    n_tokens: int
    n_nan: int
    correlation: str = "pearson"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


def _summarise(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., tokens) -> mean over finite tokens, count of finite, count of NaN."""
    finite = np.isfinite(r)
    n = finite.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, r, 0.0).sum(-1) / n
    return mean, n, (~finite).sum(-1)


def utterance_score(
    a: Array,
    b: Array,
    *,
    correlation: Correlation = "pearson",
    keep: Sequence[bool] | None = None,
) -> UtteranceScore:
    """Mean per-token correlation of two (tokens, enc_frames) maps over the ``keep`` tokens."""
    r = token_correlations(a, b, correlation=correlation)
    if keep is not None:
        mask = np.asarray(keep, dtype=bool)
        if mask.shape != r.shape:
            raise ValueError(f"keep has shape {mask.shape}, expected {r.shape}")
        r = r[mask]
    mean, n, n_nan = _summarise(r)
    return UtteranceScore(float(mean), int(n), int(n_nan), correlation)


# -- one utterance, many views ------------------------------------------------------------------


def _prepare(
    ca: Array, sm: Array, special: Sequence[bool], include_special: bool, pooling: Pooling
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pool SM_X if needed, keep the non-special tokens, crop both to the shorter time axis."""
    x, s = _tensor(ca), _tensor(sm)
    if x.ndim != 4:
        raise ValueError(f"CA must be (layers, heads, tokens, enc_frames), got {tuple(x.shape)}")
    if s.ndim == 3:
        s, name = pool_to_enc(s, how=pooling, factor=enc_factor(s.shape[1], x.shape[-1])), "SM_X"
    elif s.ndim == 2:
        name = "SM_H"
    else:
        raise ValueError(f"sm must be SM_H (2-D) or SM_X (3-D), got {tuple(s.shape)}")
    mask = torch.as_tensor(np.asarray(special, dtype=bool))
    if not (x.shape[2] == s.shape[0] == mask.numel()):
        raise ValueError(
            f"token counts differ: CA {x.shape[2]}, sm {s.shape[0]}, special {len(mask)}"
        )
    if not include_special:
        x, s = x[:, :, ~mask], s[~mask]
    n = min(x.shape[-1], s.shape[-1])
    return x[..., :n], s[:, :n].to(x.device), name


def _frame(
    stacks: list[torch.Tensor], sm: torch.Tensor, correlation: Correlation, labels: dict
) -> pd.DataFrame:
    """Tidy rows: ``labels`` columns, then mean r, n_tokens and n_nan of each stacked view."""
    r = np.concatenate([token_correlations(st, sm, correlation=correlation) for st in stacks])
    mean, n, n_nan = _summarise(r)  # r: (views, tokens)
    row = {"correlation": correlation, "r": mean, "n_tokens": n, "n_nan": n_nan}
    return pd.DataFrame({**labels, **row})


def compare_maps(
    ca: Array,
    sm: Array,
    *,
    special: Sequence[bool],
    alignment_heads: Sequence[Head] | None = None,
    extra: Mapping[str, Sequence[Head]] | None = None,
    views: Sequence[View | str] | None = None,
    correlation: Correlation = "pearson",
    include_special: bool = False,
    pooling: Pooling = "max",
    against: str | None = None,
    utterance: str | None = None,
) -> pd.DataFrame:
    """Correlate every CA view with one saliency map of one utterance.

    ``sm`` is SM_H (tokens, enc_frames) or SM_X (tokens, mel_frames, mel_bins), pooled onto
    the encoder grid with ``pooling``. Token counts must match; both maps are cropped to the
    shorter time axis (CA is often 1500 enc frames, saliency only the audio's). ``special``
    marks prompt tokens, left out unless ``include_special``. ``views`` picks views (labels or
    :class:`~xattn_utils.maps.views.View`; default :func:`~xattn_utils.maps.views.standard`, with
    the named head lists of ``extra``). One tidy row per view: ``utterance, against`` (the saliency
    map, "SM_X" or "SM_H"), ``map`` (the view's label, e.g. "CA L3H2"), ``kind, layer, head,
    correlation, r, n_tokens, n_nan``.
    """
    x, s, default_name = _prepare(ca, sm, special, include_special, pooling)
    if views is None:
        specs = standard(x.shape[0], x.shape[1], alignment_heads=alignment_heads, extra=extra)
    else:
        named = {name: View.of_heads(heads, name) for name, heads in (extra or {}).items()}
        specs = [named[v] if isinstance(v, str) and v in named else parse(v) for v in views]
    if not specs:
        raise ValueError("views is empty")
    chunks = [specs[i : i + _CHUNK] for i in range(0, len(specs), _CHUNK)]
    x = x.contiguous()  # one memory layout for every view: the same sums as a gather of heads
    stacks = [
        torch.stack([select(x, v, alignment_heads=alignment_heads) for v in chunk])
        for chunk in chunks
    ]
    labels = {
        "utterance": utterance,
        "against": against or default_name,
        "map": [v.label for v in specs],
        "kind": [v.kind for v in specs],
        "layer": pd.array([v.layer for v in specs], dtype="Int64"),
        "head": pd.array([v.head for v in specs], dtype="Int64"),
    }
    return _frame(stacks, s, correlation, labels)


def cumulative_layers(
    ca: Array,
    sm: Array,
    *,
    special: Sequence[bool],
    from_top: bool = False,
    correlation: Correlation = "pearson",
    include_special: bool = False,
    pooling: Pooling = "max",
    against: str | None = None,
    utterance: str | None = None,
) -> pd.DataFrame:
    """r of CA averaged over layers 0..k for each k (``from_top``: layers k..L-1), plus all heads.

    Same inputs and cropping as :func:`compare_maps`. Rows: ``map`` ("CA L0-L3", the last
    "CA all heads"), ``kind`` ("cumulative" or "all"), ``first_layer, last_layer, n_layers, r,
    n_tokens, n_nan``. The deepest cumulative row equals "CA all heads" (every layer has the
    same number of heads).
    """
    x, s, default_name = _prepare(ca, sm, special, include_special, pooling)
    n_layers = x.shape[0]
    layer_means = x.mean(1)
    if from_top:
        layer_means = layer_means.flip(0)
    counts = torch.arange(1, n_layers + 1, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    stack = torch.cat([layer_means.cumsum(0) / counts, x.mean((0, 1))[None]])
    spans = [(n_layers - 1 - k, n_layers - 1) if from_top else (0, k) for k in range(n_layers)]
    spans.append((0, n_layers - 1))
    labels = {
        "utterance": utterance,
        "against": against or default_name,
        "map": [View.of_layers(a, b).label for a, b in spans[:-1]] + [View.all().label],
        "kind": ["cumulative"] * n_layers + ["all"],
        "first_layer": [a for a, _ in spans],
        "last_layer": [b for _, b in spans],
        "n_layers": [b - a + 1 for a, b in spans],
    }
    return _frame([stack], s, correlation, labels)


# -- CA views that account for the encoder (value norms, context mixing) -----------------------


def norm_weighted(ca: Array, value_norms: Array) -> torch.Tensor:
    """CA weighted by the norm of the transformed values, ``||alpha_ij f_h(x_j)||`` per head
    (Kobayashi et al., EMNLP 2020): CA (layers, heads, tokens, enc_frames) times ``value_norms``
    (layers, heads, enc_frames), both cropped to the shorter time axis. Same shape as CA."""
    x, v = _tensor(ca), _tensor(value_norms).to(_tensor(ca).device)
    if x.ndim != 4 or v.ndim != 3 or x.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"need CA (layers, heads, tokens, enc_frames) and value norms (layers, heads, "
            f"enc_frames) with the same layers and heads, got {tuple(x.shape)}, {tuple(v.shape)}"
        )
    n = min(x.shape[-1], v.shape[-1])
    return x[..., :n] * v[:, :, None, :n]


def propagate(ca: Array, mixing: Array, *, padding_block: bool = False) -> torch.Tensor:
    """A map on the encoder output carried to the encoder's input side: ``ca @ mixing``.

    ``ca`` shape = (..., tokens, enc_frames) with ``S`` frames; ``mixing`` (rows = output frame,
    columns = input frame) shape = (S, S), or (S + 1, S + 1) with ``padding_block``: then the
    map's mass beyond the speech (``1 - row sum``, CA rows summing to 1 over all 1500 frames)
    enters through the block's row and the block's column is dropped. Returns (..., tokens, S).
    """
    x, m = _tensor(ca), _tensor(mixing).to(_tensor(ca).device, _tensor(ca).dtype)
    s = x.shape[-1]
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != s + int(padding_block):
        raise ValueError(
            f"mixing must be square with {s + int(padding_block)} rows for a map with {s} "
            f"frames (padding_block={padding_block}), got {tuple(m.shape)}"
        )
    if padding_block:
        x = torch.cat([x, (1 - x.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)
    return (x @ m)[..., :s]

"""Context mixing in Whisper's encoder: value zeroing, rollout, and the value norms CA reads.

**Value zeroing** (Mohebbi et al., "Quantifying Context Mixing in Transformers", EACL 2023).
For encoder layer ``l`` with its input fixed, zero the value vectors of input frame ``j`` in the
layer's self-attention (every head), run the rest of the layer (out-projection, residual,
LayerNorm, MLP) and measure how far every frame ``i``'s layer output moves: ``D[i, j] = 1 -
cos(out_i, out_i^{-j})``. Rows are normalised to sum 1: ``C[i, j] = D[i, j] / sum_k D[i, k]``.
The residual path is never zeroed, so ``C[i, i]`` is the share of frame ``i``'s output that is
its own and ``1 - C[i, i]`` the share mixed in from other frames. Zeroing ``v_j`` changes the
attention output of row ``i`` by exactly ``-sum_h alpha_h[i, j] f_h(x_j)`` (``f_h``: value then
out-projection slice of head ``h``), so the batched code never reruns the attention itself;
:func:`layer_distances_looped` is the reference that runs the real module with zeroed values.
The last layer is measured after the encoder's final LayerNorm: that is the H that CA reads.

**Grids and padding.** Mixing shape = (layers, enc_frames, enc_frames): rows = output frame,
columns = input frame, both on the 20 ms enc_frames grid. The encoder's input side is the conv
stem's output, already on that grid (each enc frame sees 7 mel frames, 70 ms): the mixing stops
there, and input-side maps are compared with SM_X max-pooled to 20 ms, as :mod:`compare` does.
Whisper always encodes 30 s and every frame attends over all 1500, padding included. We keep
the speech frames one by one and lump the padding frames into **one block**, the last row and
column (so the shape is ``(layers, S + 1, S + 1)`` for ``S`` speech frames when there is
padding): its column zeroes every padding frame's values at once; its row is the mean distance
over every ``pad_stride``-th padding frame. The rollout treats that block as one node.

**Groups** (for CPU): ``group = g`` zeroes ``g`` consecutive speech frames together and spreads
the group's distance evenly over its frames; ``g = 1`` (default) is the exact per-frame method.

**Rollout** (Abnar & Zuidema, ACL 2020): ``R_0 = C_0``, ``R_l = C_l @ R_{l-1}``. No identity is
added (value zeroing already includes the residual, as in Mohebbi et al.), so each ``C_l`` and
every ``R_l`` is row-stochastic: **rows sum to 1** over the speech frames plus the padding block.

**Value norms** (Kobayashi et al., "Attention is Not Only a Weight", EMNLP 2020): for each
decoder layer and head, ``||f_h(H_j)||`` of the cross-attention's transformed values of encoder
frame ``j``; :func:`xattn_utils.analysis.compare.norm_weighted` turns CA into ``||alpha f(x)||``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..audio import ENC_FRAME_SECONDS, load_audio
from ..model.decode import features
from ..model.loading import LoadedModel
from ..store import ResultStore, cached
from .compare import propagate

METHOD = "value_zeroing"


# -- one layer ----------------------------------------------------------------------------------


def _finish(layer, y: torch.Tensor, final_norm) -> torch.Tensor:
    """The rest of a pre-LN encoder layer after the attention residual, then ``final_norm``."""
    out = y + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(y))))
    return out if final_norm is None else final_norm(out)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine distance ``1 - cos(a, b)`` over the last axis, as ``|a/|a| - b/|b||^2 / 2``: the
    same number, without the cancellation that makes ``1 - cos`` useless below 1e-7 (the
    distance is second order in a small change, and one frame's share of 1500 is small)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    return 0.5 * (a - b).square().sum(-1)


@torch.no_grad()
def layer_distances(
    layer,
    x: torch.Tensor,
    groups: Sequence[torch.Tensor],
    rows: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    final_norm: Callable | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Cosine distance of each of ``rows``' layer output when each group's values are zeroed.

    ``layer``: a transformers ``WhisperEncoderLayer``; ``x``: its input, shape = (enc_frames,
    d_model); ``groups``: index tensors of input frames zeroed together; ``key_mask``: optional
    bool (enc_frames,), False = no query may attend to that frame (for planted tests).
    Returns shape = (len(rows), len(groups)).
    """
    attn = layer.self_attn
    n, d = x.shape
    h, dh = attn.num_heads, attn.head_dim
    a = layer.self_attn_layer_norm(x)
    q = (attn.q_proj(a[rows]) * attn.scaling).view(-1, h, dh).transpose(0, 1)
    k = attn.k_proj(a).view(n, h, dh).transpose(0, 1)
    v = attn.v_proj(a).view(n, h, dh).transpose(0, 1)
    logits = q @ k.transpose(1, 2)  # (heads, rows, enc_frames)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.to(x.device), -torch.inf)
    alpha = logits.softmax(-1)
    fx = torch.einsum("hjc,dhc->hjd", v, attn.out_proj.weight.view(d, h, dh))  # f_h(x_j)
    y = x[rows] + attn.out_proj((alpha @ v).transpose(0, 1).reshape(-1, d))
    out = _finish(layer, y, final_norm)
    columns = []
    for start in range(0, len(groups), batch_size):
        batch = groups[start : start + batch_size]
        delta = torch.stack([torch.einsum("hrj,hjd->rd", alpha[:, :, g], fx[:, g]) for g in batch])
        columns.append(_distance(_finish(layer, y - delta, final_norm), out).T)
    return torch.cat(columns, dim=1)


@contextmanager
def zeroed_values(layer, frames: torch.Tensor) -> Iterator[None]:
    """Zero the self-attention value vectors of ``frames`` in ``layer`` (a forward hook on its
    value projection, always removed)."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., frames, :] = 0
        return output

    handle = layer.self_attn.v_proj.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_distances_looped(
    layer,
    x: torch.Tensor,
    groups: Sequence[torch.Tensor],
    rows: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    final_norm: Callable | None = None,
) -> torch.Tensor:
    """Reference for :func:`layer_distances`: the real layer, run once per group with that
    group's values zeroed. Same arguments and shape."""
    mask = None
    if key_mask is not None:
        mask = torch.zeros(1, 1, len(x), len(x), dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~key_mask.to(x.device), torch.finfo(x.dtype).min)

    def run() -> torch.Tensor:
        out = layer(x[None], mask)
        out = out[0] if isinstance(out, tuple) else out
        return (out if final_norm is None else final_norm(out))[0, rows]

    reference = run()
    columns = []
    for g in groups:
        with zeroed_values(layer, g):
            columns.append(_distance(run(), reference))
    return torch.stack(columns, dim=1)


# -- the encoder --------------------------------------------------------------------------------


@torch.no_grad()
def encoder_states(loaded: LoadedModel, mel: torch.Tensor) -> torch.Tensor:
    """The input of every encoder layer and the last layer's output (before the final
    LayerNorm), shape = (layers + 1, enc_frames, d_model), for one input (1, mel_bins,
    mel_frames): Whisper's 3000, or Speech2Text's utterance."""
    enc = loaded.model.model.encoder
    if loaded.family.fixed_window:  # Whisper: two GELU convolutions, learned positions
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
    else:  # Speech2Text: GLU convolutions, scaled, sinusoidal positions
        x = enc.conv(loaded.family.model_layout(mel)) * enc.embed_scale
        x = x + enc.embed_positions(torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))
    states = [x[0]]
    for layer in enc.layers:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
        states.append(x[0])
    return torch.stack(states)


@torch.no_grad()
def cross_value_norms(loaded: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """``||f_h(H_j)||`` of every decoder layer's cross-attention head: the value projection of
    encoder frame ``j`` followed by head ``h``'s slice of the output projection (the output
    bias excluded, as in Kobayashi et al. 2020). ``hidden``: the encoder output (after the final
    LayerNorm), shape = (enc_frames, d_model) -> (layers, heads, enc_frames)."""
    norms = []
    for layer in loaded.model.model.decoder.layers:
        attn = layer.encoder_attn
        d, h, dh = hidden.shape[-1], attn.num_heads, attn.head_dim
        v = attn.v_proj(hidden).view(-1, h, dh)
        fx = torch.einsum("jhc,dhc->hjd", v, attn.out_proj.weight.view(d, h, dh))
        norms.append(fx.norm(dim=-1))
    return torch.stack(norms).float()


def _groups(n_speech: int, group: int, device) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + group, n_speech), device=device)
            for s in range(0, n_speech, group)]  # fmt: skip


def _expand(dist: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Spread each group column evenly over its frames: (rows, groups) -> (rows, frames)."""
    parts = [dist[:, i : i + 1].expand(-1, m) / m for i, m in enumerate(sizes)]
    return torch.cat(parts, dim=1)


def row_normalise(distances: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1 (all-zero rows stay 0). shape kept."""
    total = distances.sum(-1, keepdim=True)
    return torch.where(total > 0, distances / total.clamp_min(1e-30), torch.zeros_like(distances))


def rollout(matrices: torch.Tensor, *, residual: float = 0.0) -> torch.Tensor:
    """Abnar & Zuidema rollout ``R_l = C_l' @ R_{l-1}``, shape kept (layers, out, in), with
    ``C_l' = (1 - residual) C_l + residual I``. ``residual = 0`` (default, as Mohebbi et al. do
    for value zeroing) adds no identity; Abnar & Zuidema use 0.5 for raw attention. Row-stochastic
    ``C_l`` give row-stochastic ``R_l`` for any ``residual`` in [0, 1]."""
    if not 0 <= residual <= 1:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    out, acc = [], None
    for c in (1 - residual) * matrices + residual * eye:
        acc = c if acc is None else c @ acc
        out.append(acc)
    return torch.stack(out)


@dataclass(frozen=True, eq=False)
class EncoderMixing:
    """Value-zeroing mixing of one utterance, with the cross-attention value norms.

    ``matrices`` (row-normalised) and ``distances`` (raw cosine distances), shape = (layers,
    S + 1, S + 1) with the padding block last (S, S without padding); ``value_norms`` shape =
    (decoder layers, heads, S). ``n_speech`` = S enc_frames of speech.
    """

    matrices: torch.Tensor
    distances: torch.Tensor
    value_norms: torch.Tensor
    n_speech: int
    model: str
    utterance: str = ""
    params: dict = field(default_factory=dict)
    enc_frame_seconds: float = ENC_FRAME_SECONDS

    @property
    def padding(self) -> bool:
        return self.matrices.shape[-1] > self.n_speech

    def rollout(self, *, residual: float = 0.0) -> torch.Tensor:
        """Mixing rolled out through layers 0..l for every l, shape as ``matrices``
        (:func:`rollout`)."""
        return rollout(self.matrices, residual=residual)

    def propagate(self, ca: torch.Tensor, *, residual: float = 0.0) -> torch.Tensor:
        """CA (..., tokens, S) carried to the encoder's input side through the full rollout
        (CA's mass beyond the speech, 1 - row sum, enters through the padding block)."""
        rolled = self.rollout(residual=residual)[-1]
        return propagate(ca, rolled, padding_block=self.padding)

    def shares(self, *, rolled_out: bool = False, near: int = 2) -> pd.DataFrame:
        """Mean over speech output frames of where a frame's output comes from, per layer:
        ``self``, ``near`` (other frames within ``near`` enc_frames), ``far`` (other speech
        frames) and ``padding`` (the block); the four sum to 1. ``1 - self`` is the share mixed
        in from other frames. With ``rolled_out`` the same for the rollout through layer l."""
        m = (self.rollout() if rolled_out else self.matrices)[:, : self.n_speech]
        s = self.n_speech
        idx = torch.arange(s)
        dist = (idx[:, None] - idx[None, :]).abs()
        speech = m[:, :, :s]
        parts = {
            "self": speech.diagonal(dim1=1, dim2=2),
            "near": (speech * ((dist > 0) & (dist <= near))).sum(-1),
            "far": (speech * (dist > near)).sum(-1),
            "padding": m[:, :, s:].sum(-1),
        }
        return pd.DataFrame([
            {"utterance": self.utterance, "model": self.model, "layer": ly, "share": name,
             "value": float(v[ly].mean()), "rolled_out": rolled_out}
            for name, v in parts.items() for ly in range(m.shape[0])
        ])  # fmt: skip

    def to_frame(self, layer: int = -1) -> pd.DataFrame:
        """Tidy frame of one layer's speech block: out_frame, in_frame, times, value."""
        m = self.matrices[layer, : self.n_speech, : self.n_speech].numpy()
        i, j = np.indices(m.shape).reshape(2, -1)
        step = self.enc_frame_seconds
        return pd.DataFrame({"out_frame": i, "in_frame": j, "out_time_s": i * step,
                             "in_time_s": j * step, "value": m.reshape(-1)})  # fmt: skip

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: getattr(self, k) for k in ("matrices", "distances", "value_norms")}
        keys = ("n_speech", "model", "utterance", "params", "enc_frame_seconds")
        return tensors, {k: getattr(self, k) for k in keys}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], record: dict) -> EncoderMixing:
        return cls(**tensors, **record)


@torch.no_grad()
def encoder_mixing(
    loaded: LoadedModel,
    audio: np.ndarray | str,
    *,
    group: int = 1,
    pad_stride: int = 10,
    batch_size: int = 16,
    utterance: str = "",
) -> EncoderMixing:
    """Value-zeroing mixing matrices of every encoder layer for one utterance (module doc).

    Cost per layer: ``ceil(S / group) + 1`` zeroings, each one MLP pass over the ``S`` speech
    rows and ``(1500 - S) / pad_stride`` padding rows.
    """
    if group < 1 or pad_stride < 1:
        raise ValueError(f"group and pad_stride must be >= 1, got {group}, {pad_stride}")
    audio = load_audio(audio)
    mel = features(loaded, audio)
    states = encoder_states(loaded, mel)
    encoder = loaded.model.model.encoder
    total = states.shape[1]  # Whisper's 1500; Speech2Text's speech alone
    s = min(loaded.family.n_enc_frames(audio), total)
    device = states.device
    groups = _groups(s, group, device)
    sizes = [len(g) for g in groups]
    pad_rows = torch.arange(s, total, pad_stride, device=device)
    if len(pad_rows):
        groups.append(torch.arange(s, total, device=device))
    rows = torch.cat([torch.arange(s, device=device), pad_rows])
    raw, layers = [], encoder.layers
    for ly, layer in enumerate(layers):
        norm = encoder.layer_norm if ly == len(layers) - 1 else None
        dist = layer_distances(layer, states[ly], groups, rows, final_norm=norm,
                               batch_size=batch_size)  # fmt: skip
        speech_cols = _expand(dist[:, : len(sizes)], sizes)
        dist = torch.cat([speech_cols, dist[:, len(sizes) :]], dim=1)
        if len(pad_rows):
            dist = torch.cat([dist[:s], dist[s:].mean(0, keepdim=True)])
        raw.append(dist.cpu())
    distances = torch.stack(raw)
    hidden = encoder.layer_norm(states[-1])
    return EncoderMixing(
        matrices=row_normalise(distances),
        distances=distances,
        value_norms=cross_value_norms(loaded, hidden)[..., :s].cpu(),
        n_speech=s,
        model=loaded.name,
        utterance=utterance,
        params={"group": group, "pad_stride": pad_stride},
        enc_frame_seconds=loaded.family.enc_frame_seconds,
    )


def mixing_corpus(
    loaded: LoadedModel,
    utterances: Sequence,
    *,
    store: ResultStore | None = None,
    group: int = 1,
    pad_stride: int = 10,
    batch_size: int = 16,
    progress: bool = True,
) -> list[EncoderMixing]:
    """:func:`encoder_mixing` of every utterance, reusing and filling ``store`` (each result is
    saved as soon as it is done)."""
    from tqdm.auto import tqdm

    out = []
    params = {"group": group, "pad_stride": pad_stride}
    for utt in tqdm(utterances, desc=f"mixing {loaded.name}", disable=not progress):
        key = ResultStore.key(model=loaded.name, utterance=utt.id, method=METHOD, params=params)

        def compute(utt=utt) -> EncoderMixing:
            return encoder_mixing(loaded, utt.load(), group=group, pad_stride=pad_stride,
                                  batch_size=batch_size, utterance=utt.id)  # fmt: skip

        out.append(cached(store, key, compute, EncoderMixing))
    return out

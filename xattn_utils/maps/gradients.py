"""Gradient saliency of every output token: Saliency, InputXGradient, IntegratedGradients.

The target of token ``i`` is the log-probability of its reference token under teacher forcing.
Captum's attribution classes take one target per call, so a Captum user explains ``T`` tokens
with ``T`` forward and backward passes (:func:`captum_maps` does exactly that, as the reference).
:func:`gradient_maps` gets the same numbers from **one forward and one vectorised backward**:
``torch.autograd.grad(..., is_grads_batched=True)`` vmaps the backward over the ``T`` one-hot
output gradients, i.e. it computes all rows of the Jacobian of the ``T`` token log-probs at once.
Integration points and weights of IntegratedGradients come from Captum (Gauss-Legendre).

Maps over the spectrogram (SM_X) are elementwise, as Captum returns them. Maps over the encoder
output (SM_H, Captum's layer variants) are reduced over ``d_model``: the L2 norm of the gradient
for Saliency, the sum of ``activation x gradient`` for InputXGradient and IntegratedGradients (so
IG stays complete). Baselines: the all-silence input (padding value everywhere) for SM_X, and the
encoder output of that silent input for SM_H, the same neutral values perturbation uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.decode import Transcript
from ..model.loading import LoadedModel

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")


@dataclass(frozen=True)
class GradientOptions:
    """Knobs of the gradient maps: ``n_steps``, the integration steps of
    ``integrated_gradients`` (the other methods have none)."""

    n_steps: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {self.n_steps!r}")

    def params(self, method: str) -> dict:
        """The settings ``method`` uses (what its result depends on)."""
        return {"n_steps": self.n_steps} if method == "integrated_gradients" else {}


def _check(method: str) -> None:
    if method not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {method!r}: use one of {GRADIENT_METHODS}")


def token_logprobs(loaded: LoadedModel, tr: Transcript) -> tuple[Callable, Callable]:
    """Two functions giving the reference tokens' log-probs, shape = (batch, tokens): of the
    input features (batch, mels, 3000), and of the encoder output (batch, 1500, d_model)."""
    ids = torch.tensor([tr.input_ids], device=loaded.device)
    ref = torch.tensor(tr.output_ids, device=loaded.device)

    def of_encoder(h: torch.Tensor) -> torch.Tensor:
        ids_b = ids.expand(h.shape[0], -1)
        out = loaded.model.model.decoder(input_ids=ids_b, encoder_hidden_states=h, use_cache=False)
        logits = loaded.model.get_output_embeddings()(out.last_hidden_state)
        lp = torch.log_softmax(logits.float(), dim=-1)
        return lp.gather(-1, ref.expand(lp.shape[0], -1).unsqueeze(-1)).squeeze(-1)

    def of_mel(x: torch.Tensor) -> torch.Tensor:
        return of_encoder(loaded.family.encode(loaded, x))

    return of_mel, of_encoder


def all_token_grads(
    out: torch.Tensor, inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """Gradients of every entry of ``out`` (1, tokens) w.r.t. each of ``inputs`` (1, ...), in
    one vectorised backward. Returns one tensor per input, shape = (tokens, 1, ...)."""
    eye = torch.eye(out.shape[-1], device=out.device, dtype=out.dtype).unsqueeze(1)
    return torch.autograd.grad(out, inputs, grad_outputs=eye, is_grads_batched=True)


def integrated_gradients(
    f: Callable, x: torch.Tensor, baseline: torch.Tensor, *, n_steps: int
) -> torch.Tensor:
    """IntegratedGradients of every output of ``f`` (1, tokens) w.r.t. ``x`` (1, ...), with
    Captum's Gauss-Legendre points. shape = (tokens, 1, ...)."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    total = torch.zeros((0,))
    for w, a in zip(step_sizes(n_steps), alphas(n_steps), strict=True):
        point = (baseline + a * (x - baseline)).detach().requires_grad_(True)
        with torch.enable_grad():
            (grads,) = all_token_grads(f(point), (point,))
        total = w * grads if total.numel() == 0 else total + w * grads
    return (x - baseline) * total


def gradient_maps(
    loaded: LoadedModel,
    mel: torch.Tensor,
    tr: Transcript,
    n_mel: int,
    n_enc: int,
    *,
    method: str,
    n_steps: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SM_X (tokens, mel_frames, mel_bins) and SM_H (tokens, enc_frames) of a gradient method,
    cropped to ``n_mel`` mel frames and ``n_enc`` encoder frames.

    Saliency and InputXGradient take both maps from one forward and one batched backward (the
    encoder output is an intermediate of the same graph)."""
    _check(method)
    of_mel, of_encoder = token_logprobs(loaded, tr)
    encode = loaded.family.encode
    silent = torch.full_like(mel, loaded.family.padding_value(mel))
    if method == "integrated_gradients":
        sm_x = integrated_gradients(of_mel, mel, silent, n_steps=n_steps)
        with torch.no_grad():
            h, h_silent = encode(loaded, mel), encode(loaded, silent)
        sm_h = integrated_gradients(of_encoder, h, h_silent, n_steps=n_steps).sum(-1)
    else:
        x = mel.detach().requires_grad_(True)
        with torch.enable_grad():
            h = encode(loaded, x)
            gx, gh = all_token_grads(of_encoder(h), (x, h))
        if method == "saliency":
            sm_x, sm_h = gx.abs(), gh.norm(dim=-1)
        else:
            sm_x, sm_h = x.detach() * gx, (h.detach() * gh).sum(-1)
    sm_x = sm_x[:, 0, :, :n_mel].transpose(1, 2)
    return sm_x.float().cpu().contiguous(), sm_h[:, 0, :n_enc].float().cpu().contiguous()


def captum_maps(
    loaded: LoadedModel,
    mel: torch.Tensor,
    tr: Transcript,
    *,
    method: str,
    n_steps: int = 32,
    tokens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a Captum user writes today: one ``attribute`` call per output token, over the input
    features and (layer variant) over the encoder output. Uncropped: SM_X (tokens, mels, 3000),
    SM_H (tokens, 1500). The reference for tests and benchmarks."""
    from captum.attr import (
        InputXGradient,
        IntegratedGradients,
        LayerGradientXActivation,
        LayerIntegratedGradients,
        Saliency,
    )

    _check(method)
    of_mel, _ = token_logprobs(loaded, tr)
    silent = torch.full_like(mel, loaded.family.padding_value(mel))
    encoder = loaded.model.model.encoder.layer_norm  # its output is the encoder output H
    tokens = list(range(len(tr))) if tokens is None else tokens
    xs, hs = [], []
    for i in tokens:
        if method == "saliency":
            xs.append(Saliency(of_mel).attribute(mel, target=i, abs=True))
            layer = LayerGradientXActivation(of_mel, encoder, multiply_by_inputs=False)
            hs.append(layer.attribute(mel, target=i).norm(dim=-1))
        elif method == "input_x_gradient":
            xs.append(InputXGradient(of_mel).attribute(mel, target=i))
            hs.append(LayerGradientXActivation(of_mel, encoder).attribute(mel, target=i).sum(-1))
        else:
            ig = IntegratedGradients(of_mel)
            xs.append(ig.attribute(mel, baselines=silent, target=i, n_steps=n_steps))
            lig = LayerIntegratedGradients(of_mel, encoder)
            attr = lig.attribute(
                mel, baselines=silent, target=i, n_steps=n_steps, attribute_to_layer_input=False
            )
            hs.append(attr.sum(-1))
    return torch.cat(xs).detach(), torch.cat(hs).detach()

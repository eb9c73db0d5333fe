"""The masked forwards behind SPES: what an occluded cell holds, what the encoder reads, how a
masked forward is scored.

- SM_X: :func:`mel_score_fn` scores cell masks (batch, mel_frames, mel_bins) over the speech
  region with one teacher-forced forward each (:func:`masked_mel_logits`). Occluded cells take
  :func:`fill_value`; the encoder reads the whole 30 s window, or with ``encoder_window`` only
  the speech region plus a margin (:func:`encode`, :func:`window_frames`).
- SM_H: :func:`encoder_score_fn` scores encoder-frame masks (batch, enc_frames); the encoder
  runs once and only the decoder reruns, on cached cross-attention keys and values.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ..audio import MEL_FRAME_SECONDS, N_MEL_FRAMES
from ..model.decode import Transcript
from ..model.loading import LoadedModel, attention_implementation
from .perturbation import (
    FILLS,
    PerturbationError,
    auto_batch_size,
    kl_scores,
    prob_drop_scores,
)


def _scorer(scorer: str, logits: torch.Tensor, tr: Transcript):
    """Score function of masked logits (batch, tokens, vocab) -> (batch, tokens)."""
    ref = torch.tensor(tr.output_ids, device=logits.device)
    if scorer == "kl":
        log_p0 = torch.log_softmax(logits.float(), dim=-1)
        return lambda masked: kl_scores(log_p0, masked)
    p0_ref = torch.softmax(logits.float(), dim=-1).gather(-1, ref[:, None]).squeeze(-1)
    return lambda masked: prob_drop_scores(p0_ref, masked, ref)


def forward_batch_size(loaded: LoadedModel, n_tokens: int) -> int:
    """Inputs per full teacher-forced forward (:func:`masked_mel_logits`) on this device."""
    cfg = loaded.model.config
    per_input = 4 * (20 * 1500 * cfg.d_model * cfg.encoder_layers + 3 * n_tokens * cfg.vocab_size)
    return auto_batch_size(loaded.device, per_input)


def fill_value(
    mel: torch.Tensor, n_mel: int, fill: str = "padding", *, loaded: LoadedModel | None = None
) -> float:
    """The value occluded spectrogram cells take: ``"padding"`` what digital silence holds in
    the model's input (Whisper's clamp floor; 0 after Speech2Text's CMVN; ``loaded.family``
    decides, Whisper's when ``loaded`` is None), ``"zero"`` 0 in the model's input space
    (the SPES reference code's choice after its per-utterance normalisation), ``"mean"`` the
    mean of the speech region."""
    if fill == "padding":
        return loaded.family.padding_value(mel) if loaded is not None else float(mel.min())
    if fill == "zero":
        return 0.0
    if fill == "mean":
        return float(mel[..., :n_mel].mean())
    raise PerturbationError(f"unknown fill {fill!r}: use one of {FILLS}")


def window_frames(n_mel: int, encoder_window: float | None) -> int:
    """Mel frames the encoder reads: all 3000 (``None``, faithful) or the speech region plus
    ``encoder_window`` seconds, rounded up to an even count."""
    if encoder_window is None:
        return N_MEL_FRAMES
    frames = n_mel + round(encoder_window / MEL_FRAME_SECONDS)
    return min(N_MEL_FRAMES, frames + frames % 2)


def encode(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """The encoder on features ``x`` (batch, mel_bins, mel_frames); Whisper's takes any even
    number of mel_frames up to 3000 (:meth:`~xattn_utils.model.families.WhisperFamily.encode`).
    shape = (batch, enc_frames, d_model)."""
    return loaded.family.encode(loaded, x)


def masked_mel_logits(
    loaded: LoadedModel,
    mel: torch.Tensor,
    tr: Transcript,
    n_mel: int,
    *,
    fill: str = "padding",
    encoder_window: float | None = None,
    precision: str = "fp32",
):
    """Teacher-forced logits (batch, tokens, vocab) of cell masks (batch, mel_frames, mel_bins)
    over the first ``n_mel`` mel frames; occluded cells take :func:`fill_value`. The encoder
    reads :func:`window_frames` frames; ``precision`` ``"bf16"``/``"fp16"`` runs the forwards
    under autocast (meant for CUDA)."""
    value = fill_value(mel, n_mel, fill, loaded=loaded)
    frames = min(window_frames(n_mel, encoder_window), mel.shape[-1])
    ids = torch.tensor([tr.input_ids], device=mel.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def logits_fn(masks: torch.Tensor) -> torch.Tensor:
        b = masks.shape[0]
        x = mel[..., :frames].expand(b, -1, -1).clone()
        occluded = masks.to(mel.device).transpose(1, 2)  # (batch, mel_bins, mel_frames)
        x[:, :, :n_mel] = torch.where(occluded, value, x[:, :, :n_mel])
        with torch.autocast(mel.device.type, dtype=dtype, enabled=dtype is not None):
            if frames == mel.shape[-1]:
                return loaded.family.forward(loaded, x, ids.expand(b, -1)).logits.float()
            return decoder_logits(loaded, encode(loaded, x), ids.expand(b, -1)).float()

    return logits_fn


def mel_score_fn(
    loaded: LoadedModel,
    mel: torch.Tensor,
    tr: Transcript,
    logits: torch.Tensor,
    n_mel: int,
    *,
    scorer: str = "kl",
    fill: str = "padding",
    encoder_window: float | None = None,
    precision: str = "fp32",
):
    """Scores (batch, tokens) of cell masks (batch, mel_frames, mel_bins) over the first
    ``n_mel`` mel frames (:func:`masked_mel_logits`). With a shortened ``encoder_window`` the
    clean reference distribution comes from the same window (so an empty mask scores 0)."""
    masked_logits = masked_mel_logits(
        loaded, mel, tr, n_mel, fill=fill, encoder_window=encoder_window, precision=precision
    )
    if encoder_window is not None:
        frames = min(window_frames(n_mel, encoder_window), mel.shape[-1])
        ids = torch.tensor([tr.input_ids], device=mel.device)
        logits = decoder_logits(loaded, encode(loaded, mel[..., :frames]), ids)[0]
    score = _scorer(scorer, logits, tr)
    return lambda masks: score(masked_logits(masks))


@torch.no_grad()
def encoder_score_fn(
    loaded: LoadedModel,
    mel: torch.Tensor,
    tr: Transcript,
    logits: torch.Tensor,
    n_enc: int,
    *,
    scorer: str = "kl",
):
    """Scores (batch, tokens) of encoder-frame masks (batch, enc_frames); occluded frames take
    the encoder's output for an all-silence input.

    The encoder runs once here. Cross-attention keys and values are linear per frame, so they
    are projected once for the real and the silent encoder output, and each mask only selects
    rows: the decoder reruns without re-projecting 1500 frames per layer (same numbers as
    :func:`decoder_logits` on the masked encoder output, about twice as fast)."""
    silent = torch.full_like(mel, loaded.family.padding_value(mel))
    with attention_implementation(loaded, "sdpa"):
        h, h_silent = encode(loaded, mel), encode(loaded, silent)
    layers = loaded.model.model.decoder.layers
    kv = [(_cross_kv(layer, h), _cross_kv(layer, h_silent)) for layer in layers]
    ids = torch.tensor([tr.input_ids], device=mel.device)
    score = _scorer(scorer, logits, tr)

    def score_fn(masks: torch.Tensor) -> torch.Tensor:
        b = masks.shape[0]
        occluded = torch.zeros(b, 1, h.shape[1], 1, dtype=torch.bool, device=h.device)
        occluded[:, 0, :n_enc, 0] = masks.to(h.device)  # (batch, heads, enc_frames, head_dim)
        cross = DynamicCache()
        for i, ((k, v), (k_silent, v_silent)) in enumerate(kv):
            cross.update(torch.where(occluded, k_silent, k), torch.where(occluded, v_silent, v), i)
        cache = EncoderDecoderCache(DynamicCache(), cross)
        for i in range(len(kv)):
            cache.is_updated[i] = True  # use the cached cross-attention keys and values
        out = loaded.model.model.decoder(
            input_ids=ids.expand(b, -1),
            encoder_hidden_states=h.expand(b, -1, -1),
            cache=cache,
            use_cache=True,
        )
        return score(loaded.model.get_output_embeddings()(out.last_hidden_state))

    return score_fn


def _cross_kv(layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values of one decoder layer, shape = (1, heads, 1500, head_dim)."""
    attn = layer.encoder_attn
    shape = (h.shape[0], h.shape[1], attn.num_heads, attn.head_dim)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    return k, v


def decoder_logits(loaded: LoadedModel, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoder on encoder output ``h`` (batch, enc_frames, d). shape = (batch,
    tokens, vocab)."""
    out = loaded.model.model.decoder(input_ids=ids, encoder_hidden_states=h, use_cache=False)
    return loaded.model.get_output_embeddings()(out.last_hidden_state)

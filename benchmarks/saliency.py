"""Saliency speed on this machine, measured in one run (tiny.en, one demo utterance).

1. SM_X at the default settings vs Captum ``FeatureAblation`` over the same superpixels, called
   once per output token (what a Captum user would do). Captum needs one forward per segment
   per token; its wall time is measured on a sample of those forwards and scaled up to all of
   them (printed as ``*_extrapolated``).
2. Effective FLOP/s of our perturbation loop (FLOPs per forward from
   ``torch.utils.flop_counter``, counted with eager attention: it counts nothing for CPU sdpa)
   vs the measured FLOP/s of a large float32 matmul.
3. SM_H vs SM_X time per utterance at equal mask counts.
4. Gradient saliency of all tokens (one batched backward) vs a per-token Captum loop.

Prints ``name: value`` lines and a final summary line. Usage:
``python benchmarks/saliency.py [--model tiny.en] [--n-masks 200] [--utterance ID]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import xattn_utils as xu
from xattn_utils.data import load_corpus
from xattn_utils.maps.forwards import mel_score_fn
from xattn_utils.maps.gradients import captum_maps, gradient_maps, token_logprobs
from xattn_utils.maps.masks import segment_counts, slic_segments
from xattn_utils.maps.perturbation import PerturbationOptions
from xattn_utils.maps.prepare import prepare
from xattn_utils.maps.spes import encoder_spes_run, input_spes_run
from xattn_utils.model.loading import attention_implementation


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--n-masks", type=int, default=PerturbationOptions().n_masks)
    parser.add_argument("--utterance", default=None, help="demo utterance id (default: first)")
    parser.add_argument("--captum-sample", type=int, default=24, help="Captum forwards timed")
    args = parser.parse_args()

    corpus = load_corpus("demo", subset="synthetic", language="en")
    utt = next((u for u in corpus if u.id == args.utterance), corpus[0])
    loaded = xu.load_model(args.model, "cpu")
    audio = utt.load()
    prepared = prepare(loaded, audio)
    tr, mel, logits = prepared.transcript, prepared.mel, prepared.logits
    n_mel, n_enc, n_tok = prepared.n_mel, prepared.n_enc, len(tr)
    options = PerturbationOptions(n_masks=args.n_masks)
    print(f"utterance: {utt.id} ({audio.size / 16000:.2f} s, {n_tok} tokens)")
    print(f"threads: {torch.get_num_threads()}")

    # 1. ours vs Captum FeatureAblation over the same superpixels
    _, t_smx = timed(input_spes_run, loaded, prepared, options=options, progress=False)
    spec = mel[0, :, :n_mel].T.numpy()
    labels = slic_segments(spec, segment_counts(n_mel, options.granularities)[0])
    n_segments = int(labels.max()) + 1
    t_captum_forward = captum_forward_seconds(loaded, mel, tr, labels, args.captum_sample)
    t_captum = t_captum_forward * n_segments * n_tok
    print(f"sm_x_ours_seconds: {t_smx:.1f}")
    print(f"sm_x_masks: {args.n_masks}")
    print(f"captum_feature_ablation_forwards: {n_segments * n_tok} ({n_segments} x {n_tok})")
    print(f"captum_feature_ablation_seconds_per_forward: {t_captum_forward:.3f}")
    print(f"captum_feature_ablation_seconds_extrapolated: {t_captum:.0f}")
    print(f"speedup_vs_captum_ablation: {t_captum / t_smx:.1f}")

    # 2. effective FLOP/s of the perturbation loop
    score_fn = mel_score_fn(loaded, mel, tr, logits, n_mel)
    # counted under eager attention: the same FLOPs, but torch's FlopCounterMode counts none for
    # the CPU sdpa kernel the loop runs (about a third of a forward's FLOPs on tiny.en)
    with FlopCounterMode(display=False) as counter, attention_implementation(loaded, "eager"):
        with torch.no_grad():
            score_fn(torch.zeros(1, n_mel, spec.shape[1], dtype=torch.bool))
    flops_forward = counter.get_total_flops()
    peak = matmul_flops()
    achieved = flops_forward * args.n_masks / t_smx
    print(f"gflop_per_forward: {flops_forward / 1e9:.1f}")
    print(f"matmul_gflops: {peak / 1e9:.1f}")
    print(f"perturbation_gflops: {achieved / 1e9:.1f}")
    print(f"flops_efficiency: {achieved / peak:.2f}")

    # 3. SM_H vs SM_X at equal mask counts
    _, t_smh = timed(encoder_spes_run, loaded, prepared, options=options, progress=False)
    print(f"sm_h_seconds: {t_smh:.1f}")
    print(f"sm_h_vs_sm_x_speedup: {t_smx / t_smh:.1f}")

    # 4. gradients: all tokens at once vs one Captum call per token
    _, t_grad = timed(gradient_maps, loaded, mel, tr, n_mel, n_enc, method="saliency")
    _, t_grad_captum = timed(captum_maps, loaded, mel, tr, method="saliency")
    print(f"gradient_batched_seconds: {t_grad:.1f}")
    print(f"gradient_captum_per_token_seconds: {t_grad_captum:.1f}")
    print(f"gradient_speedup: {t_grad_captum / t_grad:.1f}")

    print(
        f"summary: sm_x {t_captum / t_smx:.1f}x faster than Captum ablation (target 5x), "
        f"{achieved / peak:.0%} of matmul FLOP/s (target 50%), SM_H {t_smx / t_smh:.1f}x "
        f"cheaper than SM_X (target 10x), gradients {t_grad_captum / t_grad:.1f}x (target 3x)"
    )


def captum_forward_seconds(loaded, mel, tr, labels: np.ndarray, sample: int) -> float:
    """Seconds per forward of Captum's FeatureAblation on token 1, timed over ``sample``
    segments (the other cells are grouped in one extra feature, ablated once more)."""
    from captum.attr import FeatureAblation

    of_mel = token_logprobs(loaded, tr)[0]
    n_mel = labels.shape[0]
    mask = np.full(mel.shape[1:], sample, dtype=np.int64)  # (mels, 3000): rest = one feature
    sub = labels.T.copy()
    sub[sub >= sample] = sample
    mask[:, :n_mel] = sub
    ablation = FeatureAblation(of_mel)
    with attention_implementation(loaded, "sdpa"), torch.no_grad():
        start = time.perf_counter()
        ablation.attribute(
            mel,
            target=1,
            baselines=float(mel.min()),
            feature_mask=torch.as_tensor(mask)[None],
            perturbations_per_eval=4,
        )
        elapsed = time.perf_counter() - start
    return elapsed / (sample + 2)  # sample segments + the rest + the clean forward


if __name__ == "__main__":
    main()

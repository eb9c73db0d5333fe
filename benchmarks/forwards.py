"""Cheaper or different SM_X forwards against the faithful ones, on the same masks (issue 12).

For each stored reference pool (``benchmarks/reference_maps.py``: full 30 s encoder, padding
fill) the first ``--masks`` masks are run again with

- a shortened encoder window (the speech region plus ``--windows`` seconds), and
- the reference code's fill (0 in the model's input space) with the full encoder,

and compared with the stored faithful scores of the same masks: per-mask score correlation
(per token, centred, then averaged over text tokens) and the agreement of the maps those masks
give (mean per-token Pearson r at the 20 ms pooled resolution), by the ``mean`` estimator and
the default one. Same masks on both sides, so the Monte Carlo noise of the masks is shared
and the agreement measures the change of the forward, not sampling error. Also: seconds per
mask of each forward and where a faithful forward's time goes (encoder, decoder, scoring).

Usage: ``python benchmarks/forwards.py [--model tiny.en] [--masks 256] [--windows 0.5,1,2]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import xattn_utils as xu
from xattn_utils.analysis.compare import pool_to_enc
from xattn_utils.data import load_corpus
from xattn_utils.maps.attention import forward_attention
from xattn_utils.maps.estimators import estimate
from xattn_utils.maps.forwards import decoder_logits, encode, mel_score_fn
from xattn_utils.maps.masks import MaskSampler
from xattn_utils.maps.perturbation import PerturbationOptions, kl_scores
from xattn_utils.model.decode import Transcript, decode, features
from xattn_utils.model.loading import attention_implementation

ROOT = Path(__file__).resolve().parents[1] / "data" / "reference"


def run(fn, sampler: MaskSampler, n: int, batch: int = 4) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = [fn(sampler.masks(s, min(s + batch, n))).double() for s in range(0, n, batch)]
    return torch.cat(out), (time.perf_counter() - start) / n


def score_r(a: torch.Tensor, b: torch.Tensor, keep: np.ndarray) -> float:
    a, b = a[:, keep] - a[:, keep].mean(0), b[:, keep] - b[:, keep].mean(0)
    return float(((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp(min=1e-30)).mean())


def map_r(sampler, a, b, masks, keep, shape, estimator) -> float:
    ma = pool_to_enc(estimate(sampler, a, masks, estimator=estimator).reshape(shape).float())
    mb = pool_to_enc(estimate(sampler, b, masks, estimator=estimator).reshape(shape).float())
    ma, mb = ma[keep] - ma[keep].mean(1, keepdim=True), mb[keep] - mb[keep].mean(1, keepdim=True)
    return float(((ma * mb).sum(1) / (ma.norm(dim=1) * mb.norm(dim=1)).clamp(min=1e-30)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--masks", type=int, default=256)
    parser.add_argument("--fill-masks", type=int, default=128)
    parser.add_argument("--windows", default="0.5,1,2")
    args = parser.parse_args()
    loaded = xu.load_model(args.model)
    corpus = {u.id: u for u in load_corpus("demo")}
    default = PerturbationOptions().estimator
    for path in sorted((ROOT / args.model).glob("*.npz")):
        z = np.load(path)
        audio = corpus[path.stem].load()
        tr = decode(loaded, audio)
        if list(tr.output_ids) != list(z["output_ids"]):
            raise SystemExit(f"{path.stem}: the transcript differs from the reference's")
        mel = features(loaded, audio)
        with torch.no_grad():
            _, logits = forward_attention(loaded, mel, tr)
        label_maps = [lm.astype(np.int64) for lm in z["label_maps"]]
        sampler = MaskSampler(label_maps, int(z["pool"]), p=0.5, design="iid", seed=int(z["seed"]))
        n_mel, keep = label_maps[0].shape[0], ~z["special"].astype(bool)
        shape = (len(tr), n_mel, label_maps[0].shape[1])
        faithful = torch.from_numpy(z["scores"].astype(np.float64))
        print(f"\n{path.stem}: {len(tr)} tokens, {n_mel / 100:.2f} s of speech")
        with torch.no_grad(), attention_implementation(loaded, "sdpa"):
            variants = [(f"window_{w}s", {"encoder_window": float(w)}, args.masks)
                        for w in args.windows.split(",")]  # fmt: skip
            variants.append(("fill_zero", {"fill": "zero"}, args.fill_masks))
            for name, kwargs, n in variants:
                fn = mel_score_fn(loaded, mel, tr, logits, n_mel, **kwargs)
                scores, seconds = run(fn, sampler, n)
                masks = np.arange(n)
                r_scores = score_r(scores, faithful[:n], keep)
                r_maps = {e: map_r(sampler, scores, faithful[:n], masks, keep, shape, e)
                          for e in ("mean", default)}  # fmt: skip
                print(
                    f"{name}: {seconds:.3f} s/mask; per-mask score r {r_scores:.3f}; map r "
                    f"(same {n} masks) " + ", ".join(f"{e} {r:.3f}" for e, r in r_maps.items())
                )
            profile(loaded, mel, tr, logits, sampler)


def profile(loaded, mel: torch.Tensor, tr: Transcript, logits: torch.Tensor, sampler) -> None:
    """Where the time of a faithful masked forward (batch of 4) goes."""
    ids = torch.tensor([tr.input_ids]).expand(4, -1)
    x = mel.expand(4, -1, -1).clone()
    log_p0 = torch.log_softmax(logits.float(), -1)
    parts = {}
    for _ in range(2):  # the second round is timed
        t0 = time.perf_counter()
        masks = sampler.masks(0, 4)
        x[:, :, : masks.shape[1]] = torch.where(
            masks.transpose(1, 2), mel.min(), x[:, :, : masks.shape[1]]
        )
        t1 = time.perf_counter()
        h = encode(loaded, x)
        t2 = time.perf_counter()
        out = decoder_logits(loaded, h, ids)
        t3 = time.perf_counter()
        kl_scores(log_p0, out)
        t4 = time.perf_counter()
        parts = {"masks_and_fill": t1 - t0, "encoder": t2 - t1, "decoder_and_logits": t3 - t2,
                 "kl": t4 - t3}  # fmt: skip
    total = sum(parts.values())
    print("time shares of a faithful forward: "
          + ", ".join(f"{k} {v / total:.1%}" for k, v in parts.items())
          + f" ({total / 4:.3f} s/mask)")  # fmt: skip


if __name__ == "__main__":
    main()

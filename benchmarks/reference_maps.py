"""High-mask SPES reference maps (SM_X) for the estimator benchmark (issue 12).

The faithful estimand: the model's own greedy transcript under teacher forcing, the full 30 s
encoder, i.i.d. Bernoulli(p = 0.5) masks over SLIC superpixels at the default granularities,
KL scores, occluded cells at the padding value. The per-mask scores are stored, so every
estimator replays the same forwards (``benchmarks/estimators.py``), and the run resumes where it
stopped: masks are drawn up front from ``--seed`` for a fixed pool of ``--pool`` masks and run in
order, round-robin over the utterances in chunks, each chunk saved as soon as it is done.

Writes ``data/reference/<model>/<utterance>.npz``: ``scores`` (masks_done, tokens) float32,
``label_maps`` (granularities, mel_frames, mel_bins), the transcript's ids and tokens, the pool
size and seed, and the pooled reference maps (tokens, enc_frames) of each half and of all
masks (20 ms max pooling, as the comparisons use). Usage:
``python benchmarks/reference_maps.py [--model tiny.en] [--pool 16384] [--chunk 128]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import xattn_utils as xu
from xattn_utils.analysis.compare import pool_to_enc
from xattn_utils.audio import n_mel_frames
from xattn_utils.data import load_corpus
from xattn_utils.maps.attention import forward_attention
from xattn_utils.maps.forwards import mel_score_fn
from xattn_utils.maps.masks import MaskSampler, distinct_label_maps, segment_counts, slic_segments
from xattn_utils.maps.perturbation import PerturbationOptions
from xattn_utils.model.decode import decode, features
from xattn_utils.model.loading import attention_implementation

# at most 6 s each: one synthetic, two recorded (the pooled maps are tokens x enc_frames)
UTTERANCES = ("syn_en_07", "real_LJ001-0011", "real_LJ001-0004")
ROOT = Path(__file__).resolve().parents[1] / "data" / "reference"


def reference_maps(scores: np.ndarray, sampler: MaskSampler, shape: tuple[int, ...]) -> dict:
    """Pooled SPES maps (tokens, enc_frames) of all masks and of each half (``sampler.fold``)."""
    n = scores.shape[0]
    n_cells = int(np.prod(shape[1:]))
    num = np.zeros((2, shape[0], n_cells))
    occ = np.zeros((2, n_cells))
    for start in range(0, n, 256):
        stop = min(start + 256, n)
        masks = sampler.masks(start, stop).reshape(stop - start, n_cells).numpy().astype(float)
        fold = sampler.fold(np.arange(start, stop))
        for f in range(2):
            rows = fold == f
            num[f] += scores[start:stop][rows].T @ masks[rows]
            occ[f] += masks[rows].sum(0)

    def pooled(numer: np.ndarray, occluded: np.ndarray) -> np.ndarray:
        sal = np.where(occluded > 0, numer / np.maximum(occluded, 1), 0.0).reshape(shape)
        return pool_to_enc(torch.from_numpy(sal)).numpy().astype(np.float32)

    return {
        "map": pooled(num.sum(0), occ.sum(0)),
        "map_halves": np.stack([pooled(num[f], occ[f]) for f in range(2)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--pool", type=int, default=16384, help="masks drawn up front")
    parser.add_argument("--chunk", type=int, default=128, help="masks per utterance per turn")
    parser.add_argument("--stop", type=int, default=None, help="stop at this many masks each")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--utterances", default=",".join(UTTERANCES))
    parser.add_argument(
        "--maps-only",
        action="store_true",
        help="recompute the stored maps from the stored scores (no forwards)",
    )
    args = parser.parse_args()
    if args.maps_only:
        for path in sorted((ROOT / args.model).glob("*.npz")):
            resave_maps(path)
        return

    loaded = xu.load_model(args.model)
    corpus = {u.id: u for u in load_corpus("demo")}
    out = ROOT / args.model
    out.mkdir(parents=True, exist_ok=True)
    options = PerturbationOptions()
    jobs = []
    for uid in args.utterances.split(","):
        audio = corpus[uid].load()
        tr = decode(loaded, audio)
        mel = features(loaded, audio)
        with torch.no_grad():
            _, logits = forward_attention(loaded, mel, tr)
        n_mel = n_mel_frames(audio)
        spec = mel[0, :, :n_mel].T.float().cpu().numpy()
        label_maps = distinct_label_maps(
            [slic_segments(spec, k) for k in segment_counts(n_mel, options.granularities)]
        )
        sampler = MaskSampler(label_maps, args.pool, p=0.5, design="iid", seed=args.seed)
        path = out / f"{uid}.npz"
        scores = np.zeros((0, len(tr)), dtype=np.float32)
        if path.exists():
            old = np.load(path)
            if list(old["output_ids"]) != list(tr.output_ids) or int(old["pool"]) != args.pool:
                raise SystemExit(f"{path} was made with another transcript or pool: remove it")
            scores = old["scores"]
        fn = mel_score_fn(loaded, mel, tr, logits, n_mel)
        shape = (len(tr), n_mel, spec.shape[1])
        jobs.append(dict(uid=uid, tr=tr, sampler=sampler, fn=fn, scores=scores, path=path,
                         shape=shape, label_maps=np.stack(label_maps).astype(np.int16),
                         duration=len(audio) / 16000))  # fmt: skip
        segments = [int(m.max()) + 1 for m in label_maps]
        print(f"{uid}: {len(tr)} tokens, {n_mel} mel frames, segments {segments}, "
              f"{scores.shape[0]} masks done")  # fmt: skip

    stop = min(args.pool, args.stop or args.pool)
    while any(j["scores"].shape[0] < stop for j in jobs):
        for j in jobs:
            done = j["scores"].shape[0]
            if done >= stop:
                continue
            end = min(done + args.chunk, stop)
            t0 = time.perf_counter()
            new = []
            with torch.no_grad(), attention_implementation(loaded, "sdpa"):
                for s in range(done, end, 4):
                    new.append(j["fn"](j["sampler"].masks(s, min(s + 4, end))).double().numpy())
            j["scores"] = np.concatenate([j["scores"], np.concatenate(new).astype(np.float32)])
            save(j, args)
            dt = time.perf_counter() - t0
            print(f"{j['uid']}: {end} masks ({dt / (end - done):.3f} s/mask)", flush=True)


def resave_maps(path: Path) -> None:
    """Recompute the pooled maps of a stored pool from its scores (e.g. after a change of the
    halves), keeping everything else."""
    z = dict(np.load(path))
    label_maps = [lm.astype(np.int64) for lm in z["label_maps"]]
    sampler = MaskSampler(label_maps, int(z["pool"]), p=0.5, design="iid", seed=int(z["seed"]))
    shape = (len(z["output_ids"]), *label_maps[0].shape)
    z |= reference_maps(z["scores"].astype(np.float64), sampler, shape)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **z)
    tmp.replace(path)
    print(f"{path.stem}: maps of {z['scores'].shape[0]} masks")


def save(job: dict, args) -> None:
    maps = reference_maps(job["scores"].astype(np.float64), job["sampler"], job["shape"])
    tmp = job["path"].with_suffix(".tmp.npz")
    tr = job["tr"]
    np.savez_compressed(
        tmp,
        scores=job["scores"],
        label_maps=job["label_maps"],
        output_ids=np.array(tr.output_ids),
        input_ids=np.array(tr.input_ids),
        tokens=np.array(tr.tokens),
        special=np.array(tr.special),
        pool=args.pool,
        seed=args.seed,
        n_masks=job["scores"].shape[0],
        model=args.model,
        meta=json.dumps(
            {
                "design": "iid",
                "p": 0.5,
                "scorer": "kl",
                "fill": "padding",
                "encoder": "full 30 s",
                "duration_s": job["duration"],
            }
        ),  # fmt: skip
        **maps,
    )
    tmp.replace(job["path"])


if __name__ == "__main__":
    main()

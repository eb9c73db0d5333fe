"""SM_X at the study's budget on a GPU: 20,000 masks for a 10 s utterance of base (issue 12).

Runs the faithful SM_X masked forwards (full 30 s encoder, i.i.d. masks) in fp32 and under
bf16 autocast, on ``--device`` (default cuda), and prints seconds, masks per second, the batch
size used, and how close the bf16 map is to the fp32 one (mean per-token r of the pooled maps,
default estimator, same masks). Needs CUDA; on a CPU it says so and stops.

Usage: ``python benchmarks/gpu.py [--model base] [--n-masks 20000] [--utterance ID]``
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import xattn_utils as xu
from xattn_utils.analysis.compare import pool_to_enc, utterance_score
from xattn_utils.data import load_corpus
from xattn_utils.maps.perturbation import PerturbationOptions
from xattn_utils.maps.prepare import prepare
from xattn_utils.maps.spes import input_spes_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="base")
    parser.add_argument("--n-masks", type=int, default=20000)
    parser.add_argument("--utterance", default="real_LJ001-0003", help="about 10 s")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark measures the GPU path")
    loaded = xu.load_model(args.model, args.device)
    utt = next(u for u in load_corpus("demo") if u.id == args.utterance)
    audio = utt.load()
    prepared = prepare(loaded, audio)
    tr = prepared.transcript
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else args.device
    print(f"{utt.id}: {len(audio) / 16000:.1f} s, {len(tr)} tokens, {args.model} on {name}")
    base = replace(PerturbationOptions(), n_masks=args.n_masks, design="iid")
    maps = {}
    for precision in ("fp32", "bf16"):
        options = replace(base, precision=precision)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run = input_spes_run(loaded, prepared, options=options, progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        maps[precision] = pool_to_enc(run.maps()[0])
        print(f"{precision}: {seconds:.1f} s, {args.n_masks / seconds:.0f} masks/s")
    keep = [not s for s in tr.special]
    r = utterance_score(maps["fp32"], maps["bf16"], keep=keep).mean
    print(f"bf16 vs fp32 pooled map r (same masks): {r:.4f}")


if __name__ == "__main__":
    main()

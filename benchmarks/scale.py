"""Throughput of the Dask fan-out (:mod:`xattn_utils.maps.distributed`) on this machine, in one run:
utterances per minute with 1 and 2 local workers, and their ratio.

For each worker count: start a local cluster, load the model on every worker (not timed), then
explain the same demo utterances into a fresh store (timed: the whole ``explain_distributed``
call, scheduling and store writes included). Each worker gets the machine's cores divided by
the number of workers as torch threads (``--threads`` fixes it instead), so the ratio answers
"one process on the whole machine, or one per share of it?"; with ``--threads 1`` it measures
how the engine scales at a fixed per-worker size.

Prints ``name: value`` lines and a final summary line; the load average before and after shows
whether other processes shared the cores (the ratio is only meaningful on an idle machine). Usage:
``python benchmarks/scale.py [--model tiny.en] [--n-utterances 6] [--n-masks 16] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from xattn_utils import distributed as xd
from xattn_utils.data import load_corpus


def throughput(model: str, corpus: list, workers: int, args: argparse.Namespace) -> float:
    """Utterances per minute of one ``explain_distributed`` run on ``workers`` local workers."""
    start = time.perf_counter()
    with xd.connect(workers=workers) as client, tempfile.TemporaryDirectory() as store:
        xd.preload(client, model, "cpu")
        print(f"workers_{workers}_startup_seconds: {time.perf_counter() - start:.1f}")
        summary = xd.explain_distributed(
            client,
            model,
            corpus,
            store=store,
            device="cpu",
            threads=args.threads,
            progress=False,
            method="spes",
            n_masks=args.n_masks,
            seed=0,
        )
    if summary.failed:
        raise RuntimeError(f"failed utterances: {summary.failed}")
    threads = args.threads or max(1, xd.available_cores() // workers)
    print(f"workers_{workers}_torch_threads_each: {threads}")
    print(f"workers_{workers}_seconds: {summary.seconds:.1f}")
    print(f"workers_{workers}_utterances_per_minute: {summary.per_minute:.1f}")
    return summary.per_minute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--n-utterances", type=int, default=6)
    parser.add_argument("--n-masks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    args = parser.parse_args()

    corpus = load_corpus("demo", subset="synthetic", language="en", limit=args.n_utterances)
    print(f"model: {args.model}")
    print(f"utterances: {len(corpus)} (demo, synthetic, en)")
    print(f"n_masks: {args.n_masks}")
    print(f"cores: {xd.available_cores()}")
    print(f"load_average_before: {os.getloadavg()[0]:.1f}")
    one = throughput(args.model, corpus, 1, args)
    two = throughput(args.model, corpus, 2, args)
    print(f"load_average_after: {os.getloadavg()[0]:.1f}")
    print(f"speedup_2_vs_1_workers: {two / one:.2f}")
    print(
        f"summary: {one:.1f} utterances/min on 1 worker, {two:.1f} on 2 workers "
        f"({two / one:.2f}x) on {xd.available_cores()} cores"
    )


if __name__ == "__main__":
    main()

"""Forwards each mask design needs to reach the reliability i.i.d. masks reach at a budget.

One run on tiny.en and two demo utterances (one synthetic, one recorded): each plain design
(``iid``, ``antithetic``) runs ``--n-masks`` masks per map once; the control-variate designs
replay the same masks and scores. For SM_X and SM_H, the reliability of i.i.d. masks at the
full budget is the target; each design's forwards to reach it are read off its own reliability
curve over the mask counts (or extrapolated by Spearman-Brown beyond it), and
``ratio = budget / forwards`` (above 1: the design converges faster; the issue's target is 4).

Prints ``name: value`` lines and the table. Usage:
``python benchmarks/convergence.py [--model tiny.en] [--n-masks 256]``
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import xattn_utils as xu
from xattn_utils.analysis.convergence import convergence, summary_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--n-masks", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    loaded = xu.load_model(args.model, args.device)
    corpus = xu.load_corpus("demo", language="en")
    picks = [next(u for u in corpus if u.subset == s) for s in ("synthetic", "real")]
    frames = []
    for utt in picks:
        start = time.perf_counter()
        frames.append(convergence(loaded, utt.load(), n_masks=args.n_masks, utterance=utt.id,
                                  progress=False))  # fmt: skip
        print(f"seconds_{utt.id}: {time.perf_counter() - start:.1f}")
    table = pd.concat(frames, ignore_index=True)
    summary = summary_table(table, by=("model",))
    for row in summary.itertuples():
        print(f"ratio_{row.map}_{row.design}: {row.speedup_vs_iid:.2f} "
              f"(reliability {row.reliability:.3f} at {row.n_masks} masks; "
              f"{row.forwards_to_match_iid:.0f} forwards match iid)")  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.groupby(["map", "design", "n_masks"])[["reliability", "r"]].mean())
        print(summary.round(3).to_string(index=False))


if __name__ == "__main__":
    main()

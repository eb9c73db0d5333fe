"""Test-retest stability and the pointing game of SM_X estimators on unseen speech (issue 12).

On demo utterances that no estimator was chosen on (not in ``data/reference/``), SM_X runs
``--n-masks`` i.i.d. masks (the default report's budget) with ``--seeds`` seeds, the model's own
transcript, the faithful encoder. Every estimator replays the same scores, so the estimators
share their forwards. Printed per estimator, with the number of maps behind each figure:

- **test-retest r**: the mean per-token Pearson r (text tokens) between the pooled (20 ms)
  maps of two seeds, over all seed pairs;
- **pointing game**: for the first token of each word that matches a gold word (the
  ``.words.json`` boundaries), whether the pooled map's peak lies in the gold word's interval
  widened by ``--tolerance`` seconds; the share of hits, with a bootstrap CI over words and the
  hit rate of a uniformly random frame in the speech region as the floor.

Usage: ``python benchmarks/retest.py [--model tiny.en] [--utterances ID,...] [--n-masks 128]``
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

import xattn_utils as xu
from xattn_utils.analysis.compare import pool_to_enc
from xattn_utils.analysis.timestamps import match_words, normalize_word, normalized_words
from xattn_utils.analysis.timing import split_words
from xattn_utils.audio import ENC_FRAME_SECONDS
from xattn_utils.data import load_corpus
from xattn_utils.maps.perturbation import ESTIMATORS, PerturbationOptions
from xattn_utils.maps.prepare import prepare
from xattn_utils.maps.spes import input_spes_run

UNSEEN = ("real_LJ001-0006", "real_praatio_bobby")


def token_r(a: torch.Tensor, b: torch.Tensor, keep: list[bool]) -> float:
    a, b = a[keep] - a[keep].mean(1, keepdim=True), b[keep] - b[keep].mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--utterances", default=",".join(UNSEEN))
    parser.add_argument("--n-masks", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    args = parser.parse_args()
    loaded = xu.load_model(args.model)
    corpus = {u.id: u for u in load_corpus("demo")}
    estimators = args.estimators.split(",")
    retest = {e: [] for e in estimators}
    hits = {e: [] for e in estimators}
    floor = []
    for uid in args.utterances.split(","):
        utt = corpus[uid]
        audio = utt.load()
        prepared = prepare(loaded, audio)
        tr = prepared.transcript
        keep = [not s for s in tr.special]
        options = PerturbationOptions(n_masks=args.n_masks, design="iid", estimator="mean")
        start = time.perf_counter()
        runs = [input_spes_run(loaded, prepared, options=options, seed=seed, progress=False)
                for seed in range(args.seeds)]  # fmt: skip
        print(f"{uid}: {len(tr)} tokens, {args.seeds} x {args.n_masks} masks in "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        # first token of each word that matches a gold word
        words = [(w, idx) for w, idx in split_words(tr.tokens, tr.special) if normalize_word(w)
                 and not tr.special[idx[0]]]  # fmt: skip
        ours = [(normalize_word(w), 0.0, 0.0) for w, _ in words]
        gold = normalized_words(utt.words or ())
        # the first gold word is left out: LJSpeech's alignments fold the leading silence in
        pairs = [(i, j) for i, j in match_words(ours, gold) if j > 0]
        n_enc = prepared.n_enc
        for _, j in pairs:
            lo, hi = gold[j][1] - args.tolerance, gold[j][2] + args.tolerance
            frames = np.arange(n_enc) * ENC_FRAME_SECONDS + ENC_FRAME_SECONDS / 2
            floor.append(float(((frames >= lo) & (frames <= hi)).mean()))
        for name in estimators:
            maps = [pool_to_enc(run.maps(estimator=name)[0]) for run in runs]
            retest[name] += [token_r(a, b, keep) for a, b in itertools.combinations(maps, 2)]
            for m in maps:
                for i, j in pairs:
                    t = words[i][1][0]
                    peak = (int(m[t].argmax()) + 0.5) * ENC_FRAME_SECONDS
                    lo, hi = gold[j][1] - args.tolerance, gold[j][2] + args.tolerance
                    hits[name].append(float(lo <= peak <= hi))
        print(f"{uid}: {len(pairs)} of {len(words)} words matched to gold")
    rng = np.random.default_rng(0)
    for name in estimators:
        h = np.array(hits[name])
        boot = h[rng.integers(0, h.size, (2000, h.size))].mean(1) if h.size else np.array([np.nan])
        print(f"retest_{name}: r {np.mean(retest[name]):.3f} (n={len(retest[name])} seed pairs); "
              f"pointing {h.mean():.3f} [{np.quantile(boot, 0.025):.3f}, "
              f"{np.quantile(boot, 0.975):.3f}] (n={h.size} word-maps; "
              f"random frame {np.mean(floor):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()

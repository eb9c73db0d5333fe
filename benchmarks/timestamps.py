"""Word-timestamp methods on the demo's recorded English speech, in one run, out of sample.

Prints, per method: the share of gold word boundaries (starts and ends pooled) within 50 and
100 ms, MAE, signed bias (> 0 late), n boundaries, and seconds per audio second (decode +
forward + alignment, measured here), next to openai-whisper's ``transcribe(word_timestamps=True)``
on the same weights. ``calibrated`` is scored leave-one-utterance-out (heads and offsets refitted
without the utterance it times, boundaries then snapped as the method does); no other method is
fitted to labels (``all-heads-snap``'s snap knobs and ``chars-guided``'s head count and band
were chosen on the demo's synthetic English).

    PYTHONPATH=. python benchmarks/timestamps.py --model tiny.en
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import xattn_utils as xu
from xattn_utils import alignment, calibration, timestamp_methods
from xattn_utils.analysis.timestamps import pool_scores, score_timings

METHODS = [
    "whisper", "all-heads", "all-heads-refined", "all-heads-snap", "select", "chars",
    "chars-refined", "chars-guided",
]  # fmt: skip


def row(name, scores, seconds, audio_s) -> str:
    p = pool_scores(scores)
    return (
        f"{name:24s} {p.rates(50)[1]:6.3f} {p.rates(100)[1]:6.3f} {p.mae_ms():7.1f} "
        f"{p.bias_ms:7.1f} {p.n_gold:5d} {seconds / audio_s:8.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--limit", type=int, default=None, help="first N recorded utterances")
    args = ap.parse_args()
    loaded = xu.load_model(args.model, "cpu")
    utts = [u for u in xu.load_corpus("demo", subset="real") if u.words and u.language == "en"]
    utts = utts[: args.limit]
    language = "en" if loaded.multilingual else None
    audio_s = sum(u.duration for u in utts)
    scores: dict[str, list] = {m: [] for m in METHODS}
    seconds = dict.fromkeys([*METHODS, "calibrated (LOO)"], 0.0)
    items = []
    for u in utts:
        audio = u.load()
        for unit in ("tokens", "chars"):
            t0 = time.perf_counter()
            al = alignment.align_inputs(
                loaded, audio, unit=unit, language=language, guide=unit == "chars"
            )  # the guide (a second forward) is timed with every chars method
            t_in = time.perf_counter() - t0
            for m in [m for m in METHODS if timestamp_methods.METHODS[m].unit == unit]:
                t0 = time.perf_counter()
                words = alignment.timings_from_alignment(al, timestamp_methods.METHODS[m])
                seconds[m] += t_in + time.perf_counter() - t0
                scores[m].append(score_timings(words, u.words, skip_first_start=u.skip_first_start))
            if unit == "chars":
                seconds["calibrated (LOO)"] += t_in
                items.append(
                    calibration.LabelledAlignment(u.id, al, tuple(u.words), u.skip_first_start)
                )
    loo = calibration.leave_one_out(items, snap=timestamp_methods.METHODS["calibrated"].snap)
    scores["calibrated (LOO)"] = list(loo.values())
    ref = "openai-whisper transcribe()"
    try:
        from xattn_utils import whisper_ref

        t0 = time.perf_counter()
        words, _ = whisper_ref.whisper_words(loaded, utts)
        seconds[ref] = time.perf_counter() - t0
        scores[ref] = [
            score_timings(words[u.id], u.words, skip_first_start=u.skip_first_start) for u in utts
        ]
    except ImportError as err:
        print(f"openai-whisper not compared: {err}")
    print(f"{args.model}: {len(utts)} recorded utterances, {audio_s:.1f} s of audio, CPU")
    print(f"{'method':24s} {'<=50ms':>6s} {'<=100':>6s} {'MAE ms':>7s} {'bias':>7s} {'n':>5s} "
          f"{'s/audio s':>8s}")  # fmt: skip
    for name, sc in scores.items():
        print(row(name, sc, seconds[name], audio_s))
    base = seconds.get(ref)
    if base:
        ratios = {m: seconds[m] / base for m in seconds if m != ref}
        print("time relative to openai-whisper transcribe():",
              ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items()))  # fmt: skip
    print("calibrated (LOO): per utterance, heads and offsets fitted on the other", len(utts) - 1)
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()

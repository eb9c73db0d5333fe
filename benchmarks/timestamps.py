"""Word-timestamp methods on the demo's recorded English speech, in one run, out of sample.

Prints, per method: the share of gold word boundaries (starts and ends pooled) within 50 and
100 ms, MAE, signed bias (> 0 late), n boundaries, and seconds per audio second (decode +
forward + alignment, measured here), next to openai-whisper's ``transcribe(word_timestamps=True)``
on the same weights. ``calibrated`` is scored leave-one-utterance-out (heads and offsets refitted
without the utterance it times, boundaries then snapped as the method does); no other method is
fitted to labels (``all-heads-snap``'s snap knobs and ``chars-guided``'s head count and band
were chosen on the demo's synthetic English). ``chars-guided, text=ref`` aligns each utterance's
reference transcript instead of the decode (forced alignment): the timing without transcript
errors.

    PYTHONPATH=. python benchmarks/timestamps.py --model tiny.en
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

import xattn_utils as xu
from xattn_utils import alignment, calibration, timestamp_methods
from xattn_utils.analysis.timestamps import pool_scores, pooled_rate_ci, score_timings

METHODS = [
    "whisper", "all-heads", "all-heads-refined", "all-heads-snap", "select", "chars",
    "chars-refined", "chars-guided",
]  # fmt: skip


END_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # end_into_next_row values the LOO check chooses from
LOO_END = "chars-guided (end LOO)"
FORCED = "chars-guided, text=ref"  # the default on the reference transcript: forced alignment


def row(name, scores, seconds, audio_s) -> str:
    p = pool_scores(scores)
    ci = [pooled_rate_ci(scores, tol) for tol in (50, 100)]
    return (
        f"{name:24s} {p.rates(50)[1]:6.3f} [{ci[0].low:.2f}, {ci[0].high:.2f}] "
        f"{p.rates(100)[1]:6.3f} [{ci[1].low:.2f}, {ci[1].high:.2f}] {p.mae_ms():7.1f} "
        f"{p.bias_ms:7.1f} {p.n_gold:5d} {seconds / audio_s:8.3f}"
    )


def score(words, u):
    """``words`` scored against utterance ``u``'s gold words."""
    return score_timings(words, u.words, skip_first_start=u.skip_first_start)


def objective(scores) -> float:
    p = pool_scores(scores)
    return (p.rates(50)[1] + p.rates(100)[1]) / 2


def end_knob_loo(by_value: dict[float, list]) -> tuple[list, list[float]]:
    """Each utterance scored with the end_into_next_row that times the other utterances best."""
    n = len(next(iter(by_value.values())))
    held, picks = [], []
    for i in range(n):
        rest = {v: [s for j, s in enumerate(sc) if j != i] for v, sc in by_value.items()}
        best = max(rest, key=lambda v: objective(rest[v]))
        held.append(by_value[best][i])
        picks.append(best)
    return held, picks


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
    scores: dict[str, list] = {m: [] for m in [*METHODS, FORCED]}
    seconds = dict.fromkeys([*METHODS, LOO_END, FORCED, "calibrated (LOO)"], 0.0)
    by_end: dict[float, list] = {v: [] for v in END_GRID}
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
                scores[m].append(score(words, u))
            if unit == "chars":
                guided = timestamp_methods.METHODS["chars-guided"]
                for v in END_GRID:
                    words = alignment.timings_from_alignment(
                        al, replace(guided, end_into_next_row=v)
                    )
                    by_end[v].append(score(words, u))
                seconds[LOO_END] = seconds["chars-guided"]
                t0 = time.perf_counter()
                forced = alignment.align_inputs(
                    loaded, audio, unit="chars", text=u.text, language=language, guide=True
                )
                words = alignment.timings_from_alignment(forced, guided)
                seconds[FORCED] += time.perf_counter() - t0
                scores[FORCED].append(score(words, u))
                seconds["calibrated (LOO)"] += t_in
                items.append(
                    calibration.LabelledAlignment(u.id, al, tuple(u.words), u.skip_first_start)
                )
    scores[LOO_END], picks = end_knob_loo(by_end)
    loo = calibration.leave_one_out(items, snap=timestamp_methods.METHODS["calibrated"].snap)
    scores["calibrated (LOO)"] = list(loo.values())
    ref = "openai-whisper transcribe()"
    try:
        from xattn_utils import whisper_ref

        t0 = time.perf_counter()
        words, _ = whisper_ref.whisper_words(loaded, utts)
        seconds[ref] = time.perf_counter() - t0
        scores[ref] = [score(words[u.id], u) for u in utts]
    except ImportError as err:
        print(f"openai-whisper not compared: {err}")
    print(f"{args.model}: {len(utts)} recorded utterances, {audio_s:.1f} s of audio, CPU")
    print(f"{'method':24s} {'<=50ms':>6s} {'95% CI':>12s} {'<=100':>6s} {'95% CI':>12s} "
          f"{'MAE ms':>7s} {'bias':>7s} {'n':>5s} {'s/audio s':>8s}")  # fmt: skip
    for name, sc in scores.items():
        print(row(name, sc, seconds[name], audio_s))
    base = seconds.get(ref)
    if base:
        ratios = {m: seconds[m] / base for m in seconds if m != ref}
        print("time relative to openai-whisper transcribe():",
              ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items()))  # fmt: skip
    print("CIs: percentile bootstrap over the", len(utts), "utterances (pooled share resampled)")
    print("calibrated (LOO): per utterance, heads and offsets fitted on the other", len(utts) - 1)
    print(f"{LOO_END}: per utterance, end_into_next_row chosen from {END_GRID} on the other",
          len(utts) - 1, "(mean of the shares within 50 and 100 ms); picks:",
          {v: picks.count(v) for v in sorted(set(picks))})  # fmt: skip
    print(f"{FORCED}: {timestamp_methods.DEFAULT_METHOD} aligning each utterance's reference "
          "transcript (text=): what the default's timing gives when the words are right; the "
          "rows above time the greedy decode, whose misheard words count as misses")  # fmt: skip
    default = timestamp_methods.DEFAULT_METHOD
    for other in ("all-heads-snap", "whisper"):
        if other != default:
            d = [pooled_rate_ci(scores[default], t, baseline=scores[other]) for t in (50, 100)]
            print(f"{default} minus {other}, paired over utterances: within 50 ms "
                  f"{d[0].mean:+.3f} [{d[0].low:+.3f}, {d[0].high:+.3f}], within 100 ms "
                  f"{d[1].mean:+.3f} [{d[1].low:+.3f}, {d[1].high:+.3f}]")  # fmt: skip
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()

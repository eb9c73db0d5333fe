"""Word timings written as JSON, CSV, SRT subtitles or Praat TextGrids (``xattn timestamps``)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence

from .timing import WordTiming

FORMATS = ("json", "csv", "srt", "textgrid")


def _word(w: WordTiming) -> dict:
    p = None if w.probability is None else round(w.probability, 4)
    return {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)} | {
        "probability": p
    }


def to_json(results: Mapping[str, Sequence[WordTiming]]) -> str:
    """A JSON list, one object per file: ``{"file", "words": [{word, start, end, ...}]}``."""
    items = [{"file": f, "words": [_word(w) for w in ws]} for f, ws in results.items()]
    return json.dumps(items, indent=1, ensure_ascii=False) + "\n"


def to_csv(results: Mapping[str, Sequence[WordTiming]]) -> str:
    """CSV with a header: ``file,index,word,start,end,probability``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "index", "word", "start", "end", "probability"])
    for f, words in results.items():
        for i, w in enumerate(words):
            d = _word(w)
            writer.writerow([f, i, d["word"], d["start"], d["end"], d["probability"]])
    return buf.getvalue()


def _srt_time(t: float) -> str:
    ms = round(max(t, 0) * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def to_srt(words: Sequence[WordTiming], *, max_chars: int = 42, max_gap: float = 1.0) -> str:
    """SubRip subtitles of one file: words grouped into cues of at most ``max_chars``
    characters, a new cue after a pause longer than ``max_gap`` seconds."""
    cues: list[list[WordTiming]] = []
    for w in words:
        last = cues[-1] if cues else None
        text = " ".join(x.word.strip() for x in last or []) + " " + w.word.strip()
        if last and len(text.strip()) <= max_chars and w.start - last[-1].end <= max_gap:
            last.append(w)
        else:
            cues.append([w])
    blocks = [
        f"{i}\n{_srt_time(c[0].start)} --> {_srt_time(c[-1].end)}\n"
        + " ".join(w.word.strip() for w in c)
        for i, c in enumerate(cues, 1)
    ]
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def to_textgrid(words: Sequence[WordTiming], duration: float, *, tier: str = "words") -> str:
    """A Praat TextGrid (long text format) with one interval tier: the words, and empty
    intervals for the gaps between them, covering 0 to ``duration`` seconds."""
    intervals, t = [], 0.0
    for w in words:
        start, end = max(w.start, t), max(w.end, w.start, t)
        if start > t:
            intervals.append((t, start, ""))
        if end > start:
            intervals.append((start, end, w.word.strip()))
            t = end
    end_time = max(duration, t)
    if end_time > t or not intervals:
        intervals.append((t, end_time, ""))
    lines = [
        'File type = "ooTextFile"', 'Object class = "TextGrid"', "",
        "xmin = 0", f"xmax = {end_time:.4f}", "tiers? <exists>", "size = 1", "item []:",
        "    item [1]:", '        class = "IntervalTier"', f"        name = {_quote(tier)}",
        "        xmin = 0", f"        xmax = {end_time:.4f}",
        f"        intervals: size = {len(intervals)}",
    ]  # fmt: skip
    for i, (a, b, text) in enumerate(intervals, 1):
        lines += [f"        intervals [{i}]:", f"            xmin = {a:.4f}"]
        lines += [f"            xmax = {b:.4f}", f"            text = {_quote(text)}"]
    return "\n".join(lines) + "\n"

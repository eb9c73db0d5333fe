"""timestamp_formats: JSON, CSV, SRT and TextGrid output."""

from __future__ import annotations

import json
from dataclasses import replace

from xattn_utils import timestamp_formats as F
from xattn_utils.analysis.timing import WordTiming


def test_formats_round_trip():
    words = [WordTiming(" hi", 0.5, 0.9, ("hi",), (1,), 0.9), WordTiming(" you", 1.0, 1.4,
             ("you",), (2,))]  # fmt: skip
    data = json.loads(F.to_json({"a.wav": words}))
    assert data[0]["file"] == "a.wav" and data[0]["words"][1]["word"] == "you"
    assert F.to_csv({"a.wav": words}).splitlines()[1] == "a.wav,0,hi,0.5,0.9,0.9"
    srt = F.to_srt(words)
    assert srt.startswith("1\n00:00:00,500 --> 00:00:01,400\nhi you")
    grid = F.to_textgrid(words, 2.0)
    assert "intervals: size = 5" in grid and 'text = "you"' in grid and "xmax = 2.0000" in grid
    assert F.to_textgrid([replace(words[0], start=0.0)], 1.0).count("intervals [") == 2

"""Rebuild the demo corpus in ``data/raw/demo`` from the lists in ``data/``.

    python data/make_demo.py                          # synthetic subset; keeps the real rows
    python data/make_demo.py --real /path/to/speech   # also re-import the real subset
    python data/make_demo.py --only syn_en_01         # just these ids (--out DIR: elsewhere)

**Synthetic subset.** Each sentence of ``data/sentences/`` is spoken by libespeak-ng
(``data/espeak_synth.py``: ctypes, synchronous mode, one fresh process per utterance) with a
fixed voice, rate and pitch, so the audio depends only on the text and the espeak-ng version.

**Gold word boundaries** come from the synthesiser's own ``espeakEVENT_WORD`` events, whose
``sample`` field gives the exact output sample where a word's first phoneme begins (stop
closures included). Events give no end, and a pause after a word (comma, full stop) is part of
that word's span up to the next word's start. So a word ends after its last *loud* sample
(``|x| >= peak * 10**(TRIM_DB / 20)``, -40 dB under the utterance's peak) before the next
word's start. Leading and trailing silence are cut the same way, and exactly ``PAD_SECONDS``
of digital silence is added on each side after resampling 22.05 kHz -> 16 kHz. Times are
sample-exact at 22.05 kHz (0.05 ms) and stored rounded to 0.1 ms. The script stops if the
events do not match the sentence's words one to one (see ``data/README.md``).

**Real subset.** ``--real DIR`` converts the recordings listed in ``data/real_sources.tsv``
to 16 kHz mono 16-bit FLAC and copies their transcripts and word alignments, without the
non-lexical tokens (``[adif]``, ``<vocnoise>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from xattn_utils.audio import SAMPLE_RATE, resample
from xattn_utils.data import Word, write_words

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR))
import espeak_synth  # noqa: E402  (data/espeak_synth.py)
from espeak_synth import Voice  # noqa: E402

SENTENCES_DIR = DATA_DIR / "sentences"
REAL_SOURCES = DATA_DIR / "real_sources.tsv"
DEMO_DIR = DATA_DIR / "raw" / "demo"
PAD_SECONDS = 0.25  # digital silence before the first and after the last word
TRIM_DB = -40.0  # a sample is "loud" at or above this level relative to the utterance's peak
MIN_SECONDS, MAX_SECONDS = 3.0, 10.0  # allowed synthetic utterance durations
MANIFEST_COLUMNS = (
    "id", "path", "text", "language", "subset", "voice", "rate_wpm", "pitch", "duration",
    "translation", "words", "skip_first_start", "source", "license",
)  # fmt: skip
NON_LEXICAL = re.compile(r"^(\[.*\]|<.*>)$")  # [adif], <vocnoise>


VOICES: dict[str, tuple[Voice, ...]] = {
    "en": (
        Voice("en-us", 160, 50),
        Voice("en-gb-x-rp+f4", 150, 55),
        Voice("en-us+m1", 185, 45),
        Voice("en-us+f3", 155, 55),
    ),
    # espeak-ng's own voice per language: its variants (+f2, +f4, +m3) were even harder for
    # Whisper base to understand
    "it": (Voice("it", 140, 50), Voice("it", 160, 45)),
    "de": (Voice("de", 140, 50), Voice("de", 160, 45)),
    "fr": (Voice("fr", 140, 50), Voice("fr", 160, 45)),
    "es": (Voice("es", 140, 50), Voice("es", 160, 45)),
}  # sentence i of a language uses voice i % len(voices)


@dataclass(frozen=True)
class Sentence:
    id: str
    language: str
    text: str
    translation: str
    voice: Voice


def sentences() -> list[Sentence]:
    """All synthetic sentences, ids ``syn_<lang>_<NN>``, from ``data/sentences/<lang>.txt|tsv``."""
    out = []
    for language, voices in VOICES.items():
        path = SENTENCES_DIR / (f"{language}.txt" if language == "en" else f"{language}.tsv")
        lines = [s for s in path.read_text("utf-8").splitlines() if s and not s.startswith("#")]
        for i, line in enumerate(lines):
            text, _, translation = line.partition("\t")
            voice = voices[i % len(voices)]
            sid = f"syn_{language}_{i + 1:02d}"
            out.append(Sentence(sid, language, text.strip(), translation.strip(), voice))
    return out


# --- synthetic utterances ----------------------------------------------------------------------


def text_words(text: str) -> list[str]:
    """The words of ``text``: runs of letters and digits."""
    return re.findall(r"\w+", text)


def synthesize(sentence: Sentence) -> tuple[np.ndarray, list[Word]]:
    """16 kHz int16 audio and gold word boundaries for one sentence (method: module docstring)."""
    result = espeak_synth.synth(sentence.text, sentence.voice)
    raw, rate = result.audio, result.sample_rate
    events = [e for e in result.events if e[1] > 0]  # a stray 0-length event can end a text
    names = [sentence.text[p - 1 : p - 1 + n] for p, n, _ in events]
    names = [re.sub(r"^\W+|\W+$", "", name) for name in names]
    if names != text_words(sentence.text):
        raise RuntimeError(
            f"{sentence.id}: espeak-ng's word events {names} do not match the text "
            f"{sentence.text!r}. It speaks some pairs ('in the', 'of the', 'on the') as one "
            "word and splits words with apostrophes or hyphens: rephrase the sentence"
        )
    x = raw.astype(np.float32) / 32768
    loud = np.abs(x) >= np.abs(x).max() * 10 ** (TRIM_DB / 20)
    first, last = int(np.argmax(loud)), len(x) - int(np.argmax(loud[::-1]))
    starts = [max(s, first) for _, _, s in events]
    ends = []
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(x)
        span = np.flatnonzero(loud[start:stop])
        if span.size == 0:
            raise RuntimeError(f"{sentence.id}: word {names[i]!r} has no loud sample")
        ends.append(start + int(span[-1]) + 1)
    pad = round(PAD_SECONDS * SAMPLE_RATE)
    speech = resample(x[first:last], rate, SAMPLE_RATE)
    audio = np.concatenate([np.zeros(pad), speech, np.zeros(pad)])
    audio16 = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)

    def seconds(sample: int) -> float:
        return (sample - first) / rate + PAD_SECONDS

    words = [Word(n, seconds(s), seconds(e)) for n, s, e in zip(names, starts, ends, strict=True)]
    duration = len(audio16) / SAMPLE_RATE
    if not MIN_SECONDS <= duration <= MAX_SECONDS:
        raise RuntimeError(
            f"{sentence.id}: {duration:.2f} s is outside {MIN_SECONDS}-{MAX_SECONDS} s; "
            "change the sentence's length or its voice's rate"
        )
    return audio16, words


def build_synthetic(out_dir: Path, ids: Iterable[str] | None = None) -> list[dict[str, str]]:
    """Synthesise sentences (all, or those in ``ids``) into ``out_dir``; return manifest rows."""
    chosen = sentences()
    if ids is not None:
        wanted = set(ids)
        chosen = [s for s in chosen if s.id in wanted]
        if missing := wanted - {s.id for s in chosen}:
            raise ValueError(f"no synthetic sentence with id {sorted(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = f"espeak-ng {espeak_synth.version()} via data/make_demo.py"
    rows = []
    for sentence in chosen:
        audio, words = synthesize(sentence)
        write_flac(out_dir / f"{sentence.id}.flac", audio)
        write_words(out_dir / f"{sentence.id}.words.json", words)
        rows.append(
            {
                "id": sentence.id,
                "path": f"{sentence.id}.flac",
                "text": sentence.text,
                "language": sentence.language,
                "subset": "synthetic",
                "voice": sentence.voice.name,
                "rate_wpm": str(sentence.voice.rate),
                "pitch": str(sentence.voice.pitch),
                "duration": f"{len(audio) / SAMPLE_RATE:.3f}",
                "translation": sentence.translation,
                "words": f"{sentence.id}.words.json",
                "skip_first_start": "0",
                "source": source,
                "license": "MIT (this repository)",
            }
        )
        print(f"{sentence.id}: {len(audio) / SAMPLE_RATE:.2f} s, {len(words)} words")
    return rows


def write_flac(path: Path, audio: np.ndarray) -> None:
    """Write 16 kHz int16 ``audio`` as 16-bit FLAC."""
    sf.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")


# --- real recordings ---------------------------------------------------------------------------


def import_real(source_dir: Path, out_dir: Path) -> list[dict[str, str]]:
    """Convert the recordings in ``real_sources.tsv`` from ``source_dir`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in _read_tsv(REAL_SOURCES):
        stem = entry["stem"]
        audio_path = next(
            (p for ext in (".flac", ".wav") if (p := source_dir / f"{stem}{ext}").is_file()), None
        )
        if audio_path is None:
            raise FileNotFoundError(f"{source_dir}: no {stem}.flac or {stem}.wav")
        uid = f"real_{stem}"
        audio = _to_16k_int16(audio_path)
        write_flac(out_dir / f"{uid}.flac", audio)
        text = (source_dir / f"{stem}.txt").read_text("utf-8").strip()
        text = " ".join(t for t in text.split() if not NON_LEXICAL.match(t))
        words_src = source_dir / f"{stem}.words.json"
        words_name = ""
        if words_src.is_file():
            items = json.loads(words_src.read_text("utf-8"))
            words = [
                Word(w["word"], float(w["start"]), float(w["end"]))
                for w in items
                if not NON_LEXICAL.match(w["word"])
            ]
            words_name = f"{uid}.words.json"
            write_words(out_dir / words_name, words)
        rows.append(
            {
                "id": uid,
                "path": f"{uid}.flac",
                "text": text,
                "language": entry["language"],
                "subset": "real",
                "voice": entry["voice"],
                "rate_wpm": "",
                "pitch": "",
                "duration": f"{len(audio) / SAMPLE_RATE:.3f}",
                "translation": entry["translation"],
                "words": words_name,
                "skip_first_start": entry["skip_first_start"],
                "source": entry["source"],
                "license": entry["license"],
            }
        )
        print(f"{uid}: {len(audio) / SAMPLE_RATE:.2f} s")
    return rows


def _to_16k_int16(path: Path) -> np.ndarray:
    info = sf.info(str(path))
    if info.samplerate == SAMPLE_RATE and info.subtype == "PCM_16":
        audio, _ = sf.read(str(path), dtype="int16", always_2d=True)
        if audio.shape[1] == 1:
            return audio[:, 0]  # already 16 kHz 16-bit mono: copy the samples unchanged
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = resample(audio.mean(axis=1), rate, SAMPLE_RATE)
    return np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)


# --- manifest ----------------------------------------------------------------------------------


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def write_manifest(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """Write ``rows`` as a tab-separated manifest (csv quoting, ``\\n`` line ends)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, MANIFEST_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder")
    parser.add_argument("--only", action="append", help="synthesise only this id (repeatable)")
    parser.add_argument("--real", type=Path, help="folder of real recordings to (re)import")
    args = parser.parse_args(argv)
    manifest = args.out / "manifest.tsv"
    old = _read_tsv(manifest) if manifest.is_file() else []
    if args.only is None:  # a full rebuild replaces the synthetic rows, and --real the real ones
        old = [row for row in old if row["subset"] == "real" and args.real is None]
    new = build_synthetic(args.out, args.only)
    if args.real is not None:
        new += import_real(args.real, args.out)
    fresh = {row["id"]: row for row in new}
    rows = [fresh.pop(row["id"], row) for row in old] + list(fresh.values())
    rows.sort(key=lambda row: row["subset"] != "synthetic")  # stable: synthetic rows first
    write_manifest(manifest, rows)
    print(f"wrote {len(rows)} rows to {manifest}")


if __name__ == "__main__":
    main()

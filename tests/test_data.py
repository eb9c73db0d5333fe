"""The demo corpus (contents, gold word boundaries, reproducibility) and the corpus loaders."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf

from xattn_utils.audio import SAMPLE_RATE
from xattn_utils.data import (
    CorpusError,
    Utterance,
    Word,
    WordsError,
    demo_root,
    load_corpus,
    read_words,
    write_words,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = load_corpus("demo")
SYNTHETIC = [u for u in DEMO if u.subset == "synthetic"]
REAL = [u for u in DEMO if u.subset == "real"]
WITH_WORDS = [u for u in DEMO if u.words]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def frame_rms(audio: np.ndarray, frame: int = 320) -> np.ndarray:
    """RMS of consecutive 20 ms frames."""
    frames = audio[: audio.size // frame * frame].reshape(-1, frame).astype(np.float64)
    return np.sqrt(np.mean(frames**2, axis=1))


def span(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    return audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)]


# --- the demo corpus ---------------------------------------------------------------------------


def test_demo_contents() -> None:
    english = [u for u in SYNTHETIC if u.language == "en"]
    assert len(english) >= 24
    assert len({u.voice for u in english}) >= 3
    other = [u for u in SYNTHETIC if u.language != "en"]
    assert len(other) >= 12
    assert {u.language for u in other} <= {"it", "de", "fr", "es"}
    assert all(u.translation for u in other)  # English references for Whisper's translate task
    assert all(u.words and u.text for u in SYNTHETIC)
    assert len(REAL) >= 10 and sum(bool(u.words) for u in REAL) >= 10
    assert {"en", "es", "sv"} <= {u.language for u in REAL}
    assert len({u.id for u in DEMO}) == len(DEMO)


def test_demo_manifest_columns() -> None:
    with (demo_root() / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    required = {"id", "path", "text", "language", "subset", "voice", "duration", "translation"}
    assert required | {"words"} <= set(rows[0])
    for row in rows:
        assert not Path(row["path"]).is_absolute() and row["path"].endswith(".flac")
        assert row["subset"] in ("synthetic", "real")
        assert sf.info(str(demo_root() / row["path"])).duration == pytest.approx(
            float(row["duration"]), abs=1e-3
        )


@pytest.mark.parametrize("utt", DEMO, ids=lambda u: u.id)
def test_demo_audio_is_16k_mono_pcm16(utt: Utterance) -> None:
    info = sf.info(str(utt.audio_path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (
        SAMPLE_RATE, 1, "PCM_16", "FLAC",
    )  # fmt: skip
    assert info.duration <= 30
    if utt.subset == "synthetic":
        assert 3 <= utt.duration <= 10


@pytest.mark.parametrize("utt", WITH_WORDS, ids=lambda u: u.id)
def test_word_boundaries_are_monotone_and_inside_the_audio(utt: Utterance) -> None:
    words = utt.words or ()
    for word in words:
        assert 0 <= word.start <= word.end <= utt.duration, word
    for before, after in zip(words, words[1:], strict=False):
        assert before.end <= after.start, (before, after)


@pytest.mark.parametrize("utt", SYNTHETIC, ids=lambda u: u.id)
def test_synthetic_words_match_text(utt: Utterance) -> None:
    assert [w.word for w in utt.words or ()] == re.findall(r"\w+", utt.text or "")


@pytest.mark.parametrize("utt", SYNTHETIC, ids=lambda u: u.id)
def test_synthetic_boundaries_are_tight(utt: Utterance) -> None:
    """Every word holds speech, starts near it and ends on it; the gaps between are quiet."""
    audio = utt.load()
    loudest = frame_rms(audio).max()
    peak = np.abs(audio).max()
    lead = span(audio, 0, utt.words[0].start)
    assert 0.15 <= lead.size / SAMPLE_RATE <= 0.35 and rms(lead) < 1e-3  # padded silence
    for i, word in enumerate(utt.words):
        inside = span(audio, word.start, word.end)
        assert rms(inside) > 0.1 * loudest, f"{word}: little energy (-20 dB under the loudest)"
        assert np.abs(inside[:1280]).max() > 0.01 * peak, f"{word}: no sound in the first 80 ms"
        tail = span(audio, word.end - 0.01, word.end)  # end set on the last sample over -40 dB
        assert np.abs(tail).max() > 10 ** (-46 / 20) * peak, f"{word}: ends in silence"
        if i + 1 < len(utt.words):
            gap = span(audio, word.end, utt.words[i + 1].start)
            if gap.size > 160:
                assert rms(gap) < 0.03 * loudest, f"speech between {word} and the next word"


@pytest.mark.parametrize("utt", [u for u in REAL if u.words], ids=lambda u: u.id)
def test_real_word_spans_hold_speech(utt: Utterance) -> None:
    """Words are above the recording's noise floor (its quietest 20 ms).

    mfa_cold_corpus3 is a low-SNR recording (a speaker with a cold: a third of its words are
    under 5x the floor, the quietest 2.3x), so the bar is 1.5x for every word and 5x for the
    median word. A word misplaced into a pause would sit near 1x.
    """
    audio = utt.load()
    floor = max(frame_rms(audio).min(), 1e-4)
    ratios = np.array([rms(span(audio, w.start, w.end)) / floor for w in utt.words or ()])
    assert ratios.min() > 1.5
    assert np.median(ratios) > 5


def test_real_subset_details() -> None:
    by_id = {u.id: u for u in REAL}
    lj = [u for u in REAL if u.id.startswith("real_LJ")]
    assert lj and all(u.skip_first_start and u.words[0].start == 0 for u in lj)
    assert not any(u.skip_first_start for u in DEMO if not u.id.startswith("real_LJ"))
    cold = by_id["real_mfa_cold_corpus3"]
    tokens = [w.word for w in cold.words or ()] + (cold.text or "").split()
    assert not [t for t in tokens if re.match(r"^[\[<].*[\]>]$", t)]  # [adif], <vocnoise> gone
    assert by_id["real_nst_sv_se10x016-08071999-1334_u0016002"].words is None
    assert by_id["real_mls_es_13697_11991_000000"].translation


def test_demo_filters() -> None:
    english = load_corpus("demo", language="en", subset="synthetic")
    assert english and all(u.language == "en" and u.subset == "synthetic" for u in english)
    assert len(load_corpus("demo", subset="real", limit=3)) == 3
    assert load_corpus("demo", limit=0) == []
    with pytest.raises(CorpusError, match="no utterance in 'demo' matches language='xx'"):
        load_corpus("demo", language="xx")


def test_demo_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XATTN_DEMO_DIR", str(tmp_path))
    assert demo_root() == tmp_path
    with pytest.raises(CorpusError, match="the demo corpus is missing"):
        load_corpus("demo")


# --- reproducibility ---------------------------------------------------------------------------


def _import_data_script(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _espeak_skip_reason() -> str | None:
    espeak = _import_data_script("espeak_synth")
    if not espeak.available():
        return "libespeak-ng.so.1 is not installed (apt-get install libespeak-ng1)"
    with (demo_root() / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        made_with = next(csv.DictReader(f, delimiter="\t"))["source"]
    if f"espeak-ng {espeak.version()} " not in made_with:
        return f"the corpus was made with {made_with!r}, this is espeak-ng {espeak.version()}"
    return None


def test_synthetic_subset_regenerates_bit_for_bit(tmp_path: Path) -> None:
    if reason := _espeak_skip_reason():
        pytest.skip(reason)
    make_demo = _import_data_script("make_demo")
    ids = ["syn_en_02", "syn_fr_03"]  # a breathy variant voice (f4) and a non-English one
    rows = make_demo.build_synthetic(tmp_path, ids)
    committed = {u.id: u for u in SYNTHETIC}
    for row in rows:
        new, _ = sf.read(tmp_path / row["path"], dtype="int16")
        old, _ = sf.read(committed[row["id"]].audio_path, dtype="int16")
        np.testing.assert_array_equal(new, old)
        assert read_words(tmp_path / row["words"]) == committed[row["id"]].words
        assert (tmp_path / row["words"]).read_bytes() == (demo_root() / row["words"]).read_bytes()


# --- loaders -----------------------------------------------------------------------------------


def tone(seconds: float = 1.0, rate: int = SAMPLE_RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    sf.write(tmp_path / "b.flac", tone(1.0), SAMPLE_RATE)
    sf.write(tmp_path / "a.wav", tone(0.5, 44_100), 44_100)
    (tmp_path / "a.txt").write_text("hello world\n", encoding="utf-8")
    write_words(tmp_path / "a.words.json", [Word("hello", 0.0, 0.2), Word("world", 0.25, 0.5)])
    (tmp_path / "notes.md").write_text("not audio")
    return tmp_path


def test_folder(folder: Path) -> None:
    a, b = load_corpus(folder)
    assert (a.id, a.text, a.language, a.audio_path) == ("a", "hello world", None, folder / "a.wav")
    assert a.words == (Word("hello", 0.0, 0.2), Word("world", 0.25, 0.5))
    assert (b.id, b.text, b.words) == ("b", None, None)
    assert a.load().shape == (SAMPLE_RATE // 2,) and a.duration == pytest.approx(0.5)
    assert [u.language for u in load_corpus(folder, language="it")] == ["it", "it"]  # a hint
    assert [u.id for u in load_corpus(folder, limit=1)] == ["a"]


def test_tsv_manifest(folder: Path) -> None:
    manifest = folder / "list.tsv"
    manifest.write_text(
        "path\ttext\tlanguage\ttranslation\twords\textra\n"
        'b.flac\t"Ciao, ""mondo"""\tit\tHello, world\t\tx\n'
        "a.wav\thello world\ten\t\ta.words.json\ty\n",
        encoding="utf-8",
    )
    b, a = load_corpus(manifest)
    assert (b.id, b.text, b.language, b.translation, b.words) == (
        "b", 'Ciao, "mondo"', "it", "Hello, world", None,
    )  # fmt: skip
    assert (a.id, a.language, a.translation, len(a.words or ())) == ("a", "en", None, 2)
    assert [u.id for u in load_corpus(manifest, language="en")] == ["a"]
    (folder / "manifest.tsv").write_text("path\nb.flac\n", encoding="utf-8")
    assert [u.id for u in load_corpus(folder)] == ["b"]  # a folder's manifest.tsv wins


def test_hf_like_dataset() -> None:
    stereo = np.stack([tone(1.0, 44_100), tone(1.0, 44_100)])  # (channels, samples)
    items = [
        {"audio": {"array": tone(2.0), "sampling_rate": SAMPLE_RATE, "path": "x/clip1.mp3"},
         "sentence": "first", "locale": "en"},
        {"id": "two", "audio": {"array": stereo, "sampling_rate": 44_100}, "text": "second",
         "words": [{"word": "second", "start": 0.1, "end": 0.6}]},
    ]  # fmt: skip
    first, second = load_corpus(items)
    assert (first.id, first.text, first.language) == ("clip1", "first", "en")
    assert first.audio_path is None and first.audio_array is not None
    assert (second.id, second.text, second.language) == ("two", "second", None)
    assert second.words == (Word("second", 0.1, 0.6),)
    audio = second.load()
    assert audio.shape == (SAMPLE_RATE,) and audio.dtype == np.float32
    assert second.duration == pytest.approx(1.0)
    items[1]["language"] = "de"
    assert [u.id for u in load_corpus(items, language="en")] == ["clip1"]


def test_hf_like_audio_from_path_and_bytes(folder: Path) -> None:
    items = [
        {"audio": {"path": str(folder / "b.flac"), "array": None}, "text": "t"},
        {"audio": {"bytes": (folder / "a.wav").read_bytes(), "path": None}, "text": "u"},
    ]
    by_path, by_bytes = load_corpus(items)
    assert by_path.load().size == SAMPLE_RATE and by_path.id == "b"
    assert by_bytes.load().size == SAMPLE_RATE // 2 and by_bytes.id == "000001"


def test_words_round_trip(tmp_path: Path) -> None:
    words = [Word("naïve", 0.123456, 0.5), Word("café", 0.5, 1.0)]
    write_words(tmp_path / "w.words.json", words)
    assert json.loads((tmp_path / "w.words.json").read_text(encoding="utf-8"))[0] == {
        "word": "naïve", "start": 0.1235, "end": 0.5,
    }  # fmt: skip
    assert read_words(tmp_path / "w.words.json") == (Word("naïve", 0.1235, 0.5), words[1])
    write_words(tmp_path / "empty.words.json", [])
    assert read_words(tmp_path / "empty.words.json") == ()


# --- errors ------------------------------------------------------------------------------------


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="'librispeech': no such corpus, file or folder"):
        load_corpus("librispeech")
    (tmp_path / "x.csv").write_text("path\n")
    with pytest.raises(CorpusError, match=r"x\.csv: not a corpus"):
        load_corpus(tmp_path / "x.csv")
    with pytest.raises(CorpusError, match="pick one split"):
        load_corpus({"train": [], "test": []})
    with pytest.raises(CorpusError, match="cannot read a corpus from a int"):
        load_corpus(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_corpus("demo", limit=-1)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no audio here")
    with pytest.raises(CorpusError, match=r"no audio files \(\.wav, \.flac"):
        load_corpus(tmp_path)


def test_manifest_errors(folder: Path) -> None:
    manifest = folder / "m.tsv"
    manifest.write_text("path\ttext\nb.flac\tok\nmissing.wav\tgone\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"m\.tsv, line 3: audio file .*missing\.wav does not"):
        load_corpus(manifest)
    manifest.write_text("file\ttext\nb.flac\tok\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no 'path' column \(it has \['file', 'text'\]\)"):
        load_corpus(manifest)
    manifest.write_text("path\ttext\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no rows"):
        load_corpus(manifest)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"word": "a", "start": 0, "end": 1}', "expected a list .* got dict"),
        ('[{"word": "a", "start": 0}]', "entry 0 is .*expected a list"),
        ('[{"word": "a", "start": "soon", "end": 1}]', "entry 0 is"),
        ('[{"word": "a", "start": 0, "end": 1}, {"word": "b", "start": 2, "end": 1}]',
         r"entry 1 \('b'\) runs from 2.0 to 1.0 s; need 0 <= start <= end"),
        ('[{"word": "a", "start": -1, "end": 1}]', "need 0 <= start"),
    ],
)  # fmt: skip
def test_malformed_words(folder: Path, content: str, message: str) -> None:
    (folder / "a.words.json").write_text(content, encoding="utf-8")
    with pytest.raises(WordsError, match=message):
        load_corpus(folder)


def test_dataset_errors() -> None:
    with pytest.raises(CorpusError, match=r"dataset item 0: expected a mapping with an 'audio'"):
        load_corpus([{"text": "no audio"}])
    with pytest.raises(CorpusError, match="has an array but no sampling_rate"):
        load_corpus([{"audio": {"array": tone()}, "text": "x"}])
    with pytest.raises(ValueError, match=r"dataset item 0 \(000000\): the audio is silent"):
        load_corpus([{"audio": {"array": np.zeros(100), "sampling_rate": 8000}}])
    with pytest.raises(CorpusError, match="neither an audio_path nor an audio_array"):
        Utterance("x", None, None, None).load()

"""Corpora as lists of :class:`Utterance`: the built-in demo, folders, TSV manifests, HF datasets.

Gold word timings are stored next to the audio as ``<stem>.words.json``: a JSON list of
``{"word": str, "start": seconds, "end": seconds}`` objects (:func:`read_words`,
:func:`write_words`).

A manifest is a tab-separated file with a header. Only ``path`` (relative to the manifest's
folder) is required; ``id``, ``text``, ``language``, ``subset``, ``voice``, ``translation``,
``words`` (a ``.words.json`` path, relative too) and ``skip_first_start`` (0/1) are read when
present, other columns are ignored. Quoting follows Python's csv module (and pandas).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE, load_audio, resample, validate

DEMO_ENV = "XATTN_DEMO_DIR"  # overrides demo_root()
MANIFEST_NAME = "manifest.tsv"
WORDS_SUFFIX = ".words.json"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
TEXT_KEYS = ("text", "sentence", "transcription", "transcript", "normalized_text")
LANGUAGE_KEYS = ("language", "locale", "lang")
_SOURCES_HELP = (
    "give 'demo', a folder of audio files, a .tsv manifest, a folder saved by "
    "datasets' save_to_disk, 'audiofolder:PATH', or a Hugging Face datasets.Dataset"
)


class CorpusError(ValueError):
    """A corpus that cannot be read: unknown source, empty folder, missing audio file, ..."""


class WordsError(CorpusError):
    """Malformed word timings (a ``.words.json`` file or a dataset's ``words`` entry)."""


@dataclass(frozen=True)
class Word:
    """One word and when it is said, in seconds from the start of the audio."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Utterance:
    """One utterance: its audio, what is said, and optionally when each word is said.

    ``audio_array`` (16 kHz mono float32) stands in for ``audio_path`` in in-memory corpora
    such as Hugging Face datasets. ``skip_first_start`` marks gold timings whose first start is
    unreliable: LJSpeech's forced alignments fold the leading silence into the first word.
    """

    id: str
    audio_path: Path | None
    text: str | None
    language: str | None
    subset: str = ""
    words: tuple[Word, ...] | None = None
    translation: str | None = None
    audio_array: np.ndarray | None = field(default=None, repr=False, compare=False)
    voice: str = ""
    skip_first_start: bool = False

    def load(self) -> np.ndarray:
        """The audio as validated 16 kHz mono float32, shape = (samples,)."""
        if self.audio_array is not None:
            return self.audio_array
        if self.audio_path is None:
            raise CorpusError(f"utterance {self.id!r} has neither an audio_path nor an audio_array")
        return load_audio(self.audio_path)

    @property
    def duration(self) -> float:
        """Duration in seconds; reads only the file's header."""
        if self.audio_array is not None:
            return self.audio_array.size / SAMPLE_RATE
        import soundfile as sf

        return float(sf.info(str(self.audio_path)).duration)


def demo_root() -> Path:
    """Folder of the built-in demo corpus: ``$XATTN_DEMO_DIR``, else ``data/raw/demo``."""
    if env := os.environ.get(DEMO_ENV):
        return Path(env)
    return Path(__file__).resolve().parents[1] / "data" / "raw" / "demo"


def load_corpus(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    language: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
) -> list[Utterance]:
    """Read a corpus as a list of :class:`Utterance`, in the source's order.

    ``source`` is one of:

    - ``"demo"``: the built-in corpus (:func:`demo_root`), subsets ``"synthetic"`` and
      ``"real"``;
    - a folder: its ``manifest.tsv`` if it has one, else its audio files (``AUDIO_SUFFIXES``,
      not recursive) with optional same-stem ``.txt`` transcripts and ``.words.json`` timings;
    - a ``.tsv`` manifest (see the module docstring);
    - a folder written by ``datasets.Dataset.save_to_disk``, or ``"audiofolder:PATH"`` for a
      folder read by ``datasets``' ``audiofolder`` builder (:mod:`xattn_utils.hf_datasets`);
    - a Hugging Face ``datasets.Dataset`` or any iterable of mappings with an ``audio`` entry
      (``{"array", "sampling_rate"}``, ``{"bytes"}``, a path, or a torchcodec decoder) and a
      text entry (``TEXT_KEYS``). Its audio is decoded, down-mixed and resampled to 16 kHz now
      (a ``datasets`` Audio column with soundfile, not torchcodec). A ``words`` entry holds gold
      timings: a list of ``{"word", "start", "end"}`` (seconds), the same as a dict of three
      lists, or as JSON text.

    ``language`` keeps utterances in that language; utterances whose source gives no language
    take this one. ``subset`` keeps one subset; ``limit`` stops after that many utterances.
    Raises :class:`CorpusError` for an unknown source, an empty folder, a missing audio file,
    or filters that match nothing.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    utterances = _utterances(source)  # raises now for an unknown source or an empty folder
    if limit == 0:
        return []
    kept: list[Utterance] = []
    seen: set[tuple[str | None, str]] = set()
    for utt in utterances:
        if utt.language is None and language is not None:
            utt = replace(utt, language=language)
        seen.add((utt.language, utt.subset))
        if (language is None or utt.language == language) and subset in (None, utt.subset):
            kept.append(utt)
            if len(kept) == limit:
                break
    if not kept and seen:
        languages = sorted({lang or "?" for lang, _ in seen})
        subsets = sorted({sub or "''" for _, sub in seen})
        raise CorpusError(
            f"no utterance in {_describe(source)} matches language={language!r}, "
            f"subset={subset!r}; it has languages {languages} and subsets {subsets}"
        )
    return kept


def read_words(path: str | os.PathLike[str]) -> tuple[Word, ...]:
    """Read a ``.words.json`` file: a list of ``{"word", "start", "end"}`` in seconds."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CorpusError(f"{path}: no such word-timing file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WordsError(f"{path}: not valid JSON ({err}); {_WORDS_FORMAT}") from err
    return _parse_words(items, source=str(path))


def write_words(path: str | os.PathLike[str], words: Iterable[Word]) -> None:
    """Write ``words`` as a ``.words.json`` file, one word a line, times rounded to 0.1 ms."""
    lines = [
        json.dumps({"word": w.word, "start": round(w.start, 4), "end": round(w.end, 4)},
                   ensure_ascii=False)
        for w in words
    ]  # fmt: skip
    text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    Path(path).write_text(text, encoding="utf-8")


_WORDS_FORMAT = 'expected a list of {"word": str, "start": seconds, "end": seconds}'


def _parse_words(items: Any, *, source: str) -> tuple[Word, ...]:
    if not isinstance(items, list):
        raise WordsError(f"{source}: {_WORDS_FORMAT}, got {type(items).__name__}")
    words = []
    for i, item in enumerate(items):
        try:
            word = Word(str(item["word"]), float(item["start"]), float(item["end"]))
        except (TypeError, KeyError, ValueError) as err:
            raise WordsError(f"{source}: entry {i} is {item!r}; {_WORDS_FORMAT}") from err
        if not (math.isfinite(word.start) and math.isfinite(word.end)) or not (
            0 <= word.start <= word.end
        ):
            raise WordsError(
                f"{source}: entry {i} ({word.word!r}) runs from {word.start} to {word.end} s; "
                "need 0 <= start <= end"
            )
        words.append(word)
    return tuple(words)


def _describe(source: object) -> str:
    return repr(source) if isinstance(source, str | os.PathLike) else type(source).__name__


def _utterances(source: object) -> Iterator[Utterance]:
    if isinstance(source, str) and source == "demo":
        manifest = demo_root() / MANIFEST_NAME
        if not manifest.is_file():
            raise CorpusError(
                f"the demo corpus is missing: no {manifest}. Set {DEMO_ENV} to its folder, or "
                "rebuild it with `python data/make_demo.py` in a checkout of the repository."
            )
        return _read_manifest(manifest)
    if isinstance(source, str | os.PathLike):
        from .hf_datasets import open_dataset  # lazily: that module builds on this one

        if (dataset := open_dataset(source)) is not None:  # save_to_disk folder, audiofolder:
            return _read_dataset(dataset)
        path = Path(source)
        if path.is_dir():
            if (path / MANIFEST_NAME).is_file():
                return _read_manifest(path / MANIFEST_NAME)
            return _read_folder(path)
        if path.is_file() and path.suffix.lower() == ".tsv":
            return _read_manifest(path)
        if path.is_file():
            raise CorpusError(f"{path}: not a corpus; a manifest must be a .tsv file")
        raise CorpusError(f"{source!r}: no such corpus, file or folder; {_SOURCES_HELP}")
    if isinstance(source, Mapping):  # e.g. a datasets.DatasetDict
        raise CorpusError(
            f"got a {type(source).__name__} with keys {list(source)[:5]}; pick one split, "
            "e.g. load_corpus(ds['test'])"
        )
    if isinstance(source, Iterable) and not isinstance(source, bytes):
        if hasattr(source, "cast_column"):  # a datasets.Dataset: decode its audio ourselves
            from .hf_datasets import undecoded

            source = undecoded(source)
        return _read_dataset(source)
    raise CorpusError(f"cannot read a corpus from a {type(source).__name__}; {_SOURCES_HELP}")


def _read_manifest(manifest: Path) -> Iterator[Utterance]:
    with manifest.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        columns = reader.fieldnames or []
    if "path" not in columns:
        raise CorpusError(
            f"{manifest}: no 'path' column (it has {columns}); a manifest is tab-separated "
            "with a header holding path and optionally id, text, language, words, ..."
        )
    if not rows:
        raise CorpusError(f"{manifest}: the manifest has a header but no rows")
    folder = manifest.parent
    utterances = []
    for line, row in enumerate(rows, start=2):
        audio = folder / row["path"]
        if not row["path"] or not audio.is_file():
            raise CorpusError(
                f"{manifest}, line {line}: audio file {audio} does not exist; paths in a "
                "manifest are relative to the manifest's folder"
            )
        if "words" in columns:
            words = read_words(folder / row["words"]) if row["words"] else None
        else:
            words = _sibling_words(audio)
        utterances.append(
            Utterance(
                id=row.get("id") or audio.stem,
                audio_path=audio,
                text=row.get("text") or None,
                language=row.get("language") or None,
                subset=row.get("subset") or "",
                words=words,
                translation=row.get("translation") or None,
                voice=row.get("voice") or "",
                skip_first_start=(row.get("skip_first_start") or "0").strip().lower()
                in ("1", "true", "yes"),
            )
        )
    return iter(utterances)


def _sibling_words(audio: Path) -> tuple[Word, ...] | None:
    path = audio.with_name(audio.stem + WORDS_SUFFIX)
    return read_words(path) if path.is_file() else None


def _read_folder(folder: Path) -> Iterator[Utterance]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
    )
    if not files:
        raise CorpusError(
            f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) and no {MANIFEST_NAME}; "
            "put the audio in this folder itself (sub-folders are not searched)"
        )
    utterances = []
    for audio in files:
        transcript = audio.with_suffix(".txt")
        text = transcript.read_text(encoding="utf-8").strip() if transcript.is_file() else None
        utterances.append(
            Utterance(audio.stem, audio, text or None, None, words=_sibling_words(audio))
        )
    return iter(utterances)


def _read_dataset(dataset: Iterable[Any]) -> Iterator[Utterance]:
    for i, item in enumerate(dataset):
        if not isinstance(item, Mapping) or "audio" not in item:
            keys = list(item) if isinstance(item, Mapping) else type(item).__name__
            raise CorpusError(
                f"dataset item {i}: expected a mapping with an 'audio' entry, got {keys}"
            )
        uid = str(item.get("id") or _audio_stem(item["audio"]) or f"{i:06d}")
        name = f"dataset item {i} ({uid})"
        text = next((str(item[k]) for k in TEXT_KEYS if item.get(k) not in (None, "")), None)
        language = next((str(item[k]) for k in LANGUAGE_KEYS if item.get(k)), None)
        translation = item.get("translation")
        yield Utterance(
            id=uid,
            audio_path=None,
            text=text,
            language=language,
            subset=str(item.get("subset") or ""),
            words=_dataset_words(item.get("words"), source=name),
            translation=translation if isinstance(translation, str) and translation else None,
            audio_array=_dataset_audio(item["audio"], name=name),
        )


def _dataset_words(words: Any, *, source: str) -> tuple[Word, ...] | None:
    """A dataset's ``words`` entry: a list of ``{"word", "start", "end"}``, the same as
    ``datasets``' ``Sequence`` of a struct (a dict of three lists), or as JSON text (a CSV
    metadata column). None or empty text: no gold timings."""
    if words is None or (isinstance(words, str) and not words.strip()):
        return None
    return _parse_words(_word_items(words, source=source), source=source)


def _word_items(words: Any, *, source: str) -> Any:
    if isinstance(words, str):
        try:
            return json.loads(words)
        except json.JSONDecodeError as err:
            raise WordsError(
                f"{source}: words are not valid JSON ({err}); {_WORDS_FORMAT}"
            ) from err
    if isinstance(words, Mapping) and {"word", "start", "end"} <= set(words):
        columns = [list(words[k]) for k in ("word", "start", "end")]
        if len({len(c) for c in columns}) != 1:
            raise WordsError(f"{source}: words, starts and ends differ in length; {_WORDS_FORMAT}")
        return [{"word": w, "start": s, "end": e} for w, s, e in zip(*columns, strict=True)]
    return list(words)


def _audio_stem(audio: Any) -> str | None:
    path = audio.get("path") if isinstance(audio, Mapping) else audio
    return Path(path).stem if isinstance(path, str) and path else None


def _dataset_audio(audio: Any, *, name: str) -> np.ndarray:
    """16 kHz mono float32 from a datasets audio entry (dict, path or torchcodec decoder)."""
    if isinstance(audio, Mapping) and audio.get("array") is not None:
        if not audio.get("sampling_rate"):
            raise CorpusError(f"{name}: the audio entry has an array but no sampling_rate")
        array, rate = np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    elif isinstance(audio, Mapping) and audio.get("bytes"):
        import soundfile as sf

        try:
            array, rate = sf.read(io.BytesIO(audio["bytes"]), dtype="float32")
        except Exception as err:  # libsndfile raises its own error types
            raise CorpusError(
                f"{name}: cannot read the audio bytes ({err}); give wav, flac, ogg or mp3"
            ) from err
    elif isinstance(audio, Mapping) and audio.get("path"):
        return load_audio(audio["path"])
    elif isinstance(audio, str | os.PathLike):
        return load_audio(audio)
    elif hasattr(audio, "get_all_samples"):  # datasets >= 4 decodes to torchcodec AudioDecoder
        samples = audio.get_all_samples()
        array, rate = np.asarray(samples.data, dtype=np.float32), int(samples.sample_rate)
    else:
        raise CorpusError(
            f"{name}: cannot read audio from {type(audio).__name__}; expected "
            "{'array', 'sampling_rate'}, {'bytes'}, {'path'} or a path"
        )
    if array.ndim == 2:  # (channels, samples) from datasets, or (samples, channels)
        array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
    if array.ndim != 1:
        raise CorpusError(f"{name}: expected 1-D or 2-D audio, got shape {array.shape}")
    array = resample(array, rate)
    validate(array, name=name)
    return array

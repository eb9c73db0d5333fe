"""Hugging Face ``datasets`` as corpora: ``save_to_disk`` folders, audio folders, Dataset objects.

:func:`open_dataset` turns a ``--data`` string into a ``datasets.Dataset`` when it names one:

- a folder written by ``Dataset.save_to_disk`` (it holds ``dataset_info.json`` and
  ``state.json``); a ``DatasetDict``'s folder (``dataset_dict.json``) holds one such folder
  per split, so give ``PATH/<split>``;
- ``audiofolder:PATH``, a folder read by ``datasets.load_dataset("audiofolder")``: audio
  files, optionally with a ``metadata.csv`` / ``metadata.jsonl`` whose ``file_name`` column
  names them and whose other columns (``transcription``, ``language``, ``words``, ...) are
  kept.

Audio is never decoded by ``datasets``: from version 4 it decodes (and even encodes file
paths) with torchcodec, which needs FFmpeg and a matching torch build. :func:`undecoded` casts
the audio column to ``Audio(decode=False)``, so rows hold the file's bytes or path, and
:mod:`xattn_utils.data` decodes them with soundfile and resamples them to 16 kHz with
:func:`xattn_utils.audio.resample`. Formats are therefore those libsndfile reads (wav, flac,
ogg/opus, mp3).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .data import CorpusError

AUDIOFOLDER_PREFIX = "audiofolder:"
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")
SAVED_DATASET_DICT_FILE = "dataset_dict.json"
AUDIO_COLUMN = "audio"


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``datasets.Dataset.save_to_disk``."""
    return all((Path(path) / name).is_file() for name in SAVED_DATASET_FILES)


def open_dataset(source: str | os.PathLike[str]) -> Any | None:
    """The undecoded ``datasets.Dataset`` that ``source`` names, or None if it names none.

    ``source`` is ``audiofolder:PATH`` or a ``save_to_disk`` folder (see the module
    docstring). Raises :class:`~xattn_utils.data.CorpusError` for a ``DatasetDict`` folder, an
    audio folder with several splits, a dataset without an audio column, or one that
    ``datasets`` cannot read.
    """
    text = os.fspath(source)
    if text.startswith(AUDIOFOLDER_PREFIX):
        return undecoded(load_audiofolder(text.removeprefix(AUDIOFOLDER_PREFIX)))
    path = Path(text)
    if (path / SAVED_DATASET_DICT_FILE).is_file():
        splits = sorted(p.name for p in path.iterdir() if is_saved_dataset(p))
        raise CorpusError(
            f"{path}: a saved DatasetDict with splits {splits}; give one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'test')}"
        )
    if path.is_dir() and is_saved_dataset(path):
        return undecoded(load_saved(path))
    return None


def absolute_source(source: str) -> str:
    """``source`` (a ``--data`` string) with its path made absolute, for code running elsewhere.

    ``demo`` and paths that do not exist stay as they are; ``audiofolder:`` keeps its prefix.
    """
    prefix = AUDIOFOLDER_PREFIX if source.startswith(AUDIOFOLDER_PREFIX) else ""
    path = Path(source.removeprefix(prefix))
    if source == "demo" or not path.exists():
        return source
    return prefix + str(path.resolve())


def load_saved(path: str | os.PathLike[str]) -> Any:
    """``datasets.load_from_disk(path)``, with a :class:`CorpusError` if it cannot be read."""
    datasets = _import_datasets()
    try:
        with _quiet(datasets):
            dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # arrow, json and fsspec errors alike
        raise CorpusError(
            f"{path}: cannot read it as a dataset saved with save_to_disk ({err})"
        ) from err
    if isinstance(dataset, datasets.DatasetDict):  # dataset_dict.json appeared meanwhile
        raise CorpusError(f"{path}: a DatasetDict with splits {list(dataset)}; give one split")
    return dataset


def load_audiofolder(path: str | os.PathLike[str]) -> Any:
    """The one split of ``datasets.load_dataset("audiofolder", data_dir=path)``.

    The arrow cache goes to a temporary folder and the dataset is kept in memory (it holds only
    the file paths and metadata), so nothing is written next to the audio or into the user's
    cache. Raises :class:`CorpusError` for a missing folder, a folder without audio, or
    several splits (give one split's folder).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CorpusError(f"{AUDIOFOLDER_PREFIX}{path}: no such folder")
    datasets = _import_datasets()
    try:
        with _quiet(datasets), _encode_paths_without_torchcodec(datasets):
            with tempfile.TemporaryDirectory(prefix="xattn-audiofolder-") as cache:
                loaded = datasets.load_dataset(
                    "audiofolder", data_dir=str(folder), cache_dir=cache, keep_in_memory=True
                )
    except Exception as err:  # no audio files, malformed metadata, ...
        raise CorpusError(
            f"{AUDIOFOLDER_PREFIX}{path}: datasets cannot read it as an audio folder ({err})"
        ) from err
    if len(loaded) != 1:
        raise CorpusError(
            f"{AUDIOFOLDER_PREFIX}{path}: the audio folder has splits {sorted(loaded)}; give "
            "one split's folder"
        )
    return next(iter(loaded.values()))


def undecoded(dataset: Any) -> Any:
    """``dataset`` with its audio column named ``audio`` and cast to ``Audio(decode=False)``.

    A single ``Audio`` column with another name is renamed; a plain ``audio`` column (paths or
    ``{"array", "sampling_rate"}`` dicts) is kept as it is. Raises :class:`CorpusError` if no
    column holds audio, or several ``Audio`` columns and none is called ``audio``.
    """
    datasets = _import_datasets()
    features = getattr(dataset, "features", None)
    if features is None:  # an IterableDataset of unknown features: rows as they come
        return dataset
    audio_columns = [name for name, f in features.items() if isinstance(f, datasets.Audio)]
    if AUDIO_COLUMN not in audio_columns:
        if AUDIO_COLUMN in features and not audio_columns:
            return dataset  # paths or arrays, read by data._dataset_audio as they are
        if len(audio_columns) != 1:
            raise CorpusError(
                f"the dataset has no '{AUDIO_COLUMN}' column"
                + (f" and several Audio columns {audio_columns}" if audio_columns else "")
                + f"; its columns are {list(features)}. Rename the audio column to "
                f"'{AUDIO_COLUMN}' (dataset.rename_column(old, '{AUDIO_COLUMN}'))"
            )
        dataset = dataset.rename_column(audio_columns[0], AUDIO_COLUMN)
    return dataset.cast_column(AUDIO_COLUMN, datasets.Audio(decode=False))


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            "reading Hugging Face datasets needs the `datasets` package: pip install datasets"
        ) from err
    return datasets


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """Hide datasets' progress bars for one call, then restore their setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@contextmanager
def _encode_paths_without_torchcodec(datasets: Any) -> Iterator[None]:
    """Let ``Audio.encode_example`` store a file path without importing torchcodec.

    The audio folder builder encodes each file's path. datasets >= 4 imports torchcodec before
    looking at the value, and fails where torchcodec or FFmpeg is missing, although a path is
    stored as it is (``{"bytes": None, "path": path}``). For string and ``Path`` values this
    does the same without the import; any other value goes to datasets' own method. The
    method is restored on exit.
    """
    audio = datasets.Audio
    original = audio.__dict__["encode_example"]

    def encode_example(self: Any, value: Any) -> Any:
        if isinstance(value, str):
            return {"bytes": None, "path": value}
        if isinstance(value, Path):
            return {"bytes": None, "path": str(value.absolute())}
        return original(self, value)

    audio.encode_example = encode_example
    try:
        yield
    finally:
        audio.encode_example = original

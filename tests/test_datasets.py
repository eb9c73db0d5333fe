"""Hugging Face datasets as corpora: save_to_disk folders, audio folders, Dataset objects.

Every dataset here is built from two demo files with ``datasets`` itself, without torchcodec:
audio columns are cast from paths or ``{"bytes", "path"}`` structs, which needs no encoder.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from datasets import Audio, Dataset, DatasetDict

from xattn_utils.audio import SAMPLE_RATE, resample
from xattn_utils.cli import main
from xattn_utils.data import CorpusError, WordsError, load_corpus
from xattn_utils.hf_datasets import AUDIOFOLDER_PREFIX, absolute_source, is_saved_dataset

DEMO = {u.id: u for u in load_corpus("demo")}
IDS = ["syn_en_01", "real_LJ001-0001"]  # synthetic and recorded, both with gold words


def words_of(uid: str) -> list[dict]:
    return [{"word": w.word, "start": w.start, "end": w.end} for w in DEMO[uid].words]


def demo_dataset(paths: list[str] | None = None, **columns) -> Dataset:
    paths = paths or [str(DEMO[uid].audio_path) for uid in IDS]
    table = {
        "audio": paths,
        "text": [DEMO[uid].text for uid in IDS],
        "language": ["en", "en"],
        "words": [words_of(uid) for uid in IDS],
    }
    return Dataset.from_dict(table | columns).cast_column("audio", Audio())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "saved"
    demo_dataset().save_to_disk(str(path))  # embeds the files' bytes
    return path


def test_a_saved_dataset_loads_with_its_text_words_and_audio(saved):
    assert is_saved_dataset(saved) and not any(saved.glob("*.flac"))
    corpus = load_corpus(saved)
    assert [u.id for u in corpus] == IDS
    for utt in corpus:
        demo = DEMO[utt.id]
        assert (utt.text, utt.language, utt.audio_path) == (demo.text, "en", None)
        assert utt.words == demo.words  # gold timings carried exactly
        np.testing.assert_array_equal(utt.load(), demo.load())  # flac bytes: lossless
        assert utt.duration == pytest.approx(demo.duration)
    assert [u.id for u in load_corpus(str(saved), limit=1)] == IDS[:1]


def test_a_dataset_object_is_read_without_torchcodec():
    dataset = demo_dataset()
    assert dataset.features["audio"].decode  # would need torchcodec if datasets decoded it
    corpus = load_corpus(dataset)
    assert [u.id for u in corpus] == IDS
    np.testing.assert_array_equal(corpus[1].load(), DEMO[IDS[1]].load())


def test_the_cli_reads_a_saved_dataset(saved, tmp_path, capsys):
    out = tmp_path / "ca"
    args = ["attention", "--model", "random-tiny", "--device", "cpu", "--data", str(saved)]
    assert main([*args, "--limit", "1", "--out", str(out)]) == 0
    index = pd.read_csv(out / "index.csv")
    assert list(index["id"]) == IDS[:1] and (out / f"{IDS[0]}.safetensors").is_file()
    assert index["duration"].iloc[0] == pytest.approx(DEMO[IDS[0]].duration, abs=0.01)
    assert "wrote 1 utterances" in capsys.readouterr().out


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_other_sampling_rates_are_resampled_to_16k(tmp_path, rate):
    originals = [DEMO[uid].load() for uid in IDS]
    paths = []
    for uid, audio in zip(IDS, originals, strict=True):
        paths.append(str(tmp_path / f"{uid}.wav"))
        sf.write(paths[-1], resample(audio, SAMPLE_RATE, rate), rate, subtype="FLOAT")
    demo_dataset(paths).save_to_disk(str(tmp_path / "saved"))
    for utt, original in zip(load_corpus(tmp_path / "saved"), originals, strict=True):
        audio = utt.load()
        assert audio.dtype == np.float32
        assert abs(audio.size - original.size) <= 2  # 16 kHz again, not `rate`
        r = np.corrcoef(audio[: original.size], original[: audio.size])[0, 1]
        assert r > (0.998 if rate > SAMPLE_RATE else 0.95)  # 8 kHz drops what lies above 4 kHz


def test_another_audio_column_name_and_words_as_a_struct_of_lists(tmp_path):
    uid = IDS[0]
    words = {k: [w[k] for w in words_of(uid)] for k in ("word", "start", "end")}
    dataset = Dataset.from_dict(
        {"speech": [str(DEMO[uid].audio_path)], "sentence": ["hi"], "words": [words]}
    ).cast_column("speech", Audio(sampling_rate=16_000))
    (utt,) = load_corpus(dataset)
    assert (utt.id, utt.text, utt.words) == (uid, "hi", DEMO[uid].words)


def test_an_audiofolder_with_metadata_csv(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = []
    for uid in IDS:
        shutil.copy(DEMO[uid].audio_path, folder / f"{uid}.flac")
        words = json.dumps(words_of(uid)) if uid == IDS[0] else ""
        rows.append({"file_name": f"{uid}.flac", "transcription": DEMO[uid].text, "words": words})
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    encode = Audio.encode_example
    corpus = load_corpus(f"{AUDIOFOLDER_PREFIX}{folder}", language="en")
    assert Audio.encode_example is encode  # the scoped workaround put datasets back
    assert sorted(u.id for u in corpus) == sorted(IDS)
    for utt in corpus:
        assert (utt.text, utt.language) == (DEMO[utt.id].text, "en")
        np.testing.assert_array_equal(utt.load(), DEMO[utt.id].load())
    by_id = {u.id: u for u in corpus}
    assert by_id[IDS[0]].words == DEMO[IDS[0]].words and by_id[IDS[1]].words is None
    assert not list(folder.glob("*.arrow")) and len(list(folder.iterdir())) == 3  # wrote nothing


def test_an_audiofolder_without_metadata_has_no_text(tmp_path):
    shutil.copy(DEMO[IDS[1]].audio_path, tmp_path / "clip.flac")
    (utt,) = load_corpus(f"{AUDIOFOLDER_PREFIX}{tmp_path}")
    assert (utt.id, utt.text, utt.words) == ("clip", None, None)


# --- errors name the problem -------------------------------------------------------------------


def test_a_dataset_without_audio_says_so(tmp_path):
    Dataset.from_dict({"text": ["a"], "path": ["x.wav"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(CorpusError, match=r"no 'audio' column.*\['text', 'path'\]"):
        load_corpus(tmp_path / "d")


def test_unreadable_datasets_and_audio_are_reported(tmp_path, saved):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    for arrow in broken.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    with pytest.raises(CorpusError, match="cannot read it as a dataset saved with save_to_disk"):
        load_corpus(broken)
    noise = Dataset.from_dict({"audio": [{"bytes": b"RIFF nonsense", "path": "bad.wav"}]})
    with pytest.raises(CorpusError, match=r"item 0 \(bad\): cannot read the audio bytes"):
        load_corpus(noise.cast_column("audio", Audio()))
    bad_words = demo_dataset(words=['[{"word": "a"', ""])
    with pytest.raises(WordsError, match=r"item 0 \(syn_en_01\): words are not valid JSON"):
        load_corpus(bad_words)


def test_splits_must_be_chosen(tmp_path, saved):
    split = datasets.load_from_disk(str(saved))
    DatasetDict({"test": split, "train": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match=r"DatasetDict with splits \['test', 'train'\]"):
        load_corpus(tmp_path / "dd")
    assert [u.id for u in load_corpus(tmp_path / "dd" / "test")] == IDS
    for split in ("train", "test"):
        (tmp_path / "af" / split).mkdir(parents=True)
        shutil.copy(DEMO[IDS[0]].audio_path, tmp_path / "af" / split / "a.flac")
    with pytest.raises(CorpusError, match=r"splits \['test', 'train'\]; give one split"):
        load_corpus(f"{AUDIOFOLDER_PREFIX}{tmp_path / 'af'}")
    with pytest.raises(CorpusError, match="no such folder"):
        load_corpus(f"{AUDIOFOLDER_PREFIX}{tmp_path / 'nowhere'}")


def test_absolute_source_keeps_the_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    assert absolute_source("audiofolder:clips") == f"audiofolder:{tmp_path / 'clips'}"
    assert absolute_source("clips") == str(tmp_path / "clips")
    assert absolute_source("demo") == "demo" and absolute_source("missing") == "missing"


def test_the_cli_names_a_bad_dataset(tmp_path, capsys):
    args = ["attention", "--model", "random-tiny", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*args, "--data", f"{AUDIOFOLDER_PREFIX}{tmp_path / 'nowhere'}"]) == 2
    assert "no such folder" in capsys.readouterr().err

"""store: keys, round trips, write-once entries that survive SIGKILL and concurrent writers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xattn_utils import store as store_module
from xattn_utils.store import ResultStore

REPO = Path(__file__).resolve().parents[1]

# Writes entries u0..u{n-1} (a 256 KiB tensor each), sleeping between them; with a GO path
# it first touches GO.ready.<pid> and waits for GO, so that writers start together. It loads
# store.py on its own: the package __init__ imports transformers (seconds per process).
WRITER = """
import importlib.util, os, sys, time, torch
from pathlib import Path
store_py, root, n, pause, *go = sys.argv[1:]
spec = importlib.util.spec_from_file_location("store", store_py)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
ResultStore = module.ResultStore
store = ResultStore(root)
if go:
    Path(f"{go[0]}.ready.{os.getpid()}").touch()
    while not Path(go[0]).exists():
        time.sleep(0.001)
for i in range(int(n)):
    key = ResultStore.key(model="m", utterance=f"u{i}", method="spes", params={"n": 8})
    tensors = {"sm": torch.full((256, 256), float(i)), "pid": torch.tensor(os.getpid())}
    store.get_or_compute(key, lambda: (tensors, {"i": i, "pid": os.getpid()}))
    time.sleep(float(pause))
"""


def _key(i: int) -> str:
    return ResultStore.key(model="m", utterance=f"u{i}", method="spes", params={"n": 8})


def _writer(root: Path, n: int, pause: float, *go: Path) -> subprocess.Popen:
    store_py = REPO / "xattn_utils" / "store.py"
    cmd = [sys.executable, "-c", WRITER, str(store_py), str(root), str(n), str(pause), *go]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE)


def test_key_is_stable_and_parameter_sensitive():
    base = dict(model="openai/whisper-tiny.en", utterance="spk 1/utt:7", method="spes")
    a = ResultStore.key(**base, params={"n_masks": 512, "p": 0.5, "grid": {"a": 1, "b": [2, 3]}})
    b = ResultStore.key(**base, params={"grid": {"b": [2, 3], "a": 1}, "p": 0.5, "n_masks": 512})
    assert a == b
    assert a.startswith("openai-whisper-tiny.en__spk-1-utt-7__spes__")
    assert "/" not in a and not a.startswith(".")
    others = [
        ResultStore.key(**base, params={"n_masks": 513, "p": 0.5, "grid": {"a": 1, "b": [2, 3]}}),
        ResultStore.key(**base, params={"n_masks": 512, "p": 0.5, "grid": {"a": 1, "b": [3, 2]}}),
        ResultStore.key(**{**base, "method": "ig"}, params={"n_masks": 512}),
        ResultStore.key(**{**base, "model": "base"}, params={"n_masks": 512}),
    ]
    assert len({a, *others}) == 5
    assert ResultStore.key(**base, params={"n": np.int64(3)}) == ResultStore.key(
        **base, params={"n": 3}
    )


def test_round_trip_and_first_writer_wins(tmp_path):
    store = ResultStore(tmp_path / "store")
    key = ResultStore.key(model="m", utterance="u", method="ca", params={})
    ca = torch.rand(2, 3, 4, 5)
    record = {"tokens": ["<|en|>", " hi"], "params": {"layers": 2}, "wer": 0.1, "note": None}
    tensors = {"ca": ca, "layer0": ca[0], "sm": np.ones((4, 5), dtype=np.float32)}
    assert not store.has(key)
    path = store.put(key, tensors, record)
    assert path == tmp_path / "store" / key and store.has(key)
    got, rec = store.get(key)
    assert rec == record
    torch.testing.assert_close(got["ca"], ca)
    torch.testing.assert_close(got["layer0"], ca[0])
    torch.testing.assert_close(got["sm"], torch.ones(4, 5))
    assert store.put(key, {"ca": torch.zeros(1)}, {"other": True}) == path
    assert store.get(key)[1] == record
    table = store.records()
    assert table.loc[0, "key"] == key and table.loc[0, "params.layers"] == 2
    assert "tokens" not in table.columns and store.keys() == [key]
    with pytest.raises(KeyError):
        store.get(ResultStore.key(model="m", utterance="v", method="ca", params={}))
    with pytest.raises(ValueError):
        store.has("../escape")
    assert ResultStore(tmp_path / "empty").records().columns.tolist() == ["key", "created"]


def test_get_or_compute_computes_once(tmp_path):
    store, calls = ResultStore(tmp_path), []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3)}, {"n": 3}

    key = _key(0)
    first = store.get_or_compute(key, compute)
    again = ResultStore(tmp_path).get_or_compute(key, compute)
    assert len(calls) == 1 and first[1] == again[1] == {"n": 3}
    assert torch.equal(again[0]["x"], torch.arange(3))


def test_losing_a_race_keeps_the_first_entry(tmp_path, monkeypatch):
    store, key = ResultStore(tmp_path), _key(0)
    real_save = store_module.save_file

    def save_then_lose_race(tensors, path):  # another writer finishes while we write
        real_save(tensors, path)
        if not store.has(key):
            monkeypatch.setattr(store_module, "save_file", real_save)
            store.put(key, {"x": torch.ones(2)}, {"writer": "first"})

    monkeypatch.setattr(store_module, "save_file", save_then_lose_race)
    assert store.put(key, {"x": torch.zeros(2)}, {"writer": "second"}) == tmp_path / key
    tensors, record = store.get(key)
    assert record == {"writer": "first"} and torch.equal(tensors["x"], torch.ones(2))
    assert store.partial() == []


def test_partial_entries_are_invisible_and_cleaned(tmp_path):
    store = ResultStore(tmp_path)
    store.put(_key(0), {"x": torch.zeros(2)}, {})
    tmp = tmp_path / f".tmp-{_key(1)}-123-abc"
    tmp.mkdir()
    (tmp / "tensors.safetensors").write_bytes(b"\x00" * 10)  # a writer killed mid-way
    assert not store.has(_key(1)) and store.keys() == [_key(0)] and len(store.records()) == 1
    assert store.partial() == [tmp]
    assert store.clean_partial() == 0  # too recent: might be a live writer
    assert store.clean_partial(min_age_s=0) == 1 and store.partial() == []


def test_sigkill_leaves_only_complete_entries_and_resume_fills_the_rest(tmp_path):
    n = 60
    proc = _writer(tmp_path, n, 0.05)
    store = ResultStore(tmp_path)
    deadline = time.monotonic() + 60
    while len(store.keys()) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = store.keys()
    assert 5 <= len(done) < n
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == done  # no half-written entry under a real key
    by_key = {_key(i): i for i in range(n)}
    for key in done:
        tensors, record = store.get(key)
        assert record["i"] == by_key[key] and record["pid"] == proc.pid
        assert torch.equal(tensors["sm"], torch.full((256, 256), float(by_key[key])))

    calls = []

    def compute(i):
        calls.append(i)
        return {"sm": torch.full((256, 256), float(i))}, {"i": i, "pid": os.getpid()}

    for i in range(n):
        store.get_or_compute(_key(i), lambda i=i: compute(i))
    assert len(calls) == n - len(done) and not set(map(_key, calls)) & set(done)
    assert len(store.keys()) == n and len(store.records()) == n
    store.clean_partial(min_age_s=0)
    assert store.partial() == []


def test_concurrent_writers_share_a_root(tmp_path):
    n, root, go = 20, tmp_path / "store", tmp_path / "go"
    procs = [_writer(root, n, 0.0, go) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both write the same keys in the same order from now on
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    store = ResultStore(root)
    assert store.keys() == sorted(map(_key, range(n))) and store.partial() == []
    pids = {proc.pid for proc in procs}
    for i in range(n):
        tensors, record = store.get(_key(i))
        assert record["i"] == i and record["pid"] in pids
        assert int(tensors["pid"]) == record["pid"]  # tensors and record from one writer

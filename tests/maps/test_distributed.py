"""distributed: shards partition a corpus by id; a 2-worker local Dask cluster gives the
single-process maps bit for bit, and a worker killed mid-run loses no finished utterance."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from xattn_utils import cli
from xattn_utils import distributed as xd
from xattn_utils.data import load_corpus
from xattn_utils.maps.corpus import explain_corpus
from xattn_utils.maps.explanation import Explanation
from xattn_utils.store import ResultStore

EXPLAIN = {"method": "spes", "n_masks": 8, "seed": 7}


@pytest.fixture(scope="module")
def corpus() -> list:
    """Short synthetic English demo utterances (about 5 s each)."""
    return load_corpus("demo", subset="synthetic", language="en", limit=6)


@pytest.fixture(scope="module")
def single(tiny, corpus, tmp_path_factory) -> ResultStore:
    """The corpus explained by ``explain_corpus`` in this process: the reference."""
    store = ResultStore(tmp_path_factory.mktemp("single"))
    explain_corpus(tiny, corpus, store=store, use_reference_text=True, progress=False, **EXPLAIN)
    return store


def _assert_same_entries(got: ResultStore, want: ResultStore, keys: list[str]) -> None:
    """Same keys, and bit-identical maps under each key."""
    assert keys and set(keys) <= set(got.keys())
    for key in keys:
        a, b = _maps(got, key), _maps(want, key)
        assert a.keys() == b.keys()
        for name in b:
            assert torch.equal(a[name], b[name]), f"{key}: {name} differs"


def _maps(store: ResultStore, key: str) -> dict[str, torch.Tensor]:
    return Explanation.from_tensors(*store.get(key)).to_tensors()[0]


def _stamp(store: ResultStore, key: str) -> tuple:
    """What a rewrite would change: the record's creation time, inode and mtime."""
    record = store.path(key) / "record.json"
    info = record.stat()
    return json.loads(record.read_text())["created"], info.st_ino, info.st_mtime_ns


# -- shards ------------------------------------------------------------------------------------


def test_shards_partition_by_a_stable_hash_of_the_id(corpus):
    ids = [f"spk{i}/utt{j}" for i in range(20) for j in range(50)]
    utts = [argparse.Namespace(id=i) for i in ids]
    parts = [xd.shard(utts, k, 4) for k in range(4)]
    assert sorted(u.id for part in parts for u in part) == sorted(ids)  # each id exactly once
    assert all(200 <= len(part) <= 300 for part in parts)  # roughly balanced
    assert [u.id for u in parts[1]] == [u.id for u in utts if u in parts[1]]  # corpus order
    assert xd.shard(utts[::-1][:10], 1, 4) == [u for u in utts[::-1][:10] if u in parts[1]]
    # the same on every machine, Python and run (pinned: a new hash would move utterances)
    assert [xd.shard_index(f"utt{i}", 8) for i in range(8)] == [4, 4, 4, 7, 5, 2, 7, 6]
    assert xd.shard(corpus, 0, 1) == corpus


@pytest.mark.parametrize("text", ["3", "1/0", "4/4", "-1/4", "a/b", "1/2/3"])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(ValueError, match="I/N|0 <= I < N|at least 1"):
        xd.parse_shard(text)


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    cli.add_distributed_args(parser)
    args = parser.parse_args(["--shard", "2/5", "--workers", "3", "--resources", "GPU=1"])
    assert args.shard == (2, 5) and args.workers == 3 and args.resources == {"GPU": 1.0}
    with pytest.raises(SystemExit):
        parser.parse_args(["--shard", "5/5"])


# -- in this process ---------------------------------------------------------------------------


def test_shards_run_in_process_fill_one_store_like_explain_corpus(corpus, single, tmp_path):
    n = 3
    store = tmp_path / "sharded"
    argv = ["explain", "--data", "demo", "--subset", "synthetic", "--limit", str(n),
            "--model", "random-tiny", "--device", "cpu", "--out", str(store), "--reference-text",
            "--method", EXPLAIN["method"], "--n-masks", str(EXPLAIN["n_masks"]),
            "--seed", str(EXPLAIN["seed"])]  # fmt: skip
    for k in range(2):  # as two machines would, each with --shard k/2
        assert cli.main([*argv, "--shard", f"{k}/2"]) == 0
    store = ResultStore(store)
    assert len(store.keys()) == n and len(store.records()) == n
    assert len((store.root / "index.csv").read_text().splitlines()) == 1 + n
    _assert_same_entries(store, single, store.keys())
    again = xd.explain_distributed(
        None, "random-tiny", corpus, store=single, device="cpu", use_reference_text=True,
        progress=False, **EXPLAIN,
    )  # fmt: skip
    assert again.skipped == tuple(u.id for u in corpus) and not again.done  # same keys


def test_a_bad_utterance_is_reported_not_fatal(tiny, corpus, single, tmp_path):
    bad = replace(corpus[1], id="bad", audio_path=tmp_path / "missing.flac")
    utts = [corpus[0], bad, corpus[2]]
    summary = xd.explain_distributed(
        None, tiny, utts, store=single, device="cpu", use_reference_text=True,
        progress=False, **EXPLAIN,
    )  # fmt: skip
    assert summary.skipped == (corpus[0].id, corpus[2].id) and not summary.done
    assert list(summary.failed) == [bad.id] and "missing.flac" in summary.failed[bad.id]
    assert f"failed {bad.id}" in str(summary)
    with pytest.raises(ValueError, match="unique"):
        xd.explain_distributed(None, "random-tiny", [corpus[0], corpus[0]], store=tmp_path)


# -- on a local cluster ------------------------------------------------------------------------


def test_two_workers_equal_one_process_and_a_killed_worker_loses_nothing(corpus, single, tmp_path):
    store = ResultStore(tmp_path)
    with xd.connect(workers=2) as client, ThreadPoolExecutor(1) as pool:
        pids = client.run(os.getpid)
        assert len(pids) == 2
        run = pool.submit(
            xd.explain_distributed, client, "random-tiny", corpus, store=store, device="cpu",
            use_reference_text=True, progress=False, **EXPLAIN,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not store.keys() and time.monotonic() < deadline and not run.done():
            time.sleep(0.02)
        before = {key: _stamp(store, key) for key in store.keys()}
        busy = [addr for addr, keys in client.processing().items() if keys]
        assert before and len(before) < len(corpus) and busy, "the kill must fall mid-run"
        os.kill(pids[busy[0]], signal.SIGKILL)  # a worker in the middle of an utterance
        summary = run.result(timeout=180)
        client.wait_for_workers(2, timeout=120)
        assert len(set(client.run(os.getpid).values()) - set(pids.values())) == 1  # restarted

    assert not summary.failed and summary.workers == 2
    # an utterance the victim stored but could not report is rerun, finds itself stored, skips
    assert sorted(summary.done + summary.skipped) == sorted(u.id for u in corpus)
    assert len(summary.skipped) <= 1
    assert store.keys() == single.keys()
    for key, stamp in before.items():
        assert _stamp(store, key) == stamp, f"{key} was rewritten after the kill"
    _assert_same_entries(store, single, store.keys())

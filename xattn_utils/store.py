"""A results store on disk: each (model, utterance, method, params) entry is written once.

Layout: ``root/<key>/tensors.safetensors`` and ``root/<key>/record.json``. An entry is built in
a hidden temp directory (``root/.tmp-<key>-<pid>-<uuid>``), its files are fsynced, and the
directory is renamed onto ``root/<key>``: an entry is complete or absent, even after a kill.
Several processes may write to one root at once: the first rename wins and later writers of
the same key keep the existing entry. Leftover temp directories are invisible; remove them
with :meth:`ResultStore.clean_partial`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
RECORD = "record.json"
_TMP = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")

Tensors = dict[str, torch.Tensor]
R = TypeVar("R", covariant=True)


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback for numpy values, paths, sets, tuples-in-dataclasses, tensors."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON: {obj!r}")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _own(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> Tensors:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = torch.as_tensor(t).detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() != t.nbytes or storage.data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _slug(text: str, width: int = 40) -> str:
    return _UNSAFE.sub("-", text).strip(".-")[:width] or "x"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultStore:
    """Write-once, content-addressed results under ``root`` (created if missing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    @staticmethod
    def key(*, model: str, utterance: str, method: str, params: Mapping[str, Any]) -> str:
        """A filesystem-safe key: readable parts plus a sha256 of the canonical JSON of all four.

        Dict order does not matter; any other difference in ``params`` (including ``1`` vs
        ``1.0``, or a list vs a different list) gives another key.
        """
        blob = _canonical(
            {"model": model, "utterance": utterance, "method": method, "params": dict(params)}
        )
        digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
        return "__".join([_slug(model), _slug(utterance), _slug(method, 24), digest])

    def path(self, key: str) -> Path:
        """The directory of entry ``key`` (which may not exist)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a store key: {key!r}; make one with ResultStore.key()")
        return self.root / key

    def has(self, key: str) -> bool:
        """Whether entry ``key`` is finished (an entry directory is only ever complete)."""
        return (self.path(key) / RECORD).is_file()

    def put(self, key: str, tensors: Mapping[str, torch.Tensor | np.ndarray], record: dict) -> Path:
        """Write entry ``key`` atomically and return its directory; an existing entry is kept.

        ``record`` must be JSON-able (token strings, transcript, timings, ...).
        """
        final = self.path(key)
        if self.has(key):
            return final
        blob = json.dumps(
            {"key": key, "created": time.time(), "record": record}, default=_jsonable, indent=1
        )
        tensors = _own(tensors)
        tmp = self.root / f"{_TMP}{key}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / TENSORS))
            _fsync(tmp / TENSORS)
            with open(tmp / RECORD, "w", encoding="utf-8") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            _fsync(tmp)
            try:
                os.rename(tmp, final)
            except OSError as err:  # another writer finished first
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not self.has(key):
                    raise
            else:
                _fsync(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def get(self, key: str) -> tuple[Tensors, dict]:
        """Tensors and record of entry ``key``; ``KeyError`` if it is not finished."""
        if not self.has(key):
            raise KeyError(f"no entry {key!r} in {self.root}")
        entry = self.path(key)
        meta = json.loads((entry / RECORD).read_text(encoding="utf-8"))
        return load_file(str(entry / TENSORS)), meta["record"]

    def get_or_compute(
        self, key: str, compute: Callable[[], tuple[Mapping[str, torch.Tensor], dict]]
    ) -> tuple[Tensors, dict]:
        """Load entry ``key``, or run ``compute() -> (tensors, record)``, store it and load it.

        What is returned is what the store holds (the first writer's, under a race).
        """
        if not self.has(key):
            tensors, record = compute()
            self.put(key, tensors, record)
        return self.get(key)

    def keys(self) -> list[str]:
        """Keys of finished entries, sorted."""
        return sorted(
            p.name for p in self.root.iterdir() if _KEY.fullmatch(p.name) and self.has(p.name)
        )

    def records(self) -> pd.DataFrame:
        """One row per finished entry: ``key``, ``created`` and the record's scalar fields.

        Nested dicts are flattened to dotted columns (``params.n_masks``); lists and other
        containers are left out (read them with :meth:`get`).
        """
        rows = []
        for key in self.keys():
            meta = json.loads((self.path(key) / RECORD).read_text(encoding="utf-8"))
            flat = pd.json_normalize(meta["record"]).iloc[0].to_dict() if meta["record"] else {}
            scalars = {k: v for k, v in flat.items() if v is None or np.isscalar(v)}
            rows.append({"key": key, "created": meta["created"], **scalars})
        return pd.DataFrame(rows, columns=None if rows else ["key", "created"])

    def write_index(self, name: str = "index.csv") -> Path:
        """:meth:`records` as CSV in the store's folder, replaced atomically (shards may race)."""
        path = self.root / name
        tmp = path.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self.records().to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path

    def partial(self) -> list[Path]:
        """Temp directories left by writers that were killed (or are still writing)."""
        return sorted(p for p in self.root.iterdir() if p.name.startswith(_TMP))

    def clean_partial(self, *, min_age_s: float = 300.0) -> int:
        """Remove temp directories untouched for ``min_age_s`` seconds; return how many.

        The age guard spares writers still at work; use 0 only when no other process writes.
        """
        now, removed = time.time(), 0
        for tmp in self.partial():
            try:
                if now - tmp.stat().st_mtime >= min_age_s:
                    shutil.rmtree(tmp)
                    removed += 1
            except FileNotFoundError:  # its writer finished or cleaned it meanwhile
                pass
        return removed


class Storable(Protocol[R]):
    """A result class the store can hold: ``result.to_tensors() -> (tensors, record)`` and
    ``Kind.from_tensors(tensors, record) -> result``."""

    def from_tensors(self, tensors: Tensors, record: dict) -> R: ...


def cached(store: ResultStore | None, key: str, compute: Callable[[], R], kind: Storable[R]) -> R:
    """The result under ``key`` in ``store``: read back (``kind.from_tensors``) when it is there,
    else ``compute()``, saved at once (so a killed corpus run keeps it) and returned. Without a
    store, just ``compute()``. Every corpus function reuses and fills the store this way."""
    if store is None:
        return compute()
    fresh: list[R] = []

    def run() -> tuple[Mapping[str, torch.Tensor], dict]:
        fresh.append(compute())
        return fresh[0].to_tensors()  # type: ignore[attr-defined]

    tensors, record = store.get_or_compute(key, run)
    return fresh[0] if fresh else kind.from_tensors(tensors, record)

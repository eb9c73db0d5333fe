"""Explain corpora too large for one machine: shards keyed by utterance, and a Dask cluster.

- **Shards.** :func:`shard` puts every utterance in one of ``count`` shards by a stable hash of
  its id, so machines that never talk to each other (``xattn explain --shard I/N``) agree.
- **An engine.** :func:`explain_distributed` sends one task per utterance to the workers of a
  Dask cluster (:func:`connect`: local worker processes, or a real cluster by its scheduler
  address). Each worker process holds one model on its own device (its own GPU when there are
  several), skips utterances already in the store and stores each result as soon as it is done.
  The tasks of a worker that dies are rerun elsewhere (its nanny restarts it); an utterance that
  still fails is reported by id at the end and does not stop the run.

The two combine, and all writers go through :class:`~xattn_utils.store.ResultStore` (entries
written once, atomically), so shards, workers and reruns share one store without clashing and
the notebooks read whatever it holds. On a real cluster every worker needs xattn installed and
the audio and the store at the same paths (a shared filesystem). Results equal
:func:`~xattn_utils.maps.corpus.explain_corpus` in one process: same keys, same maps bit for bit
(tested on CPU, 1-thread workers against a 2-thread process; on CUDA the mask batch size follows
free memory, so fix ``options=PerturbationOptions(batch_size=...)`` for bit-identical runs).

Why Dask distributed and not Ray: the work is coarse (seconds to minutes per utterance) and
results go to a shared store, not through an object store, so Ray's strengths (actors,
millisecond tasks, shared-memory objects) buy nothing here; Dask is pure Python (no compiled
runtime or object-store memory reservation on a 2-core machine), starts a local cluster in
seconds, reruns the tasks of lost workers by itself, and runs where researchers' clusters are:
``dask scheduler``/``dask worker``, dask-jobqueue (SLURM, PBS, SGE), dask-kubernetes, dask-cuda.
The per-worker model is a process-local cache (not an actor); GPU placement is one worker per
GPU, with ``resources={"GPU": 1}`` where CPU and GPU workers mix.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..model.loading import LoadedModel, load_model, resolve_device
from ..store import ResultStore
from .corpus import corpus_key, explain_corpus
from .saliency import Options, method_options

# -- shards ----------------------------------------------------------------------------------


def shard_index(utterance_id: str, count: int) -> int:
    """The shard (``0 <= shard < count``) of an utterance: a stable hash of its id, the same
    on every machine, Python version and run (unlike ``hash()``)."""
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    digest = hashlib.sha256(utterance_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard(utterances: Sequence, index: int, count: int) -> list:
    """The utterances of shard ``index`` of ``count`` (``0 <= index < count``), in corpus order.

    The ``count`` shards partition the corpus; which shard an utterance is in depends only on its
    id, not on the rest of the corpus.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1}, got {index}")
    return [u for u in utterances if shard_index(u.id, count) == index]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, with ``0 <= I < N`` (``"0/4"`` .. ``"3/4"``)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r}: need 0 <= I < N (shards are numbered from 0)")
    return index, count


# -- one utterance, on whichever process runs it -----------------------------------------------


@dataclass(frozen=True)
class ExplainJob:
    """Everything a task needs besides its utterance (small: it travels with every task).

    ``method``, ``options`` and ``seed`` are those of :func:`~xattn_utils.maps.saliency.explain`.
    ``threads`` is the number of torch threads per worker, or ``None``: the cores of the
    worker's machine shared among the ``workers_per_host`` workers there.
    """

    model: str
    store: str
    device: str = "auto"
    task: str = "transcribe"
    language: str | None = None
    use_reference_text: bool = False
    method: str = "spes"
    options: Options | None = None
    seed: int = 0
    threads: int | None = None
    workers_per_host: dict[str, int] = field(default_factory=dict)

    def settings(self) -> dict:
        """The keyword arguments of :func:`~xattn_utils.maps.corpus.explain_corpus` for this job."""
        return {"task": self.task, "language": self.language, "method": self.method,
                "use_reference_text": self.use_reference_text, "options": self.options,
                "seed": self.seed}  # fmt: skip


def explain_one(loaded: LoadedModel, utterance, job: ExplainJob) -> tuple[str, str]:
    """Explain one utterance into the job's store unless it is there already.

    Returns ``(status, key)`` with status ``"done"`` (computed now) or ``"skipped"``.
    """
    store = ResultStore(job.store)
    key = corpus_key(loaded, utterance, **job.settings())
    if store.has(key):
        return "skipped", key
    explain_corpus(loaded, [utterance], store=store, progress=False, **job.settings())
    return "done", key


_MODELS: dict[tuple[str, str], LoadedModel] = {}  # one model per process, kept between tasks
_MODELS_LOCK = threading.Lock()


def cached_model(name: str, device: str) -> LoadedModel:
    """The process's model (loaded on first use; another name or device replaces it, so a
    long-lived worker holds one model at a time)."""
    with _MODELS_LOCK:
        if (name, device) not in _MODELS:
            _MODELS.clear()
            _MODELS[name, device] = load_model(name, device)
        return _MODELS[name, device]


def worker_device(device: str, worker_name: object) -> str:
    """The device of one worker: ``"auto"`` is CUDA when present, else CPU; on a machine with
    several GPUs, local-cluster workers (named 0, 1, ...) take one GPU each."""
    device = str(resolve_device(device))
    if device == "cuda" and isinstance(worker_name, int) and torch.cuda.device_count() > 1:
        device = f"cuda:{worker_name % torch.cuda.device_count()}"
    return device


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _explain_task(utterance, job: ExplainJob) -> tuple[str, str]:
    """Body of one Dask task (runs in a worker process)."""
    from distributed import get_worker
    from distributed.comm import get_address_host

    worker = get_worker()
    threads = job.threads
    if threads is None:
        sharing = job.workers_per_host.get(get_address_host(worker.address), 1)
        threads = max(1, available_cores() // sharing)
    torch.set_num_threads(threads)  # per calling thread under OpenMP: set where the work runs
    loaded = cached_model(job.model, worker_device(job.device, worker.name))
    return explain_one(loaded, utterance, job)


def preload(client, model: str, device: str = "auto") -> None:
    """Load ``model`` on every worker of ``client`` now: raises at once for a bad name, and
    keeps the load out of timings. One worker per machine goes first, so that a bundled model is
    converted once there rather than by every worker at the same time; workers that join later
    load the model on their first task."""
    from distributed.comm import get_address_host

    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    first = {get_address_host(address): address for address in reversed(workers)}
    client.run(_preload, model, device, workers=sorted(first.values()))
    client.run(_preload, model, device, workers=workers)


def _preload(model: str, device: str, dask_worker=None) -> None:
    name = dask_worker.name if dask_worker is not None else None
    cached_model(model, worker_device(device, name))


# -- a run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What one :func:`explain_distributed` call did, by utterance id."""

    model: str
    store: Path
    done: tuple[str, ...]  # explained by this run
    skipped: tuple[str, ...]  # already in the store
    failed: dict[str, str]  # utterance id -> error, after the engine's retries
    keys: dict[str, str]  # utterance id -> store key (done and skipped)
    seconds: float
    workers: int  # 0: in this process

    @property
    def per_minute(self) -> float:
        """Utterances explained per minute of wall time (skipped ones not counted)."""
        return 60 * len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        where = f"{self.workers} workers" if self.workers else "this process"
        lines = [
            f"{self.model}: {len(self.done)} explained, {len(self.skipped)} already in the "
            f"store, {len(self.failed)} failed; {self.seconds:.1f} s on {where} "
            f"({self.per_minute:.1f} utterances/min); results in {self.store}"
        ]
        lines += [f"  failed {uid}: {error}" for uid, error in self.failed.items()]
        return "\n".join(lines)


def explain_distributed(
    client,
    model: str | LoadedModel,
    utterances: Sequence,
    *,
    store: str | Path | ResultStore,
    device: str = "auto",
    threads: int | None = None,
    retries: int = 1,
    resources: dict[str, float] | None = None,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
    method: str = "spes",
    options: Options | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides,
) -> RunSummary:
    """Explain ``utterances`` (``xattn_utils.data.Utterance``) with ``model`` into ``store``,
    one task per utterance on the workers of ``client`` (a ``distributed.Client``, see
    :func:`connect`), or in this process when ``client`` is None. ``model`` is a name for
    :func:`~xattn_utils.model.loading.load_model`, or a loaded model to use in this process (workers
    load its name).

    The model is loaded on every worker first (:func:`preload`). Utterances already in the
    store are skipped; each result is stored as soon as it is done, by the worker.
    A task that raises is retried ``retries`` times, a task whose worker dies is rerun elsewhere
    (up to Dask's ``distributed.scheduler.allowed-failures``); what still fails is in
    ``RunSummary.failed``. ``resources`` are Dask resources each task needs (e.g. ``{"GPU": 1}``
    with workers started ``--resources GPU=1``). ``task``, ``language``, ``use_reference_text``,
    ``method``, ``options``, ``seed`` and ``overrides`` (``n_masks=...``) are as for
    :func:`~xattn_utils.maps.corpus.explain_corpus`, and give the same store entries.
    """
    ids = [u.id for u in utterances]
    if len(set(ids)) != len(ids):
        twice = sorted(uid for uid, n in Counter(ids).items() if n > 1)
        raise ValueError(f"utterance ids must be unique; repeated: {twice[:5]}")
    root = store.root if isinstance(store, ResultStore) else Path(store)
    ResultStore(root)  # create it here, not in a race between workers
    name = model.name if isinstance(model, LoadedModel) else model
    job = ExplainJob(
        model=name,
        store=str(root.resolve()),
        device=device,
        task=task,
        language=language,
        use_reference_text=use_reference_text,
        method=method,
        options=method_options(method, options, **overrides),
        seed=seed,
        threads=threads,
    )
    start = time.perf_counter()
    if client is None:
        loaded = model if isinstance(model, LoadedModel) else None
        outcomes, failed = _run_here(utterances, job, loaded, progress=progress)
        n_workers = 0
    else:
        outcomes, failed, n_workers = _run_on(
            client, utterances, job, retries=retries, resources=resources, progress=progress
        )
    seconds = time.perf_counter() - start
    done = tuple(uid for uid in ids if outcomes.get(uid, ("",))[0] == "done")
    skipped = tuple(uid for uid in ids if outcomes.get(uid, ("",))[0] == "skipped")
    return RunSummary(
        model=name,
        store=root,
        done=done,
        skipped=skipped,
        failed={uid: failed[uid] for uid in ids if uid in failed},
        keys={uid: outcomes[uid][1] for uid in ids if uid in outcomes},
        seconds=seconds,
        workers=n_workers,
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)


def _run_here(utterances: Sequence, job: ExplainJob, loaded: LoadedModel | None, *, progress):
    loaded = loaded or cached_model(job.model, str(resolve_device(job.device)))
    outcomes, failed = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads or threads)
    try:
        with _progress(len(utterances), f"explain {job.model}", progress) as bar:
            for utt in utterances:
                try:
                    outcomes[utt.id] = explain_one(loaded, utt, job)
                except Exception as err:  # one bad utterance must not stop a corpus run
                    failed[utt.id] = f"{type(err).__name__}: {err}"
                bar.update()
    finally:
        torch.set_num_threads(threads)
    return outcomes, failed


def _run_on(client, utterances, job: ExplainJob, *, retries, resources, progress):
    from distributed import as_completed
    from distributed.comm import get_address_host

    preload(client, job.model, job.device)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    per_host = Counter(get_address_host(address) for address in workers)
    job = replace(job, workers_per_host=dict(per_host))
    run = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            _explain_task,
            utt,
            job,
            key=f"xattn-explain-{run}-{utt.id}",
            retries=retries,
            resources=resources,
            pure=False,
        ): utt.id
        for utt in utterances
    }
    outcomes, failed = {}, {}
    desc = f"explain {job.model} on {len(workers)} workers"
    with _progress(len(futures), desc, progress) as bar:
        for future in as_completed(futures):
            uid = futures[future]
            if future.status == "finished":
                outcomes[uid] = future.result()
            else:
                err = future.exception()
                failed[uid] = f"{type(err).__name__}: {err}"
            future.release()
            bar.update()
    return outcomes, failed, len(workers)


# -- clusters ----------------------------------------------------------------------------------


@contextmanager
def connect(
    *, workers: int | None = None, scheduler: str | None = None, silence_logs: int = 40
) -> Iterator:
    """A ``distributed.Client``: to the cluster whose scheduler is at ``scheduler``
    (``tcp://host:8786``), or to a local cluster of ``workers`` processes on this machine
    (default: one per GPU, else one), closed on exit.

    Local workers run one task at a time, are restarted by their nanny if they die, and each
    declares one ``GPU`` resource when CUDA is present.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    gpus = torch.cuda.device_count()
    n = workers or gpus or 1
    with (
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"GPU": 1} if gpus else None,
            silence_logs=silence_logs,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client

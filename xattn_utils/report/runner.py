"""``xattn report``: explain the selection once into the shared
:class:`~xattn_utils.store.ResultStore`, execute every notebook with papermill, render HTML with
nbconvert, and write ``index.html`` (:mod:`xattn_utils.report.index`).

The console shows one line per step (``[3/10] 02_layer_aggregated.tiny.en ... 41 s``), a table
of the steps' times at the end, and where the index is. The notebooks' kernels run without
the messages that repeat once per kernel and say nothing about the analysis (the kernel's TCP
notice, library deprecations, weight-loading bars), filtered at the source: see
:data:`KERNEL_ENV` and :data:`KERNEL_ARGS`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from .study import (
    DEFAULT_N_MASKS,
    DEFAULT_N_UTTERANCES,
    Study,
    explain_selection,
    study_tasks,
)

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
# notebook stem -> which models it runs for: "first", "each" (one run per model) or "all"
NOTEBOOKS = {
    "00_quickstart": "first",
    "01_head_level": "each",
    "02_layer_aggregated": "each",
    "03_encoder_vs_input": "all",
    "04_timestamps": "each",
    "05_faithfulness": "each",
    "06_convergence": "each",
    "07_context_mixing": "all",
    "90_explorer": "first",
}
# Environment of the notebooks' kernels: no progress bars from loading weights, and the
# library deprecation warnings that pytest also ignores (pyproject) left out of the pages.
KERNEL_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
# The kernel application logs only errors: at WARNING it prints "Kernel is running over TCP
# without encryption" once per notebook on the console (the kernel only listens on localhost).
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]


class NotebookError(RuntimeError):
    """A notebook cell raised while the report ran."""


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by kernels started inside) and restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars while weights load (hub downloads, transformers' "Loading weights")."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with environment({"HF_HUB_DISABLE_PROGRESS_BARS": "1"}):
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def kernel_name() -> str:
    """A Jupyter kernel that runs this interpreter: ``python3`` if it does, else ``xattn``
    (installed into ``sys.prefix`` with ``python -m ipykernel install --sys-prefix``)."""
    import subprocess

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ours = {"python", "python3", f"python3.{sys.version_info[1]}", os.path.abspath(sys.executable)}
    for name in ("python3", "xattn"):
        try:
            argv0 = KernelSpecManager().get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            continue
        if argv0 in ours or os.path.abspath(argv0) == os.path.abspath(sys.executable):
            return name
    cmd = [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "xattn"]
    subprocess.run(cmd, check=True, capture_output=True)
    return "xattn"


def run_notebook(
    stem: str,
    parameters: dict,
    output: str | Path,
    *,
    kernel: str | None = None,
    cwd=None,
    timeout: float | None = None,
) -> Path:
    """Execute ``notebooks/<stem>.ipynb`` with the ``parameters`` it declares into ``output``
    (``timeout``: seconds a cell may run, None: no limit).

    Raises :class:`NotebookError` naming the notebook and the failing cell.
    """
    import papermill as pm

    source = NOTEBOOK_DIR / f"{stem}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source}")
    declared = pm.inspect_notebook(str(source))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with environment(KERNEL_ENV):
            pm.execute_notebook(
                str(source),
                str(output),
                parameters={k: v for k, v in parameters.items() if k in declared},
                kernel_name=kernel or kernel_name(),
                cwd=str(cwd or NOTEBOOK_DIR.parent),
                progress_bar=False,
                extra_arguments=KERNEL_ARGS,
                execution_timeout=timeout,
            )
    except pm.PapermillExecutionError as err:
        raise NotebookError(
            f"notebook {stem} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
            f"(executed copy: {output})"
        ) from err
    return output


def render_html(notebook: str | Path, html_path: str | Path, *, code: bool = False) -> Path:
    """Render an executed notebook to HTML; without ``code`` only markdown and outputs, with a
    link back to the report's index at the top and the bottom."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        exclude_input=not code, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html_path = Path(html_path)
    index = "../index.html" if html_path.parent.name == "code" else "index.html"
    back = f'<p style="margin:1em 2em"><a href="{index}">&larr; the report\'s index</a></p>'
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + back, body, count=1)
    body = body.replace("</body>", back + "</body>", 1)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def precompute(
    models: Sequence[str],
    study: Study,
    *,
    device: str = "auto",
    client=None,
    shard: tuple[int, int] | None = None,
) -> list:
    """Explain every (model, task, utterance) of ``study`` once into its store, here or on
    the Dask ``client``'s workers; with ``shard = (i, n)`` only that shard of the utterances.
    Returns the engine's :class:`~xattn_utils.maps.distributed.RunSummary` of each (model, task):
    what was explained, what the store already held, what failed. The notebooks then find
    every result under the same keys (:func:`~xattn_utils.report.study.explain_selection`)."""
    from ..maps.distributed import explain_distributed
    from ..maps.distributed import shard as shard_of
    from ..model.loading import load_model

    if study.store is None:
        raise ValueError("the report's study needs a store (Study(store=...))")
    summaries = []
    for name in models:
        loaded = load_model(name, device if client is None else "cpu")
        for task in study_tasks(loaded):
            utterances = study.utterances(task)
            if shard is not None:
                utterances = shard_of(utterances, *shard)
            summaries.append(explain_distributed(
                client, loaded if client is None else name, utterances, store=study.store,
                device=device, progress=False, **study.settings(task),
            ))  # fmt: skip
    return summaries


def collect_explanations(
    models: Sequence[str], study: Study, *, device: str = "auto"
) -> tuple[list, list]:
    """The explanations :func:`precompute` stored (read back, nothing computed that is stored)
    and their utterances, for the index."""
    from ..model.loading import load_model

    explanations, utterances = [], []
    for name in models:
        loaded = load_model(name, device)
        for task in study_tasks(loaded):
            selection = explain_selection(loaded, replace(study, progress=False), task=task)
            explanations += selection.explanations
            utterances += selection.utterances
    return explanations, utterances


@dataclass
class Steps:
    """The report's steps: prints ``[i/n] name ... s`` as each ends and keeps their times."""

    total: int
    rows: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    @contextmanager
    def step(self, name: str, kind: str) -> Iterator[dict]:
        """Time one step; the yielded dict takes extra columns (e.g. ``html_s``)."""
        print(f"[{len(self.rows) + 1}/{self.total}] {name} ...", flush=True)
        row = {"step": name, "kind": kind}
        start = time.perf_counter()
        yield row
        self.record(row | {"seconds": time.perf_counter() - start})

    def record(self, row: dict) -> None:
        """Keep a finished step (``step, kind, seconds`` and extra columns) and print it."""
        self.rows.append(row)
        extra = f" (html {row['html_s']:.0f} s)" if "html_s" in row else ""
        print(f"[{len(self.rows)}/{self.total}] {row['step']} ... {row['seconds']:.0f} s{extra}",
              flush=True)  # fmt: skip

    def table(self) -> pd.DataFrame:
        """``step, kind, seconds, html_s`` (the rendering inside a notebook step), and a
        ``total`` row: the wall time since the start (less than the sum when steps overlap)."""
        df = pd.DataFrame(self.rows, columns=["step", "kind", "seconds", "html_s"])
        total = {"step": "total (wall)", "kind": "", "seconds": time.perf_counter() - self.start}
        return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


STUDY_PARAMETERS = frozenset({"model", "models", "data", "n_utterances", "method", "n_masks",
                              "seed", "device", "use_reference_text", "store", "out",
                              "progress", "interactive"})  # fmt: skip


def check_parameters(stems: Sequence[str], parameters: Mapping[str, object]) -> dict:
    """``parameters`` if each is declared by one of the notebooks ``stems`` and is not one the
    report sets itself (model, data, masks, ...: those have their own arguments)."""
    import papermill as pm

    reserved = sorted(STUDY_PARAMETERS & set(parameters))
    if reserved:
        raise ValueError(f"{reserved}: set by the report's own arguments, not as parameters")
    declared = {k for stem in stems for k in pm.inspect_notebook(NOTEBOOK_DIR / f"{stem}.ipynb")
                if k not in STUDY_PARAMETERS}  # fmt: skip
    if unknown := sorted(set(parameters) - declared):
        raise ValueError(f"no notebook of the report declares {unknown}; those: {sorted(declared)}")
    return dict(parameters)


def notebook_step(stem: str, model: str | None, params: dict, out: Path, kernel: str) -> dict:
    """Run one notebook for ``model`` (None: for all of ``params["models"]``) and render its
    pages; returns its row of the time table."""
    name = stem if model is None else f"{stem}.{model}"
    start = time.perf_counter()
    executed = out / "notebooks" / f"{name}.ipynb"
    run_notebook(stem, params | {"model": model or params["models"][0]}, executed, kernel=kernel)
    rendered = time.perf_counter()
    render_html(executed, out / f"{name}.html")
    render_html(executed, out / "code" / f"{name}.html", code=True)
    end = time.perf_counter()
    return {"step": name, "kind": "notebook", "seconds": end - start, "html_s": end - rendered}


def build_report(
    models: Sequence[str],
    data: str,
    out: str | Path,
    *,
    n_utterances: int = DEFAULT_N_UTTERANCES,
    n_masks: int = DEFAULT_N_MASKS,
    seed: int = 0,
    device: str = "auto",
    method: str = "spes",
    use_reference_text: bool = False,
    store: str | Path = "out/store",
    notebooks: Sequence[str] | None = None,
    client=None,
    shard: tuple[int, int] | None = None,
    jobs: int = 1,
    parameters: Mapping[str, object] | None = None,
) -> Path | None:
    """Explain, run every notebook (``jobs`` at a time, each kernel then on one thread unless
    ``OMP_NUM_THREADS`` says otherwise), render HTML (``<stem>[.<model>].html``, with code under
    ``code/``) and write ``out/index.html``; headline CSVs, the headline figure and the steps'
    times (``timings.csv``) go to ``out/metrics/``.

    The explain step runs on the Dask ``client`` when given; with ``shard`` only that shard is
    explained and no notebook runs (returns None): run once more without it when every shard
    is done. ``parameters``: notebook parameters other than the study's (e.g. faithfulness's
    ``max_tokens``), given to every notebook that declares them; the index lists them."""
    from ..hf_datasets import absolute_source
    from ..store import ResultStore
    from .index import write_index

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive number of notebooks at a time, got {jobs!r}")
    stems = list(notebooks or NOTEBOOKS)
    parameters = check_parameters(stems, parameters or {})
    out = Path(out).resolve()
    store_path = Path(store).resolve()
    data = absolute_source(data)  # notebooks run in the repository root
    study = Study(data=data, n_utterances=n_utterances, method=method, n_masks=n_masks,
                  seed=seed, use_reference_text=use_reference_text, store=str(store_path),
                  progress=False)  # fmt: skip
    runs = [
        (stem, model)
        for stem in stems
        for model in {"first": models[:1], "each": models, "all": [None]}[NOTEBOOKS[stem]]
    ]
    steps = Steps(total=1 if shard is not None else len(runs) + 2)  # fmt: skip
    before = set(ResultStore(store_path).keys())
    with steps.step(f"explain {','.join(models)} ({n_masks} masks per map)", "explain"):
        with quiet_loading():
            summaries = precompute(models, study, device=device, client=client, shard=shard)
    failed = {f"{s.model}/{uid}": err for s in summaries for uid, err in s.failed.items()}
    if failed:
        raise NotebookError(f"explaining failed for {sorted(failed)}: {failed}")
    done, skipped = sum(len(s.done) for s in summaries), sum(len(s.skipped) for s in summaries)
    print(f"      {done} utterances explained, {skipped} already in the store {store_path}",
          flush=True)  # fmt: skip
    if shard is not None:
        return None
    common = {
        "data": data,
        "n_utterances": n_utterances,
        "method": method,
        "n_masks": n_masks,
        "seed": seed,
        "device": device,
        "use_reference_text": use_reference_text,
        "store": str(store_path),
        "out": str(out / "metrics"),
        "models": list(models),
        "progress": False,  # the store already holds every result: no bars in the HTML
        "interactive": False,  # static figures only: shared HTML reports hold no live widgets
    } | parameters
    for stale in (out / "metrics").glob("*_headline.csv"):  # from an earlier run
        stale.unlink()
    kernel = kernel_name()
    if jobs == 1:
        for stem, model in runs:
            name = stem if model is None else f"{stem}.{model}"
            print(f"[{len(steps.rows) + 1}/{steps.total}] {name} ...", flush=True)
            steps.record(notebook_step(stem, model, common, out, kernel))
    else:  # kernels share the cores: one thread each unless the caller chose
        threads = {k: os.environ.get(k, "1") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        with environment(KERNEL_ENV | threads), ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(notebook_step, stem, model, common, out, kernel)
                       for stem, model in runs]  # fmt: skip
            try:
                for future in as_completed(futures):
                    steps.record(future.result())
            except BaseException:  # a failing notebook stops the report: start no other
                for future in futures:
                    future.cancel()
                raise
    pages = [stem if model is None else f"{stem}.{model}" for stem, model in runs]
    settings = {k: v for k, v in common.items() if k not in ("out", "progress")}
    with steps.step("index (findings, headline figure)", "index"):
        with quiet_loading():
            explanations, utterances = collect_explanations(models, study, device=device)
        index = write_index(
            out, pages, settings, steps=steps.table(), explanations=explanations,
            utterances=utterances, seed=seed,
        )  # fmt: skip
    timings = steps.table()
    timings.to_csv(out / "metrics" / "timings.csv", index=False)
    print(timings.to_string(index=False, float_format=lambda v: f"{v:.0f}", na_rep=""))
    new = set(ResultStore(store_path).keys()) - before
    print(f"store {store_path}: {len(new)} new results" if new else
          f"store {store_path}: nothing recomputed, every result was already there")  # fmt: skip
    return index

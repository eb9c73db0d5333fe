"""The study's tables and reports: utterance selection, correlation and headline tables, CSVs,
and the notebook runner behind ``xattn report``.

Two halves:

- helpers the notebooks call (:func:`select_utterances`, :func:`correlation_table`,
  :func:`cumulative_table`, :func:`headline`, :func:`gap_table`, :func:`save_metrics`,
  :func:`spectrogram`), so that the notebooks stay free of ``def``;
- :func:`build_report`: explain the selection once into the shared
  :class:`~xattn_utils.store.ResultStore`, execute every notebook with papermill, render HTML
  with nbconvert and write ``index.html`` with the headline tables.

Headline numbers (special tokens excluded, 95% percentile bootstrap CIs over utterances): the
mean CA-vs-SM_X and CA-vs-SM_H correlation of the best single head, the best layer (mean of
its heads) and the mean of all heads. "Best" is picked on the same utterances it is reported
on, so those two rows are optimistic; the all-head mean is not selected.
"""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .audio import n_mel_frames
from .compare import (
    bootstrap_ci,
    compare_maps,
    corpus_table,
    corrected_summary,
    cumulative_layers,
    disattenuated_ci,
    pool_to_enc,
    reliability,
    utterance_score,
)

DEFAULT_N_UTTERANCES = 8  # 4 synthetic + 4 real English utterances
DEFAULT_N_MASKS = 128  # with 8 utterances: 7.5 min for tiny.en on 2 idle CPU cores
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
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
COMPARISONS = ("CA vs SM_X", "CA vs SM_H", "SM_X vs SM_H")
GAP = "gap (SM_H - SM_X)"
AGGREGATES = (("best head", "head"), ("best layer", "layer"), ("all heads", "all"))


class NotebookError(RuntimeError):
    """A notebook cell raised while the report ran."""


# -- helpers for the notebooks ------------------------------------------------------------------


def select_utterances(
    corpus: Sequence, n: int, *, task: str = "transcribe", language: str | None = None
) -> list:
    """A balanced, deterministic selection of ``n`` utterances.

    Transcription takes ``language`` (default English) utterances; translation takes the
    non-English ones (or ``language``). Utterances are taken in turn from each (subset, language)
    group in corpus order, so synthetic and real speech alternate, and a larger ``n`` extends a
    smaller one (results already in the store are reused). ``n = 0`` takes them all.
    """
    if task == "translate":
        pool = [u for u in corpus if u.language != "en" and language in (None, u.language)]
    else:
        pool = [u for u in corpus if (u.language or "en") == (language or "en")]
    n = len(pool) if n <= 0 else n  # 0 = all of them
    groups: dict[tuple, list] = {}
    for utt in pool:
        groups.setdefault((utt.subset, utt.language), []).append(utt)
    picked, queues = [], [list(g) for g in groups.values()]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def study_tasks(loaded, task: str = "transcribe") -> list[str]:
    """Tasks notebook 03 runs: ``task``, plus translation for a multilingual model."""
    return list(dict.fromkeys([task, "translate"])) if loaded.multilingual else [task]


def _labels(explanation, utterances: Sequence) -> dict:
    utt = {u.id: u for u in utterances}.get(explanation.utterance)
    return {
        "model": explanation.model,
        "task": explanation.params.get("task", "transcribe"),
        "language": explanation.transcript.language,
        "subset": getattr(utt, "subset", None) or "unknown",
    }


def correlation_table(explanations: Sequence, utterances: Sequence = ()) -> pd.DataFrame:
    """Per-utterance correlations of every CA view with SM_X and SM_H, and of SM_X with SM_H.

    Rows are :func:`~xattn_utils.compare.compare_maps` rows (special tokens excluded) plus
    ``model, task, language, subset`` (from ``utterances``) and ``comparison`` ("CA vs SM_X",
    "CA vs SM_H", or "SM_X vs SM_H" with ``kind == "saliency"``: pooled SM_X against SM_H).
    """
    frames = []
    for e in explanations:
        labels = _labels(e, utterances)
        for sm in (e.input_saliency, e.encoder_saliency):
            df = compare_maps(
                e.cross_attention,
                sm,
                special=e.special,
                alignment_heads=e.alignment_heads,
                utterance=e.utterance,
            )
            frames.append(df.assign(comparison="CA vs " + df["map_name"], **labels))
        sm_x, sm_h = pool_to_enc(e.input_saliency), e.encoder_saliency
        n = min(sm_x.shape[-1], sm_h.shape[-1])
        keep = [not s for s in e.special]
        score = utterance_score(sm_x[:, :n], sm_h[:, :n], keep=keep)
        row = {"utterance": e.utterance, "map_name": "SM_H", "view": "SM_X", "kind": "saliency"}
        row |= {"method": score.method, "r": score.mean, "n_tokens": score.n_tokens}
        row |= {"n_nan": score.n_nan, "comparison": "SM_X vs SM_H", **labels}
        frames.append(pd.DataFrame([row]))
    if not frames:
        return pd.DataFrame(columns=["utterance", "comparison", "view", "kind", "r"])
    return pd.concat(frames, ignore_index=True)


def cumulative_table(explanations: Sequence, utterances: Sequence = ()) -> pd.DataFrame:
    """:func:`~xattn_utils.compare.cumulative_layers` of every utterance against SM_X and SM_H."""
    frames = [
        cumulative_layers(e.cross_attention, sm, special=e.special, utterance=e.utterance).assign(
            **_labels(e, utterances)
        )
        for e in explanations
        for sm in (e.input_saliency, e.encoder_saliency)
    ]
    return pd.concat(frames, ignore_index=True)


def headline(
    table: pd.DataFrame,
    reliabilities: pd.DataFrame | None = None,
    *,
    by: Sequence[str] = ("model",),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Best single head, best layer and all-head mean of CA vs SM_X and CA vs SM_H per ``by``.

    ``table`` is a :func:`correlation_table`. Columns: ``by``, ``comparison``, ``aggregate``,
    ``view``, ``mean``, ``low``, ``high`` (95% bootstrap CI over utterances), ``n``; with
    ``reliabilities`` (a :func:`reliability_table`) also the map's mean ``reliability`` and
    ``r_corrected`` with its CI (:func:`~xattn_utils.compare.disattenuated_ci`).
    """
    rows = []
    ca = table[table["kind"].isin(["head", "layer", "all"])]
    for key, group in ca.groupby([*by, "comparison"], sort=False):
        summary = corpus_table(group, n_boot=n_boot, seed=seed)
        for aggregate, kind in AGGREGATES:
            cands = summary[summary["kind"] == kind].dropna(subset=["mean"])
            if cands.empty:
                continue
            best = cands.loc[cands["mean"].idxmax()]
            row = dict(zip([*by, "comparison"], key, strict=True))
            row |= {"aggregate": aggregate, "view": best["view"]}
            row |= {c: best[c] for c in ("mean", "low", "high", "n")}
            if reliabilities is not None and not reliabilities.empty:
                row |= _corrected(group[group["view"] == best["view"]], reliabilities, by,
                                  n_boot=n_boot, seed=seed)  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def _corrected(rows: pd.DataFrame, reliabilities: pd.DataFrame, by: Sequence[str], **kw) -> dict:
    """Mean reliability of the map of ``rows`` and r corrected for it, matched by utterance."""
    r = rows.groupby([*by, "map_name", "utterance"])["r"].mean().rename("r")
    rel = reliabilities.groupby([*by, "map_name", "utterance"])["full"].mean()
    both = pd.concat([r, rel], axis=1, join="inner")
    est = disattenuated_ci(both["r"], both["full"], **kw)
    return {"reliability": float(both["full"].mean()), "r_corrected": est.mean,
            "r_corrected_low": est.low, "r_corrected_high": est.high}  # fmt: skip


def aggregation_gain(
    table: pd.DataFrame, *, by: Sequence[str] = ("model",), n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Does aggregation beat single heads? Per utterance, r of the all-head mean minus the mean
    r of the single heads, and minus r of the best head (picked on the whole table), with
    bootstrap CIs over utterances. Same columns as :func:`headline`."""
    rows = []
    ca = table[table["kind"].isin(["head", "all"])]
    for key, group in ca.groupby([*by, "comparison"], sort=False):
        wide = group.pivot_table(index="utterance", columns="view", values="r", aggfunc="mean")
        head_views = group.loc[group["kind"] == "head", "view"].unique()
        best = wide[head_views].mean().idxmax()
        gains = {
            "all heads - mean single head": wide["all"] - wide[head_views].mean(axis=1),
            "all heads - best head": wide["all"] - wide[best],
        }
        for (aggregate, gain), view in zip(gains.items(), ["all", f"all - {best}"], strict=True):
            est = bootstrap_ci(gain.to_numpy(), n_boot=n_boot, seed=seed)
            row = dict(zip([*by, "comparison"], key, strict=True))
            row |= {"aggregate": aggregate, "view": view, "mean": est.mean, "low": est.low}
            row |= {"high": est.high, "n": est.n}
            rows.append(row)
    return pd.DataFrame(rows)


def reliability_table(explanations: Sequence, utterances: Sequence = ()) -> pd.DataFrame:
    """Split-half reliability (:func:`~xattn_utils.compare.reliability`) of SM_X (pooled) and
    SM_H per utterance: ``half`` (r between the maps of two halves of the masks) and ``full``
    (Spearman-Brown, all masks). Empty for methods without folds (gradients)."""
    rows = []
    for e in explanations:
        folds = {"SM_X": e.input_saliency_folds, "SM_H": e.encoder_saliency_folds}
        for map_name, f in folds.items():
            if f is not None:
                rel = reliability(f, special=e.special)
                rows.append({"utterance": e.utterance, "map_name": map_name, "half": rel.half}
                            | {"full": rel.full, **_labels(e, utterances)})  # fmt: skip
    return pd.DataFrame(rows)


def attenuation_table(
    table: pd.DataFrame,
    reliabilities: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "subset"),
    view: str = "all",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean r of CA (``view``) with SM_X and SM_H per ``by``, the maps' mean reliability, and r
    corrected for the maps' noise (:func:`~xattn_utils.compare.disattenuate`): an estimate of
    the r that infinitely many masks would give. Both r with 95% bootstrap CIs over utterances
    (``r_low``, ``r_high``, ``r_corrected_low``, ``r_corrected_high``). NaN where a map shows
    no reliable signal."""
    ca = table[(table["view"] == view) & (table["kind"] != "saliency")]
    keys = [*by, "map_name"]
    per_utt = ca.groupby([*keys, "utterance"])["r"].mean()
    if not reliabilities.empty:
        rel = reliabilities.groupby([*keys, "utterance"])["full"].mean().rename("reliability")
        per_utt = pd.concat([per_utt, rel], axis=1, join="outer")
    else:  # no folds: nothing to correct with
        per_utt = per_utt.to_frame().assign(reliability=np.nan)
    return corrected_summary(per_utt.reset_index(), keys, n_boot=n_boot, seed=seed)


def gap_table(
    table: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "subset"),
    view: str = "all",
    overall: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """CA (``view``) vs SM_X, CA vs SM_H, their gap and SM_X vs SM_H, with CIs per ``by``.

    The gap, r(CA, SM_H) - r(CA, SM_X) per utterance, is the part of CA's agreement with the
    encoder-side relevance that is lost on the input side, i.e. to context mixing in the
    encoder. ``overall`` adds rows over all subsets (``subset == "all"``).
    """
    rows = table[(table["view"] == view) | (table["kind"] == "saliency")]
    if overall and "subset" in by:
        rows = pd.concat([rows, rows.assign(subset="all")], ignore_index=True)
    wide = rows.pivot_table(
        index=[*by, "utterance"], columns="comparison", values="r", aggfunc="mean"
    )
    wide[GAP] = wide["CA vs SM_H"] - wide["CA vs SM_X"]
    long = wide.reset_index().melt(
        id_vars=[*by, "utterance"], var_name="comparison", value_name="r"
    )
    out = corpus_table(long, by=[*by, "comparison"], n_boot=n_boot, seed=seed)
    out.insert(len(by) + 1, "view", np.where(out["comparison"] == "SM_X vs SM_H", "", view))
    ranks = {
        "comparison": {c: i for i, c in enumerate([*COMPARISONS[:2], GAP, COMPARISONS[2]])},
        "subset": {"all": 0, "synthetic": 1, "real": 2},
    }
    out = out.sort_values(
        [*by, "comparison"],
        key=lambda col: col.map(ranks[col.name]).fillna(9) if col.name in ranks else col,
        kind="stable",
    ).reset_index(drop=True)
    out["group"] = out[list(by)].astype(str).agg("\n".join, axis=1)
    return out


def save_metrics(table: pd.DataFrame, out: str | Path, name: str) -> Path:
    """Write ``table`` to ``out/<name>_headline.csv`` (folders created) and return the path."""
    path = Path(out) / f"{name}_headline.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def spectrogram(loaded, audio) -> np.ndarray:
    """Whisper's log-mel input over the speech, shape = (mel_frames, mel_bins), for plots."""
    from .audio import load_audio
    from .decode import features

    audio = load_audio(audio)
    return features(loaded, audio)[0, :, : n_mel_frames(audio)].T.float().cpu().numpy()


# -- running the notebooks ----------------------------------------------------------------------


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
    stem: str, parameters: dict, output: str | Path, *, kernel: str | None = None, cwd=None
) -> Path:
    """Execute ``notebooks/<stem>.ipynb`` with the ``parameters`` it declares into ``output``.

    Raises :class:`NotebookError` naming the notebook and the failing cell.
    """
    import papermill as pm

    source = NOTEBOOK_DIR / f"{stem}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source}")
    declared = pm.inspect_notebook(str(source))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # kernels inherit it
    try:
        pm.execute_notebook(
            str(source),
            str(output),
            parameters={k: v for k, v in parameters.items() if k in declared},
            kernel_name=kernel or kernel_name(),
            cwd=str(cwd or NOTEBOOK_DIR.parent),
            progress_bar=False,
        )
    except pm.PapermillExecutionError as err:
        raise NotebookError(
            f"notebook {stem} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
            f"(executed copy: {output})"
        ) from err
    return output


def render_html(notebook: str | Path, html_path: str | Path, *, code: bool = False) -> Path:
    """Render an executed notebook to HTML; without ``code`` only markdown and outputs."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        exclude_input=not code, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def precompute(
    models: Sequence[str],
    corpus: Sequence,
    store,
    *,
    n_utterances: int,
    client=None,
    shard: tuple[int, int] | None = None,
    **params,
) -> dict[str, str]:
    """Explain every (model, task, utterance) the notebooks will ask for, once, into ``store``,
    here or on the Dask ``client``'s workers; with ``shard = (i, n)`` only that shard of the
    utterances. Returns the failures by ``model/task/utterance``.

    ``params``: ``device``, ``method``, ``n_masks``, ``seed``, ``use_reference_text``, exactly
    as the notebooks pass them, so that their store keys match.
    """
    from .distributed import explain_distributed
    from .distributed import shard as shard_of
    from .models import load_model

    device = params.pop("device", "auto")
    use_reference_text = params.pop("use_reference_text", False)
    failed: dict[str, str] = {}
    for name in models:
        loaded = load_model(name, device if client is None else "cpu")
        for task in study_tasks(loaded):
            utterances = select_utterances(corpus, n_utterances, task=task)
            if shard is not None:
                utterances = shard_of(utterances, *shard)
            summary = explain_distributed(
                client,
                loaded if client is None else name,
                utterances,
                store=store,
                device=device,
                task=task,
                language=None,
                use_reference_text=use_reference_text,
                **params,
            )
            failed |= {f"{name}/{task}/{uid}": err for uid, err in summary.failed.items()}
    return failed


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
) -> Path | None:
    """Explain, run every notebook, render HTML (``<stem>[.<model>].html``, with code under
    ``code/``) and write ``out/index.html``; headline CSVs go to ``out/metrics/``.

    The explain step runs on the Dask ``client`` when given; with ``shard`` only that shard is
    explained and no notebook runs (returns None): run once more without it when every shard
    is done."""
    from .data import load_corpus
    from .store import ResultStore

    start = time.perf_counter()
    out = Path(out).resolve()
    store_path = Path(store).resolve()
    params = {"method": method, "n_masks": n_masks, "seed": seed}
    if data != "demo" and Path(data).exists():  # notebooks run in the repository root
        data = str(Path(data).resolve())
    corpus = load_corpus(data)
    failed = precompute(
        models, corpus, ResultStore(store_path), n_utterances=n_utterances, device=device,
        use_reference_text=use_reference_text, client=client, shard=shard, **params,
    )  # fmt: skip
    if failed:
        raise NotebookError(f"explaining failed for {sorted(failed)}: {failed}")
    if shard is not None:
        return None
    common = params | {
        "data": data,
        "n_utterances": n_utterances,
        "device": device,
        "use_reference_text": use_reference_text,
        "store": str(store_path),
        "out": str(out / "metrics"),
        "models": list(models),
        "progress": False,  # the store already holds every result: no bars in the HTML
        "interactive": False,  # static figures only: shared HTML reports hold no live widgets
    }
    for stale in (out / "metrics").glob("*_headline.csv"):  # from an earlier run
        stale.unlink()
    kernel, pages = kernel_name(), []
    for stem in notebooks or NOTEBOOKS:
        runs = {"first": models[:1], "each": models, "all": [None]}[NOTEBOOKS[stem]]
        for model in runs:
            name = stem if model is None else f"{stem}.{model}"
            executed = out / "notebooks" / f"{name}.ipynb"
            run_params = common | {"model": model or models[0]}
            run_notebook(stem, run_params, executed, kernel=kernel)
            render_html(executed, out / f"{name}.html")
            render_html(executed, out / "code" / f"{name}.html", code=True)
            pages.append(name)
    seconds = time.perf_counter() - start
    settings = {k: v for k, v in common.items() if k not in ("out", "progress")}
    return write_index(out, pages, settings, seconds)


def _reliability_note(metrics: Path) -> str:
    """A paragraph on how reliable the report's saliency maps are, from the convergence
    notebook's headline CSVs (empty when it did not run)."""
    from .perturbation import PerturbationOptions

    design, lines = PerturbationOptions().design, []
    for csv in sorted(metrics.glob("06_convergence*_headline.csv")):
        df = pd.read_csv(csv)
        for row in df[df["design"] == design].to_dict("records"):
            how = "extrapolated" if row["extrapolated"] else "measured"
            label = html.escape(f"{row['model']} {row['task']} {row['map_name']}")
            lines.append(
                f"<li>{label}: reliability {row['mean']:.2f} at {row['n_masks']} masks; 0.9 "
                f"needs about {row['masks_for_0.9']:,.0f} masks ({how})</li>"
            )
    if not lines:
        return ""
    return (
        "<h3>Reliability of the saliency maps</h3><p>Split-half reliability (Spearman-Brown) of "
        f"each perturbation map with the default mask design ({html.escape(design)}), from "
        "06_convergence. Below 0.9 a map's noise visibly pulls its correlations with CA toward "
        "0: the <code>r_corrected</code> columns undo that. Where 0.9 needs more masks than "
        "this run used, a CPU cannot afford it at the report's scale; read the correlations "
        "as lower bounds.</p><ul>" + "".join(lines) + "</ul>"
    )


def write_index(out: Path, pages: Sequence[str], params: dict, seconds: float) -> Path:
    """``out/index.html``: links to each report and the headline tables of ``out/metrics``."""
    esc = html.escape
    links = "".join(
        f'<li><a href="{esc(p)}.html">{esc(p)}</a> (<a href="code/{esc(p)}.html">with code</a>)'
        "</li>"
        for p in pages
    )
    settings = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in params.items()
    )
    tables = _reliability_note(out / "metrics")
    for csv in sorted((out / "metrics").glob("*_headline.csv")):
        df = pd.read_csv(csv)
        title = csv.name.removesuffix("_headline.csv")
        tables += f"<h3>{esc(title)}</h3>" + df.to_html(
            index=False, float_format=lambda v: f"{v:.3f}", border=0, classes="t", na_rep=""
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>xattn report</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{padding:2px 10px;text-align:left;
border-bottom:1px solid #ddd}}</style></head><body>
<h1>xattn: how much does cross-attention explain?</h1>
<p>Reports of one run ({seconds / 60:.1f} min). Correlations are Pearson r between CA and
saliency per token, averaged per utterance, special tokens excluded; [low, high] are 95%
bootstrap CIs over utterances. "best head" and "best layer" are chosen on the same utterances
(optimistic); "all heads" is not selected.</p>
<h2>Notebooks</h2><ul>{links}</ul><h2>Settings</h2><table>{settings}</table>
<h2>Headline numbers</h2>{tables}</body></html>"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

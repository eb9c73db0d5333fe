"""The ``xattn`` command line: a thin front door over the library's verbs."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

DATA_HELP = (
    "'demo', a folder of audio, a TSV manifest, a folder saved by datasets' save_to_disk, "
    "or audiofolder:PATH (a datasets audio folder, metadata.csv optional)"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the bundled models and whether they are ready")
    p.add_argument("--prepare", action="store_true", help="convert the bundled models now")
    p.set_defaults(func=_models)

    p = sub.add_parser("transcribe", help="print path<TAB>text for each audio file")
    _model_args(p)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_transcribe)

    p = sub.add_parser("attention", help="cross-attention per utterance of a corpus")
    _model_args(p)
    _data_args(p)
    p.set_defaults(func=_attention)

    p = sub.add_parser("explain", help="cross-attention + SM_X + SM_H per utterance (resumable)")
    _model_args(p)
    _data_args(p)
    p.add_argument("--method", default="spes", help="spes, saliency, input_x_gradient, ...")
    p.add_argument("--n-masks", type=int, default=None, help="masks per map (spes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-text", action="store_true", help="explain the reference text")
    add_distributed_args(p)
    p.set_defaults(func=_explain)

    p = sub.add_parser("report", help="explain once, run every notebook, write HTML + index")
    p.add_argument("--models", default="tiny.en", help="comma-separated, e.g. tiny.en,base")
    p.add_argument("--data", default="demo", help=DATA_HELP)
    p.add_argument("--out", type=Path, default=Path("reports"), help="report folder")
    p.add_argument("--n-utterances", type=int, default=None, help="utterances (default 8; 0 = all)")
    p.add_argument("--n-masks", type=int, default=None, help="masks per map (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--method", default="spes", help="spes, saliency, input_x_gradient, ...")
    p.add_argument("--use-reference-text", action="store_true", help="explain reference texts")
    p.add_argument("--store", type=Path, default=Path("out/store"), help="shared results store")
    p.add_argument("--jobs", type=int, default=1, help="notebooks run at a time (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_parameter,
                   help="a notebook parameter in YAML, e.g. max_tokens=2 (repeatable)")  # fmt: skip
    add_distributed_args(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("timestamps", help="word timestamps (json, csv, srt or textgrid)")
    p.add_argument("files", nargs="+", help="audio files (any length: long ones in windows)")
    p.add_argument("--model", default="tiny.en", help="bundled name, local folder or hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--language", default=None, help="spoken language (multilingual models)")
    p.add_argument("--text-file", type=Path, default=None, help="align this transcript")
    p.add_argument("--method", default=None, help="default: the best unsupervised method")
    p.add_argument("--format", default="json", choices=["json", "csv", "srt", "textgrid"])
    p.add_argument("--calibration", type=Path, default=None, help="a calibration JSON")
    p.add_argument("--out", type=Path, default=None, help="folder for srt/textgrid files")
    p.set_defaults(func=_timestamps)

    p = sub.add_parser("calibrate", help="learn timestamp heads and offsets from gold words")
    p.add_argument("--model", default="tiny.en", help="bundled name, local folder or hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--data", required=True, help=f"{DATA_HELP}, with gold words")
    p.add_argument("--subset", default=None, help="demo subset: synthetic or real")
    p.add_argument("--method", default="chars-refined", help="the method to calibrate")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout)")
    p.set_defaults(func=_calibrate)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:  # our errors name the problem: no traceback
        print(f"xattn {args.command}: error: {err}", file=sys.stderr)
        return 2


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny.en", help="bundled name, local folder or hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--language", default=None, help="source language code (multilingual models)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="demo", help=DATA_HELP)
    p.add_argument("--subset", default=None, help="demo subset: synthetic or real")
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--out", required=True, type=Path, help="output folder")


def _models(args: argparse.Namespace) -> None:
    from .model.loading import available_models, cache_dir, load_model

    for name in available_models():
        folders = [f"{name}/model.safetensors", f"{name}-seed*/model.safetensors"]
        ready = any(p for pattern in folders for p in cache_dir().glob(pattern))
        if args.prepare and not ready:
            load_model(name, device="cpu")
            ready = True
        print(f"{name}\t{'converted' if ready else 'not converted yet'}\t{cache_dir()}")


def _transcribe(args: argparse.Namespace) -> None:
    from .model.decode import decode
    from .model.loading import load_model

    loaded = load_model(args.model, args.device)
    for path in args.files:
        tr = decode(loaded, path, task=args.task, language=args.language)
        print(f"{path}\t{tr.text}", flush=True)


def _attention(args: argparse.Namespace) -> None:
    import pandas as pd
    from safetensors.torch import save_file

    from .data import load_corpus
    from .maps.attention import cross_attention
    from .model.loading import load_model

    loaded = load_model(args.model, args.device)
    corpus = load_corpus(args.data, subset=args.subset, limit=args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for utt in tqdm(corpus, desc=f"attention {loaded.name}"):
        language = args.language or utt.language
        ca = cross_attention(loaded, utt.load(), task=args.task, language=_lang(loaded, language))
        path = args.out / f"{utt.id}.safetensors"
        save_file({"cross_attention": ca.scores}, str(path))
        rows.append(
            {
                "id": utt.id,
                "file": path.name,
                "text": ca.transcript.text,
                "tokens": len(ca.tokens),
                "enc_frames": ca.scores.shape[-1],
                "duration": ca.duration,
            }
        )
    pd.DataFrame(rows).to_csv(args.out / "index.csv", index=False)
    print(f"wrote {len(rows)} utterances to {args.out}")


def _explain(args: argparse.Namespace) -> int:
    """Explain the corpus (``--shard``: one shard of it) here or on the Dask engine into
    ``--out``, rewrite its ``index.csv`` and print what was done; 1 if any utterance failed."""
    from .data import load_corpus
    from .maps.distributed import explain_distributed, shard
    from .store import ResultStore

    corpus = load_corpus(args.data, subset=args.subset, limit=args.limit)
    if args.shard is not None:
        corpus = shard(corpus, *args.shard)
    overrides = {} if args.n_masks is None else {"n_masks": args.n_masks}
    store = ResultStore(args.out)
    with _client(args) as client:
        summary = explain_distributed(
            client, args.model, corpus, store=store, device=args.device, threads=args.threads,
            retries=args.retries, resources=args.resources, task=args.task,
            language=args.language, use_reference_text=args.reference_text, method=args.method,
            seed=args.seed, **overrides,
        )  # fmt: skip
    print(summary, flush=True)
    store.write_index()
    return 1 if summary.failed else 0


def _parameter(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as YAML (``fractions=[0.5]``, ``gradient=null``)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{name}: not a YAML value: {value!r}") from err


def _report(args: argparse.Namespace) -> int:
    from . import report

    try:
        parameters = report.check_parameters(list(report.NOTEBOOKS), dict(args.set))
    except ValueError as err:
        print(f"xattn report: error: --set: {err}", file=sys.stderr)
        return 2
    try:
        with _client(args) as client:
            index = report.build_report(
                [m.strip() for m in args.models.split(",") if m.strip()],
                args.data,
                args.out,
                n_utterances=report.DEFAULT_N_UTTERANCES
                if args.n_utterances is None
                else args.n_utterances,
                n_masks=args.n_masks or report.DEFAULT_N_MASKS,
                seed=args.seed,
                device=args.device,
                method=args.method,
                use_reference_text=args.use_reference_text,
                store=args.store,
                client=client,
                shard=args.shard,
                jobs=args.jobs,
                parameters=parameters,
            )
    except report.NotebookError as err:  # the message names the notebook and the cell
        print(f"xattn report: error: {err}", file=sys.stderr)
        return 1
    if index is None:
        print(
            f"shard {args.shard[0]}/{args.shard[1]} explained into {args.store}; run "
            "`xattn report` without --shard once every shard is done"
        )
        return 0
    import time

    import psutil  # a dependency of dask's

    took = time.time() - psutil.Process().create_time()
    print(f"{took:.0f} s in all, from the command's start (imports included)")
    print(f"report written: {index}\nopen it in a browser: xdg-open {index} (macOS: open; or "
          f"python -m webbrowser file://{index}); every page links back to it")  # fmt: skip
    return 0


def _timestamps(args: argparse.Namespace) -> None:
    from . import timestamp_formats as fmt
    from .analysis.aligner import word_timestamps
    from .analysis.calibration import load_calibration
    from .audio import load_audio
    from .model.loading import load_model

    if args.text_file is not None and len(args.files) != 1:
        raise ValueError("--text-file aligns one transcript: give exactly one audio file")
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else None
    loaded = load_model(args.model, args.device)
    cal = load_calibration(args.calibration) if args.calibration else None
    results, durations = {}, {}
    for path in args.files:
        audio = load_audio(path, max_seconds=None)
        durations[path] = len(audio) / 16000
        results[path] = word_timestamps(
            loaded, audio, text=text, method=args.method, language=args.language, calibration=cal
        )
    if args.format in ("json", "csv"):
        print((fmt.to_json if args.format == "json" else fmt.to_csv)(results), end="")
        return
    suffix = ".srt" if args.format == "srt" else ".TextGrid"
    for path, words in results.items():
        body = (
            fmt.to_srt(words) if args.format == "srt" else fmt.to_textgrid(words, durations[path])
        )
        target = (args.out or Path(path).parent) / (Path(path).stem + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
        print(target)


def _calibrate(args: argparse.Namespace) -> None:
    from .analysis.calibration import calibrate
    from .data import load_corpus
    from .model.loading import load_model

    loaded = load_model(args.model, args.device)
    corpus = load_corpus(args.data, subset=args.subset)
    cal = calibrate(loaded, corpus, method=args.method, progress=True)
    if args.out is None:
        print(cal.to_json(), end="")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(cal.to_json(), encoding="utf-8")
    print(f"wrote {args.out}: {len(cal.heads)} heads, offsets {cal.offsets} s (in sample)")


def _lang(loaded, language: str | None) -> str | None:
    return language if loaded.multilingual else None


# -- scale-out flags (see xattn_utils.maps.distributed) ----------------------------------------


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--shard I/N``, ``--workers N``, ``--scheduler ADDRESS`` and their knobs."""
    g = parser.add_argument_group("scale-out (see xattn_utils.maps.distributed)")
    shard_help = "only shard I of N, 0 <= I < N (by utterance id): run all N, anywhere, one --out"
    g.add_argument("--shard", type=_shard_arg, metavar="I/N", help=shard_help)
    g.add_argument("--workers", type=int, help="N local Dask worker processes")
    g.add_argument("--scheduler", metavar="ADDRESS", help="a Dask cluster (tcp://host:8786)")
    g.add_argument("--threads", type=int, help="torch threads per worker (default: share cores)")
    resources_help = "Dask resources per task, e.g. GPU=1 (for workers started --resources GPU=1)"
    g.add_argument("--resources", type=_resources_arg, metavar="NAME=N,...", help=resources_help)
    g.add_argument("--retries", type=int, default=1, help="retries of a task that raised")


def _client(args: argparse.Namespace):
    """A context giving the Dask client that ``--workers``/``--scheduler`` ask for, or None
    (run in this process)."""
    if getattr(args, "workers", None) or getattr(args, "scheduler", None):
        from .maps.distributed import connect

        return connect(workers=args.workers, scheduler=args.scheduler)
    return nullcontext()


def _shard_arg(text: str) -> tuple[int, int]:
    from .maps.distributed import parse_shard

    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _resources_arg(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"resources look like GPU=1,MEM=2e9: {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())

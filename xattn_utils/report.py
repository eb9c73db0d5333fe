"""Helpers the notebooks call, so that they stay free of ``def``: the utterance selection
(:func:`select_utterances`, :func:`study_tasks`), :func:`save_metrics`, :func:`spectrogram`, and
the study's analysis tables (:mod:`xattn_utils.tables`, re-exported here).

The report itself lives in :mod:`xattn_utils.runner` (``build_report``, papermill, HTML),
:mod:`xattn_utils.index` (``index.html``) and :mod:`xattn_utils.findings` (the study's findings
and the headline figure's numbers); their public names are also reachable here
(``xu.report.build_report``), loaded on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .tables import (  # noqa: F401  (re-exported: the notebooks call xu.report.<table>)
    AGGREGATES,
    COMPARISONS,
    GAP,
    VIEWS,
    aggregation_gain,
    attenuation_table,
    correlation_table,
    cumulative_table,
    gap_table,
    headline,
    reliability_table,
)

DEFAULT_N_UTTERANCES = 8  # 4 synthetic + 4 real English utterances
DEFAULT_N_MASKS = 128  # with 8 utterances: 7.5 min for tiny.en on 2 idle CPU cores
# names of the report's runner and index, loaded on first use (they come later in the data flow)
_LATER = {
    "runner": ("NOTEBOOK_DIR", "NOTEBOOKS", "NotebookError", "build_report", "kernel_name",
               "precompute", "render_html", "run_notebook"),
    "index": ("write_index",),
}  # fmt: skip


def __getattr__(name: str):
    for module, names in _LATER.items():
        if name in names:
            return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    return (
        features(loaded, audio)[0, :, : loaded.family.n_mel_frames(audio)].T.float().cpu().numpy()
    )

"""Helpers the notebooks call, so that they stay free of ``def``: the study and its selection
(:mod:`xattn_utils.report.study`: :class:`Study`, :func:`explain_selection`, re-exported here),
:func:`save_metrics`, :func:`spectrogram`, and the study's analysis tables
(:mod:`xattn_utils.analysis.tables`, re-exported here).

The report itself lives in :mod:`xattn_utils.report.runner` (``build_report``, papermill, HTML),
:mod:`xattn_utils.report.index` (``index.html``) and :mod:`xattn_utils.analysis.findings` (the
study's findings and the headline figure's numbers); their public names are also reachable here
(``xu.report.build_report``), loaded on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd

from ..analysis.tables import (  # noqa: F401  (re-exported: the notebooks call xu.report.<table>)
    AGGREGATES,
    COMPARISONS,
    GAP,
    HEADLINE_AGGREGATES,
    aggregation_gain,
    attenuation_table,
    correlation_table,
    cumulative_table,
    gap_table,
    headline,
    reliability_table,
)
from ..maps.prepare import spectrogram  # noqa: F401  (re-exported for the notebooks)
from .study import (  # noqa: F401  (re-exported: the notebooks call xu.report.Study ...)
    DEFAULT_N_MASKS,
    DEFAULT_N_UTTERANCES,
    Selection,
    Study,
    explain_selection,
    select_utterances,
    study_tasks,
)

# names of the report's runner and index, loaded on first use (they come later in the data flow)
_LATER = {
    "runner": ("NOTEBOOK_DIR", "NOTEBOOKS", "NotebookError", "build_report", "check_parameters",
               "kernel_name", "precompute", "render_html", "run_notebook", "STUDY_PARAMETERS"),
    "index": ("write_index",),
}  # fmt: skip


def __getattr__(name: str):
    for module, names in _LATER.items():
        if name in names:
            return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_metrics(table: pd.DataFrame, out: str | Path, name: str) -> Path:
    """Write ``table`` to ``out/<name>_headline.csv`` (folders created) and return the path."""
    path = Path(out) / f"{name}_headline.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path

"""xattn: how much does cross-attention explain in speech-to-text models?

Figures, the explorer, the report helpers and the analyses beyond the study live in the
submodules ``xu.plots``, ``xu.widgets``, ``xu.report``, ``xu.convergence``, ``xu.faithfulness``
and ``xu.timestamps`` (plots and widgets load matplotlib on first use).
"""

import importlib

from .aligner import word_timestamps
from .attention import CrossAttention, cross_attention
from .audio import load_audio
from .compare import corpus_table
from .data import load_corpus
from .decode import Transcript, decode
from .models import LoadedModel, available_models, load_model
from .report import save_metrics
from .saliency import Explanation, explain, explain_corpus, list_methods
from .store import ResultStore

__all__ = [
    "CrossAttention",
    "Explanation",
    "LoadedModel",
    "ResultStore",
    "Transcript",
    "available_models",
    "corpus_table",
    "cross_attention",
    "decode",
    "explain",
    "explain_corpus",
    "list_methods",
    "load_audio",
    "load_corpus",
    "load_model",
    "save_metrics",
    "word_timestamps",
]

_LAZY = ("convergence", "faithfulness", "plots", "report", "timestamps", "whisper_ref", "widgets")
_LAZY += ("context", "mixing", "views")
_LAZY += ("aligner", "calibration", "timestamp_formats")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""xattn: how much does cross-attention explain in speech-to-text models?

The package is grouped by family, in data-flow order (imports go one way):
``audio``, ``store``, ``data`` -> ``model`` (loading, conversion, decoding, forwards) -> ``maps``
(CA, SPES and gradient saliency, explanations, corpora) -> ``analysis`` (comparisons,
convergence, occlusion and faithfulness, timestamps, context mixing, the study's tables and
findings) -> ``viz`` (maps of one utterance, charts of tables, the explorer) -> ``report`` (the
study, the notebooks' runner, the index) -> ``cli``; ``reference`` holds the openai-whisper
reference. Every module is also reachable by its short name, loaded on first use
(``xu.plots``, ``xu.charts``, ``xu.faithfulness``, ``xu.timestamps`` ...).
"""

import importlib

from .analysis.aligner import word_timestamps
from .analysis.stats import corpus_table
from .audio import load_audio
from .data import load_corpus
from .maps.attention import CrossAttention, cross_attention
from .maps.corpus import explain_corpus
from .maps.explanation import Explanation
from .maps.saliency import explain, list_methods
from .model.decode import Transcript, decode
from .model.loading import LoadedModel, available_models, load_model
from .report import save_metrics
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

# The modules by their short names (``xu.plots``, ``xu.faithfulness``, ...), loaded on first use:
# the notebooks reach the analyses this way, whatever family the module sits in.
MODULES = {
    "convert": "model.convert", "models": "model.loading", "decode": "model.decode",
    "forwards": "maps.forwards",
    "attention": "maps.attention", "prepare": "maps.prepare", "perturbation": "maps.perturbation",
    "masks": "maps.masks",
    "estimators": "maps.estimators", "spes": "maps.spes", "gradients": "maps.gradients",
    "saliency": "maps.saliency", "explanation": "maps.explanation", "corpus": "maps.corpus",
    "mixing": "analysis.mixing", "distributed": "maps.distributed",
    "compare": "analysis.compare", "stats": "analysis.stats",
    "convergence": "analysis.convergence",
    "occlusion": "analysis.occlusion", "faithfulness": "analysis.faithfulness",
    "captum_metrics": "analysis.captum_metrics",
    "timing": "analysis.timing", "timestamps": "analysis.timestamps",
    "timestamp_methods": "analysis.timestamp_methods", "alignment": "analysis.alignment",
    "boundaries": "analysis.boundaries", "heads": "analysis.heads", "guide": "analysis.guide",
    "calibration": "analysis.calibration", "aligner": "analysis.aligner",
    "timestamp_formats": "analysis.timestamp_formats", "context": "analysis.context",
    "tables": "analysis.tables", "findings": "analysis.findings",
    "plots": "viz.plots", "charts": "viz.charts", "widgets": "viz.widgets",
    "study": "report.study", "runner": "report.runner", "index": "report.index",
    "captum": "captum", "hf_datasets": "hf_datasets",
    "views": "maps.views", "whisper_ref": "reference.whisper",
}  # fmt: skip


def __getattr__(name: str):
    if name in MODULES:
        return importlib.import_module(f"{__name__}.{MODULES[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The study a report runs: which utterances, how they are explained, where results go.

Every notebook and the report's explain step (:func:`~xattn_utils.report.runner.precompute`) build
one
:class:`Study` from the same parameters and call :func:`explain_selection` (or the engine with
:meth:`Study.settings`), so they ask the store for the same keys: the explain step computes,
the notebooks read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..data import Utterance, load_corpus
from ..maps.corpus import explain_corpus
from ..maps.explanation import Explanation
from ..maps.saliency import Options, list_methods, method_options
from ..model.loading import LoadedModel
from ..store import ResultStore

DEFAULT_N_UTTERANCES = 8  # 4 synthetic + 4 real English utterances
DEFAULT_N_MASKS = 128  # with 8 utterances: 7.5 min for tiny.en on 2 idle CPU cores


def select_utterances(
    corpus: Sequence[Utterance], n: int, *, task: str = "transcribe", language: str | None = None
) -> list[Utterance]:
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


def study_tasks(loaded: LoadedModel, task: str = "transcribe") -> list[str]:
    """Tasks a model is studied on: ``task``, plus translation for a multilingual model."""
    return list(dict.fromkeys([task, "translate"])) if loaded.multilingual else [task]


@dataclass(frozen=True)
class Study:
    """The parameters the notebooks of one report share.

    - ``data``: ``"demo"`` or a corpus :func:`~xattn_utils.data.load_corpus` reads.
    - ``n_utterances``: the size of the balanced selection (:func:`select_utterances`; 0: all).
    - ``method``, ``n_masks``, ``seed``: how each utterance is explained (``n_masks`` for
      ``spes`` only).
    - ``language``: None for each utterance's own (English for transcription).
    - ``use_reference_text``: teacher-force the reference transcripts (for the random model).
    - ``store``: the results store's folder, shared by all notebooks (None: no store).
    - ``progress``: progress bars (speed only: not part of any result).
    """

    data: str = "demo"
    n_utterances: int = DEFAULT_N_UTTERANCES
    method: str = "spes"
    n_masks: int = DEFAULT_N_MASKS
    seed: int = 0
    language: str | None = None
    use_reference_text: bool = False
    store: str | None = "out/store"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in list_methods():
            raise ValueError(f"unknown method {self.method!r}: use one of {list_methods()}")
        if not isinstance(self.n_utterances, int) or self.n_utterances < 0:
            raise ValueError(f"n_utterances must be >= 0 (0: all), got {self.n_utterances!r}")
        self.options()  # fails here for bad mask counts

    def options(self) -> Options:
        """The method's options (``n_masks`` for SPES)."""
        if self.method == "spes":
            return method_options(self.method, n_masks=self.n_masks)
        return method_options(self.method)

    def result_store(self) -> ResultStore | None:
        return None if self.store is None else ResultStore(self.store)

    def utterances(self, task: str = "transcribe") -> list[Utterance]:
        """The selection for ``task``."""
        corpus = load_corpus(self.data)
        return select_utterances(corpus, self.n_utterances, task=task, language=self.language)

    def settings(self, task: str = "transcribe") -> dict:
        """Keyword arguments of :func:`~xattn_utils.maps.corpus.explain_corpus` (and of the Dask
        engine) for ``task``: what decides the store keys."""
        return {"task": task, "language": self.language, "method": self.method,
                "options": self.options(), "seed": self.seed,
                "use_reference_text": self.use_reference_text}  # fmt: skip


class Selection(NamedTuple):
    """The selected utterances and their explanations, in the same order."""

    utterances: list[Utterance]
    explanations: list[Explanation]


def explain_selection(loaded: LoadedModel, study: Study, *, task: str = "transcribe") -> Selection:
    """The study's utterances for ``task`` and their explanations (read from the store when it
    holds them, else computed and stored)."""
    utterances = study.utterances(task)
    explanations = explain_corpus(loaded, utterances, store=study.result_store(),
                                  progress=study.progress, **study.settings(task))  # fmt: skip
    return Selection(utterances, explanations)

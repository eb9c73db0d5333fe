"""Explain a corpus of utterances into the results store, one entry per utterance.

A corpus run names what it asks for once: :func:`request` (the language and teacher-forced text
of an utterance) and :func:`corpus_key` (the store key of that request under
:func:`~xattn_utils.maps.saliency.run_params`). :func:`explain_corpus`, the Dask engine
(:mod:`xattn_utils.maps.distributed`) and the report's explain step therefore find each other's
results, and a setting that only changes speed (``batch_size``) changes no key.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data import Utterance
from ..model.loading import LoadedModel
from ..store import ResultStore, cached
from .explanation import Explanation
from .saliency import Options, explain, method_options, run_params


def request(
    loaded: LoadedModel,
    utterance: Utterance,
    *,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
) -> tuple[str | None, str | None]:
    """``(language, text)`` a corpus run uses for ``utterance``: ``language=None`` takes the
    utterance's own (English-only models: None); ``use_reference_text`` teacher-forces its
    reference transcript (its reference translation for ``task="translate"``), else None (the
    model's own output)."""
    lang = (language or utterance.language) if loaded.multilingual else None
    reference = utterance.translation if task == "translate" else utterance.text
    return lang, reference if use_reference_text else None


def corpus_key(
    loaded: LoadedModel,
    utterance: Utterance,
    *,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
    method: str = "spes",
    options: Options | None = None,
    seed: int = 0,
    **overrides,
) -> str:
    """The store key of :func:`explain_corpus`'s result for ``utterance`` with these settings
    (``options`` and ``overrides`` as for :func:`~xattn_utils.maps.saliency.explain`)."""
    lang, text = request(loaded, utterance, task=task, language=language,
                         use_reference_text=use_reference_text)  # fmt: skip
    options = method_options(method, options, **overrides)
    params = run_params(method, options, seed=seed, task=task, language=lang, text=text)
    return ResultStore.key(model=loaded.name, utterance=utterance.id, method=method, params=params)


def explain_corpus(
    loaded: LoadedModel,
    utterances: Sequence[Utterance],
    *,
    store: ResultStore | None = None,
    task: str = "transcribe",
    language: str | None = None,
    use_reference_text: bool = False,
    method: str = "spes",
    options: Options | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides,
) -> list[Explanation]:
    """:func:`~xattn_utils.maps.saliency.explain` every utterance, reusing results found in
    ``store`` and saving new ones as soon as each finishes, so a killed run loses no finished
    utterance. Language and text as :func:`request` picks them (``use_reference_text`` for the
    random test model, whose outputs mean nothing); ``options``/``overrides`` as for
    :func:`~xattn_utils.maps.saliency.explain`."""
    from tqdm.auto import tqdm

    options = method_options(method, options, **overrides)
    settings = {"task": task, "method": method, "options": options, "seed": seed}
    results = []
    for utt in tqdm(utterances, desc=f"explain {loaded.name}", disable=not progress):
        lang, text = request(loaded, utt, task=task, language=language,
                             use_reference_text=use_reference_text)  # fmt: skip
        key = corpus_key(loaded, utt, language=language, use_reference_text=use_reference_text,
                         **settings)  # fmt: skip

        def compute(utt=utt, lang=lang, text=text) -> Explanation:
            return explain(loaded, utt.load(), text=text, language=lang, utterance=utt.id,
                           progress=progress, **settings)  # fmt: skip

        results.append(cached(store, key, compute, Explanation))
    return results

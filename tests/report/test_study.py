"""The study, its selection and the store keys: the report's explain step and the notebooks ask
for the same keys, a key names what a run computed (not how it was called or how fast), and a
stored result is read back, not recomputed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import xattn_utils as xu
from xattn_utils.maps.corpus import corpus_key, explain_corpus
from xattn_utils.maps.perturbation import PerturbationError, PerturbationOptions
from xattn_utils.maps.saliency import method_options, run_params
from xattn_utils.report.runner import precompute
from xattn_utils.report.study import Study, explain_selection
from xattn_utils.store import ResultStore


@pytest.fixture
def study(tmp_path) -> Study:
    return Study(n_utterances=1, n_masks=8, use_reference_text=True, store=str(tmp_path / "s"),
                 progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def utterance():
    return xu.report.select_utterances(xu.load_corpus("demo"), 1)[0]


def test_a_key_is_the_settings_the_run_used(tiny, utterance):
    """Defaults spelled out or left out, the same run; a speed-only setting changes no key; a
    setting that changes the maps does."""
    key = corpus_key(tiny, utterance, use_reference_text=True)
    assert key == corpus_key(tiny, utterance, use_reference_text=True, method="spes", seed=0,
                             options=PerturbationOptions())  # fmt: skip
    assert key == corpus_key(tiny, utterance, use_reference_text=True,
                             n_masks=PerturbationOptions().n_masks)  # fmt: skip
    assert key == corpus_key(tiny, utterance, use_reference_text=True, batch_size=3)
    assert key != corpus_key(tiny, utterance, use_reference_text=True, n_masks=16)
    assert key != corpus_key(tiny, utterance, use_reference_text=True, fill="zero")
    assert key != corpus_key(tiny, utterance, use_reference_text=False)
    grad = corpus_key(tiny, utterance, method="saliency")
    assert grad == corpus_key(tiny, utterance, method="saliency", n_steps=64)  # unused there
    ig = corpus_key(tiny, utterance, method="integrated_gradients")
    assert ig != corpus_key(tiny, utterance, method="integrated_gradients", n_steps=64)


def test_explanation_params_are_the_key_params(tiny, utterance, tmp_path):
    store = ResultStore(tmp_path)
    opts = PerturbationOptions(n_masks=8, batch_size=4)
    [e] = explain_corpus(tiny, [utterance], store=store, use_reference_text=True, options=opts,
                         progress=False)  # fmt: skip
    assert "batch_size" not in e.params
    key = ResultStore.key(model=e.model, utterance=e.utterance, method=e.method, params=e.params)
    assert store.keys() == [key]
    assert e.params == run_params("spes", opts, seed=0, task="transcribe", language=None,
                                  text=utterance.text)  # fmt: skip
    # read back, not recomputed: same maps, and the store holds one entry
    [again] = explain_corpus(tiny, [utterance], store=store, use_reference_text=True,
                             options=replace(opts, batch_size=None), progress=False)  # fmt: skip
    assert torch.equal(again.input_saliency, e.input_saliency) and store.keys() == [key]


def test_precompute_and_the_notebooks_ask_for_the_same_keys(tiny, study):
    """The report's explain step fills the store; the notebooks' call (explain_selection with
    the same study) then adds nothing and gets what was stored."""
    [summary] = precompute(["random-tiny"], study, device="cpu")
    store = ResultStore(study.store)
    keys = store.keys()
    assert len(keys) == 1 and summary.done and not summary.skipped
    assert sorted(summary.keys.values()) == keys
    utterances, explanations = explain_selection(tiny, study)
    assert store.keys() == keys and [e.utterance for e in explanations] == [utterances[0].id]
    [again] = precompute(["random-tiny"], study, device="cpu")
    assert again.skipped and not again.done


def test_options_reject_unknown_settings_and_wrong_kinds():
    with pytest.raises(PerturbationError, match="no setting 'n_mask'"):
        method_options("spes", n_mask=3)
    with pytest.raises(TypeError, match="takes GradientOptions"):
        method_options("saliency", PerturbationOptions())
    with pytest.raises(ValueError, match="unknown method"):
        Study(method="occlusion")
    with pytest.raises(PerturbationError, match="n_masks"):
        Study(n_masks=0)

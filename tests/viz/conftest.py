"""Fixtures of the figure tests: two utterances explained by the random model, their
correlation table, and every figure closed after each test (Agg backend)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from xattn_utils import report  # noqa: E402
from xattn_utils.maps.perturbation import PerturbationOptions  # noqa: E402
from xattn_utils.maps.saliency import explain  # noqa: E402


@pytest.fixture(scope="module")
def explanations(tiny, tone):
    """Two utterances explained by the random model with a few i.i.d. masks (about 2 s; so few
    complementary pairs would leave max-pooled half maps constant)."""
    texts = ["the cat sat on the mat", "open the door"]
    iid = PerturbationOptions(design="iid")
    return [
        explain(
            tiny,
            tone[: 16000 + 8000 * i],
            text=t,
            n_masks=6,
            options=iid,
            progress=False,
            utterance=f"u{i}",
        )  # fmt: skip
        for i, t in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def utterances(tone):
    return [
        SimpleNamespace(id="u0", subset="synthetic", language="en", load=lambda: tone[:16000]),
        SimpleNamespace(id="u1", subset="real", language="en", load=lambda: tone[:24000]),
    ]


@pytest.fixture(scope="module")
def table(explanations, utterances):
    return report.correlation_table(explanations, utterances)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")

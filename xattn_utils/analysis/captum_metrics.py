"""Captum's explanation metrics for the maps that :mod:`xattn_utils.analysis.faithfulness` ranks.

Every map is (tokens, enc_frames) (:func:`~xattn_utils.analysis.faithfulness.time_maps`); the
tokens are those its deletion/insertion curves evaluated (:attr:`Curves.evaluated`).

- **Infidelity** (Yeh et al. 2019, :func:`captum.metrics.infidelity`, ``normalize=True``: the
  map's best scale, so CA and SPES maps compare): the mean squared error between ``I . map``
  and the drop of the reference token's probability when the frames ``I`` are occluded
  (every mel bin of their 2 mel frames takes the padding value, as deletion does). ``I`` is an
  i.i.d. draw occluding each speech frame with probability ``occlusion``; the same
  ``n_infidelity`` draws serve every map and token, so the metric costs ``n_infidelity + 1``
  forwards per utterance. Lower is better. Infidelity is scale-free but not shift-free: a map
  that adds a constant to every frame (SPES's estimate adds ``p`` times the mean score) is
  charged for it. ``"random"``: standard normal attributions.
- **Sensitivity** (:func:`captum.metrics.sensitivity_max`): the largest relative change
  ``||map(x') - map(x)|| / ||map(x)||`` of a map's evaluated rows over ``n_sensitivity`` inputs
  ``x'`` with uniform noise of ``radius`` on the speech region's log-mel cells (the same draws
  for every map). Every map is recomputed on every ``x'``: CA with one forward, a gradient map
  with its backward passes, SPES maps with ``sensitivity_masks`` masks (its own design,
  estimator and seed, so clean and noisy inputs share their masks; ``None``: the explanation's
  own mask count). Lower is more stable. ``"random"`` has none (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd
import torch
from captum.metrics import infidelity, sensitivity_max
from tqdm.auto import tqdm

from ..audio import load_audio
from ..maps.attention import forward_attention
from ..maps.gradients import gradient_maps
from ..maps.perturbation import PerturbationOptions
from ..maps.prepare import Prepared
from ..maps.spes import encoder_spes_run, input_spes_run
from ..model.decode import features
from ..model.loading import LoadedModel
from .faithfulness import Curves, time_maps
from .occlusion import RANDOM, FaithfulnessError, frame_probability_fn
from .stats import bootstrap_ci

METRICS = ("infidelity", "sensitivity_max")


@dataclass(frozen=True)
class CaptumMetricOptions:
    """Knobs of the two metrics (defaults sized for a 2-core CPU; see the module docstring)."""

    n_infidelity: int = 16
    occlusion: float = 0.25
    n_sensitivity: int = 2
    radius: float = 0.02
    sensitivity_masks: int | None = 16

    def __post_init__(self) -> None:
        for name in ("n_infidelity", "n_sensitivity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FaithfulnessError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.occlusion < 1:
            raise FaithfulnessError(f"occlusion must lie in (0, 1), got {self.occlusion!r}")
        if not self.radius > 0:
            raise FaithfulnessError(f"radius must be positive, got {self.radius!r}")
        masks = self.sensitivity_masks
        if masks is not None and (not isinstance(masks, int) or masks < 1):
            raise FaithfulnessError(f"sensitivity_masks must be None or >= 1, got {masks!r}")

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, eq=False)
class CaptumMetrics:
    """Captum's metrics of one utterance's maps: ``infidelity`` (maps, tokens), NaN for
    tokens not evaluated; ``sensitivity`` (maps,), NaN for ``"random"``."""

    utterance: str
    model: str
    task: str
    maps: tuple[str, ...]
    tokens: tuple[str, ...]
    infidelity: torch.Tensor
    sensitivity: torch.Tensor
    params: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per map: the mean infidelity over the evaluated tokens, the sensitivity
        and the number of tokens (``utterance, model, task, map, infidelity,
        sensitivity_max, tokens``)."""
        inf = self.infidelity.double().numpy()
        evaluated = np.isfinite(inf).any(0)
        rows = [
            {
                "utterance": self.utterance,
                "model": self.model,
                "task": self.task,
                "map": m,
                "infidelity": float(np.nanmean(inf[i])) if evaluated.any() else math.nan,
                "sensitivity_max": float(self.sensitivity[i]),
                "tokens": int(evaluated.sum()),
            }
            for i, m in enumerate(self.maps)
        ]
        return pd.DataFrame(rows)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        record = {
            "kind": "captum_metrics",
            "utterance": self.utterance,
            "model": self.model,
            "task": self.task,
            "maps": list(self.maps),
            "tokens": list(self.tokens),
            "params": self.params,
        }
        tensors = {
            "infidelity": self.infidelity.contiguous(),
            "sensitivity": self.sensitivity.contiguous(),
        }
        return tensors, record

    @classmethod
    def from_tensors(cls, tensors, record: dict) -> CaptumMetrics:
        return cls(
            utterance=record["utterance"],
            model=record["model"],
            task=record["task"],
            maps=tuple(record["maps"]),
            tokens=tuple(record["tokens"]),
            infidelity=tensors["infidelity"],
            sensitivity=tensors["sensitivity"],
            params=record["params"],
        )


def infidelities(
    probs,
    maps: dict[str, torch.Tensor],
    tokens: Sequence[int],
    n_enc: int,
    *,
    options: CaptumMetricOptions,
    seed: int = 0,
) -> torch.Tensor:
    """Captum's normalised infidelity of every map (and ``"random"``) for ``tokens``: shape =
    (maps, len(tokens)); the same occlusions for every map and token."""
    gen = torch.Generator().manual_seed(seed)
    n = options.n_infidelity
    drops = (torch.rand(n, n_enc, generator=gen) < options.occlusion).double()

    def perturb(inputs: torch.Tensor):
        if inputs.shape[0] % n:
            raise FaithfulnessError(f"infidelity asked for {inputs.shape[0]} perturbations")
        i = drops[torch.arange(inputs.shape[0]) % n]  # rows: example-major, as Captum repeats
        return i, inputs * (1 - i)

    x = torch.ones(len(tokens), n_enc, dtype=torch.float64)
    attributions = [m[list(tokens)].double() for m in maps.values()]
    attributions.append(torch.randn(len(tokens), n_enc, generator=gen, dtype=torch.float64))
    return torch.stack(
        [
            infidelity(
                probs, perturb, x, a, target=list(tokens), n_perturb_samples=n, normalize=True
            ).double()
            for a in attributions
        ]
    )


def sensitivities(
    loaded: LoadedModel,
    mel: torch.Tensor,
    explanation,
    tokens: Sequence[int],
    *,
    gradient=None,
    options: CaptumMetricOptions,
    seed: int = 0,
) -> torch.Tensor:
    """Captum's ``sensitivity_max`` of every map of :func:`time_maps` (and NaN for
    ``"random"``) over the rows ``tokens``: shape = (maps,)."""
    n_mel = explanation.input_saliency.shape[1]
    n_enc = explanation.encoder_saliency.shape[1]
    cells = mel[0, :, :n_mel].T[None].double().cpu()
    gen = torch.Generator().manual_seed(seed)
    n = options.n_sensitivity
    noise = torch.rand(n, *cells.shape[1:], generator=gen, dtype=torch.float64) * 2 - 1
    noise *= options.radius
    cache: dict[bytes, dict[str, torch.Tensor]] = {}

    def maps_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
        key = x.numpy().tobytes()
        if key not in cache:
            m = mel.clone()
            m[0, :, :n_mel] = x.mT.to(mel)
            again, grad = _recompute(
                loaded, m, explanation, gradient, n_mel, n_enc, options.sensitivity_masks
            )
            cache[key] = time_maps(again, gradient=grad)
        return cache[key]

    def perturb(inputs: torch.Tensor, radius: float) -> torch.Tensor:
        return inputs + noise[torch.arange(inputs.shape[0]) % n]

    names = list(time_maps(explanation, gradient=gradient))
    out = []
    for name in names:

        def explain(inputs, name=name):  # a tuple in, a tuple out: Captum's convention
            rows = inputs[0] if isinstance(inputs, tuple) else inputs
            expl = torch.stack([maps_of(x)[name][list(tokens)].double() for x in rows])
            return (expl,) if isinstance(inputs, tuple) else expl

        out.append(
            float(sensitivity_max(explain, cells, perturb_func=perturb, n_perturb_samples=n)[0])
        )
    return torch.tensor([*out, math.nan], dtype=torch.float64)


def _recompute(loaded, mel, explanation, gradient, n_mel: int, n_enc: int, n_masks):
    """(explanation, gradient) with every map recomputed on ``mel``."""
    tr = explanation.transcript
    with torch.no_grad():
        ca, logits = forward_attention(loaded, mel, tr)
    new = {"cross_attention": ca[..., :n_enc].contiguous()}
    if explanation.method == "spes":
        names = {f.name for f in fields(PerturbationOptions)}
        params = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in explanation.params.items()
            if k in names
        }
        options = PerturbationOptions(**params)
        options = replace(options, n_masks=n_masks or options.n_masks)
        seed = explanation.params.get("seed", 0)
        kw = dict(options=options, seed=seed, progress=False)
        # no waveform: the features themselves are perturbed
        prepared = Prepared(
            audio=np.zeros(0, np.float32), mel=mel, transcript=tr, logits=logits,
            cross_attention=new["cross_attention"], n_mel=n_mel, n_enc=n_enc,
        )  # fmt: skip
        new["input_saliency"] = input_spes_run(loaded, prepared, **kw).maps()[0]
        new["encoder_saliency"] = encoder_spes_run(loaded, prepared, **kw).maps()[0]
    else:
        new["input_saliency"], new["encoder_saliency"] = gradient_maps(
            loaded, mel, tr, n_mel, n_enc, method=explanation.method
        )
    grad = None
    if gradient is not None:
        sm_x, sm_h = gradient_maps(loaded, mel, tr, n_mel, n_enc, method=gradient.method)
        grad = replace(gradient, input_saliency=sm_x, encoder_saliency=sm_h)
    return replace(explanation, **new), grad


def captum_metrics(
    loaded: LoadedModel,
    audio,
    explanation,
    curves: Curves,
    *,
    gradient=None,
    options: CaptumMetricOptions = CaptumMetricOptions(),  # noqa: B008 (frozen)
    seed: int = 0,
) -> CaptumMetrics:
    """Infidelity and sensitivity of every map :func:`time_maps` ranks for ``explanation``,
    over the tokens its ``curves`` evaluated."""
    audio = load_audio(audio)
    tr = explanation.transcript
    if curves.transcript.output_ids != tr.output_ids or curves.utterance != explanation.utterance:
        raise FaithfulnessError("curves and explanation are of different utterances or texts")
    tokens = [t for t, e in enumerate(curves.evaluated) if e]
    maps = time_maps(explanation, gradient=gradient)
    mel = features(loaded, audio)
    n_enc, n_mel = loaded.family.n_enc_frames(audio), loaded.family.n_mel_frames(audio)
    inf = torch.full((len(maps) + 1, len(tr)), math.nan, dtype=torch.float64)
    sens = torch.full((len(maps) + 1,), math.nan, dtype=torch.float64)
    if tokens:
        probs = frame_probability_fn(loaded, mel, tr, n_mel)
        inf[:, tokens] = infidelities(probs, maps, tokens, n_enc, options=options, seed=seed)
        sens = sensitivities(
            loaded, mel, explanation, tokens, gradient=gradient, options=options, seed=seed
        )
    return CaptumMetrics(
        utterance=explanation.utterance,
        model=explanation.model,
        task=tr.task,
        maps=(*maps, RANDOM),
        tokens=tr.tokens,
        infidelity=inf.float(),
        sensitivity=sens.float(),
        params=options.params() | {"seed": seed},
    )


def captum_metrics_corpus(
    loaded: LoadedModel,
    explanations: Sequence,
    utterances: Sequence,
    curves: Sequence[Curves],
    *,
    store=None,
    gradients=None,
    options: CaptumMetricOptions = CaptumMetricOptions(),  # noqa: B008
    seed: int = 0,
    progress: bool = True,
) -> list[CaptumMetrics]:
    """:func:`captum_metrics` per explanation, with the matching curves (by utterance),
    reusing and filling ``store`` one utterance at a time."""
    from ..store import ResultStore

    by_id = {u.id: u for u in utterances}
    by_curves = {(c.utterance, c.transcript.task): c for c in curves}
    out = []
    for k, e in enumerate(tqdm(explanations, desc="captum metrics", disable=not progress)):
        grad = gradients[k] if gradients is not None else None
        c = by_curves.get((e.utterance, e.transcript.task))
        if c is None or e.utterance not in by_id:
            raise FaithfulnessError(f"no curves or utterance for {e.utterance!r}")
        params = {
            "kind": "captum_metrics",
            "explained": dict(e.params, method=e.method),
            "gradient": None if grad is None else dict(grad.params, method=grad.method),
            "curves": c.params,
            "text": e.transcript.text,
            **options.params(),
            "seed": seed,
        }
        key = ResultStore.key(
            model=e.model, utterance=e.utterance, method="captum_metrics", params=params
        )
        if store is not None and store.has(key):
            out.append(CaptumMetrics.from_tensors(*store.get(key)))
            continue
        result = captum_metrics(
            loaded, by_id[e.utterance].load(), e, c, gradient=grad, options=options, seed=seed
        )
        if store is not None:
            store.put(key, *result.to_tensors())
        out.append(result)
    return out


def captum_table(
    results: Sequence[CaptumMetrics],
    *,
    by: Sequence[str] = ("model", "task", "map"),
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Corpus means of ``infidelity`` and ``sensitivity_max`` per group, 95% bootstrap CIs over
    utterances, in :func:`~xattn_utils.analysis.faithfulness.faithfulness_table`'s tidy form
    (``measure, mean, low, high, n, tokens``); groups without a finite value (random's sensitivity)
    are left out."""
    by = list(by)
    per_utt = pd.concat([r.to_frame() for r in results], ignore_index=True)
    rows = []
    for group, g in per_utt.groupby(by, sort=False):
        labels = dict(zip(by, group if isinstance(group, tuple) else (group,), strict=True))
        for measure in METRICS:
            est = bootstrap_ci(g[measure].to_numpy(), n_boot=n_boot, seed=seed)
            if est.n:
                rows.append(
                    labels
                    | {
                        "measure": measure,
                        "mean": est.mean,
                        "low": est.low,
                        "high": est.high,
                        "n": est.n,
                        "tokens": int(g["tokens"].sum()),
                    }
                )
    return pd.DataFrame(rows, columns=[*by, "measure", "mean", "low", "high", "n", "tokens"])

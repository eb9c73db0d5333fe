"""Word timings scored against gold word boundaries, per utterance and over a corpus.

:func:`score_timings` matches predicted words (from :mod:`xattn_utils.analysis.timing`, or any
objects with ``word, start, end``) to gold ones by normalised text and gives their boundary errors
(:class:`TimingScore`); :func:`pool_scores` pools utterances and :func:`pooled_rate_ci` gives the
pooled share within a tolerance a CI over utterances.

Corpus level (notebook 04): :func:`timing_table` times every explanation's words from CA views
and saliency maps and scores them against gold (:func:`score_timings`); :func:`timing_summary`
gives means with bootstrap CIs over utterances;
:func:`~xattn_utils.reference.whisper.whisper_words` and
:func:`~xattn_utils.reference.whisper.whisper_comparison` set our alignment-head times next to
``transcribe()``'s.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ..maps.views import ALIGNMENT, ALL, View, is_ca, parse
from .compare import pool_to_enc
from .stats import Estimate, bootstrap_ci
from .timing import TimingOptions, WordTiming, word_timings

if TYPE_CHECKING:
    from ..maps.explanation import Explanation


# -- scoring against gold word boundaries -------------------------------------------------------


@dataclass(frozen=True)
class TimingScore:
    """Boundary errors of predicted words against gold words, matched by normalised text.

    ``start_errors`` / ``end_errors``: predicted minus gold, seconds, one per matched boundary.
    ``n_gold`` / ``n_predicted``: boundaries that could be scored (2 per word, minus skipped
    first starts); unmatched words count as misses. Pool utterances with :func:`pool_scores`.
    """

    start_errors: tuple[float, ...]
    end_errors: tuple[float, ...]
    n_gold: int
    n_predicted: int
    n_gold_words: int
    n_predicted_words: int
    n_matched_words: int

    def mae_ms(self, which: Literal["all", "start", "end"] = "all") -> float:
        """Mean absolute error of the matched boundaries (``bias_ms``: the signed mean)."""
        e = {"start": self.start_errors, "end": self.end_errors}.get(which, self.errors)
        return float(np.mean(np.abs(e)) * 1000) if len(e) else float("nan")

    @property
    def errors(self) -> np.ndarray:
        return np.array(self.start_errors + self.end_errors, dtype=float)

    @property
    def bias_ms(self) -> float:
        return float(self.errors.mean() * 1000) if len(self.errors) else float("nan")

    def hits(self, tolerance_ms: float) -> int:
        """Matched boundaries within ``tolerance_ms`` of gold (inclusive)."""
        return int((np.abs(self.errors) * 1000 <= tolerance_ms + 1e-6).sum())

    def rates(self, tolerance_ms: float) -> tuple[float, float, float]:
        """(precision, recall, F1) of boundaries within ``tolerance_ms`` (inclusive); recall is
        the share of gold boundaries hit."""
        hits = self.hits(tolerance_ms)
        nan = float("nan")
        total = self.n_gold + self.n_predicted
        return (
            hits / self.n_predicted if self.n_predicted else nan,
            hits / self.n_gold if self.n_gold else nan,
            2 * hits / total if total else nan,
        )

    def to_frame(self, tolerances_ms: Sequence[float] = (50, 100)) -> pd.DataFrame:
        row = {k: v for k, v in asdict(self).items() if not k.endswith("errors")}
        row.update(mae_ms=self.mae_ms(), mae_start_ms=self.mae_ms("start"))
        row.update(mae_end_ms=self.mae_ms("end"), bias_ms=self.bias_ms)
        for tol in tolerances_ms:
            p, r, f = self.rates(tol)
            row.update({f"within_{tol:g}ms": r, f"precision_{tol:g}ms": p, f"f1_{tol:g}ms": f})
        return pd.DataFrame([row])


def normalize_word(word: str) -> str:
    """Lower case, letters and digits only (punctuation, apostrophes and spaces dropped)."""
    return "".join(ch for ch in word.lower() if ch.isalnum())


def normalized_words(words: Iterable) -> list[tuple[str, float, float]]:
    """(normalised text, start, end) of objects with ``word, start, end`` or such dicts."""
    out = [(w["word"], w["start"], w["end"]) if isinstance(w, Mapping) else
           (w.word, w.start, w.end) for w in words]  # fmt: skip
    return [(normalize_word(w), float(a), float(b)) for w, a, b in out if normalize_word(w)]


def match_words(a: list[tuple], b: list[tuple]) -> list[tuple[int, int]]:
    """Index pairs of equal words in two :func:`_words` lists (``difflib``, no junk heuristic)."""
    matcher = difflib.SequenceMatcher(None, [w for w, *_ in a], [w for w, *_ in b], False)
    return [(m.a + k, m.b + k) for m in matcher.get_matching_blocks() for k in range(m.size)]


def score_timings(
    predicted: Iterable, gold: Iterable, *, skip_first_start: bool = False
) -> TimingScore:
    """Score predicted word times against gold ones (objects with ``word, start, end`` such as
    :class:`WordTiming` and ``data.Word``, or dicts as in ``.words.json``).

    Words are matched by normalised text (:func:`normalize_word`; words that normalise to "" are
    dropped) with ``difflib.SequenceMatcher``; each matched pair gives a start and an end error.
    ``skip_first_start`` leaves out the start of the first gold and first predicted word (forced
    alignments that fold the leading silence into the first word, such as LJSpeech's).
    """
    pred, ref = normalized_words(predicted), normalized_words(gold)
    pairs = match_words(pred, ref)
    skip = int(skip_first_start)
    return TimingScore(
        start_errors=tuple(pred[p][1] - ref[g][1] for p, g in pairs if not (skip and 0 in (p, g))),
        end_errors=tuple(pred[p][2] - ref[g][2] for p, g in pairs),
        n_gold=2 * len(ref) - (skip if ref else 0),
        n_predicted=2 * len(pred) - (skip if pred else 0),
        n_gold_words=len(ref),
        n_predicted_words=len(pred),
        n_matched_words=len(pairs),
    )


def pool_scores(scores: Iterable[TimingScore]) -> TimingScore:
    """One score over many utterances: boundaries and counts pooled (not a mean of means)."""
    scores = list(scores)
    fields = [f for f in TimingScore.__dataclass_fields__ if not f.endswith("errors")]
    return TimingScore(
        start_errors=tuple(e for s in scores for e in s.start_errors),
        end_errors=tuple(e for s in scores for e in s.end_errors),
        **{f: sum(getattr(s, f) for s in scores) for f in fields},
    )


def pooled_rate_ci(
    scores: Sequence[TimingScore],
    tolerance_ms: float,
    *,
    baseline: Sequence[TimingScore] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The pooled share of gold boundaries within ``tolerance_ms`` (:func:`pool_scores`) with a
    percentile bootstrap CI that resamples utterances (one score each); with ``baseline`` (the
    same utterances, another method), the paired difference ``scores - baseline``."""

    def counts(group: Sequence[TimingScore]) -> np.ndarray:  # (utterances, [hits, gold])
        return np.array([[s.hits(tolerance_ms), s.n_gold] for s in group], dtype=float)

    a, b = counts(scores), None if baseline is None else counts(baseline)

    def rate(idx: np.ndarray) -> np.ndarray:
        out = a[idx, 0].sum(-1) / a[idx, 1].sum(-1)
        return out if b is None else out - b[idx, 0].sum(-1) / b[idx, 1].sum(-1)

    n = len(scores)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0, level)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    low, high = np.quantile(rate(idx), [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(rate(np.arange(n))), float(low), float(high), n, 0, level)


# -- corpus tables ------------------------------------------------------------------------------

LAYERS = "CA layers"  # every "CA L{l}", reduced to "CA best layer" by timing_table
BEST_LAYER = "CA best layer"
MAPS = (ALIGNMENT, ALL, LAYERS, "SM_H", "SM_X")
METRICS = ("within_100ms", "within_50ms", "mae_ms", "bias_ms", "f1_100ms", "f1_50ms")
WHISPER = "whisper transcribe()"
_RANKS = {
    "subset": {"all": 0, "synthetic": 1, "real": 2},
    "map": {m: i for i, m in enumerate([ALIGNMENT, ALL, BEST_LAYER, "SM_H", "SM_X"])},
}


def explanation_timings(
    explanation: Explanation, *, maps: Sequence[str] = MAPS
) -> dict[str, list[WordTiming]]:
    """Word timings of one explanation from each of ``maps``: CA view labels (``"CA alignment
    heads"``: whisper's, ``"CA all heads"``, ``"CA L3"``...; see :mod:`xattn_utils.maps.views`),
    ``"CA layers"`` (every ``"CA L{l}"``), ``"SM_H"`` and ``"SM_X"`` (max-pooled to enc frames).
    CA heads are each normalised and filtered alone, as whisper does. Saliency maps enter as
    ``|map|``, each row then normalised to sum 1 like a CA row. The alignment heads are skipped
    when the model has none."""
    e, ca = explanation, explanation.cross_attention
    opts = TimingOptions(enc_frame_seconds=e.enc_frame_seconds)
    ca_maps = [m for m in maps if is_ca(m) and m != LAYERS]
    if LAYERS in maps:
        ca_maps += [View.of_layer(ly).label for ly in range(ca.shape[0])]
    if not e.alignment_heads:
        ca_maps = [m for m in ca_maps if m != ALIGNMENT]
    out = {
        name: word_timings(ca, e.transcript, heads=View.alignment(e.alignment_heads)
                           if name == ALIGNMENT else name, options=opts)
        for name in ca_maps
    }  # fmt: skip
    saliency = {
        "SM_H": lambda: e.encoder_saliency,
        "SM_X": lambda: pool_to_enc(e.input_saliency, factor=e.enc_subsampling),
    }
    for name in [m for m in maps if m in saliency]:
        out[name] = word_timings(saliency[name]().abs(), e.transcript, options=opts)
    return out


def _skip_reason(explanation: Explanation, utterance) -> str | None:
    if explanation.params.get("task", "transcribe") == "translate":
        return "translation: the gold words are in the source language"
    return None if utterance is not None and utterance.words else "no gold word timings"


def timing_table(
    explanations: Sequence[Explanation],
    utterances: Sequence,
    *,
    maps: Sequence[str] = MAPS,
    extra: Mapping[str, Mapping[str, Sequence]] | None = None,
    best_layer_by: str | None = "within_100ms",
) -> pd.DataFrame:
    """Word timings of every explanation and map (:func:`explanation_timings`) scored against
    the gold words of its utterance: one row per (utterance, map) with ``model, task, language,
    subset, utterance, map, layer``, the :meth:`TimingScore.to_frame` columns and ``score``
    (the :class:`TimingScore`).

    ``extra``: more predictions as ``{map: {utterance id: words}}`` (e.g.
    :func:`~xattn_utils.reference.whisper.whisper_words`).
    ``best_layer_by``: the ``"CA L{l}"`` rows of each model and task are replaced by those of
    the layer with the highest mean of this rate over the table's utterances, as ``map = "CA
    best layer"`` (``layer`` says which; NA on other rows): selected on the data it is scored on, so
    optimistic; ``None`` keeps every layer. Translations and utterances without gold words are
    left out; ``table.attrs["skipped"]`` maps ``model/task/utterance`` to the reason.
    """
    by_id = {u.id: u for u in utterances}
    rows, skipped = [], {}
    for e in explanations:
        utt, task = by_id.get(e.utterance), e.params.get("task", "transcribe")
        if reason := _skip_reason(e, utt):
            skipped[f"{e.model}/{task}/{e.utterance}"] = reason
            continue
        labels = {"model": e.model, "task": task, "language": e.transcript.language}
        labels |= {"subset": utt.subset or "unknown", "utterance": e.utterance}
        predicted = explanation_timings(e, maps=maps)
        predicted |= {k: v[e.utterance] for k, v in (extra or {}).items() if e.utterance in v}
        for name, words in predicted.items():
            score = score_timings(words, utt.words, skip_first_start=utt.skip_first_start)
            scores = score.to_frame().to_dict("records")[0] | {"score": score}
            rows.append(labels | {"map": name, "layer": _layer_of(name)} | scores)
    table = pd.DataFrame(rows)
    if "layer" in table:
        table["layer"] = table["layer"].astype("Int64")
    if best_layer_by and len(table):
        table = _best_layer(table, best_layer_by)
    table.attrs["skipped"] = skipped
    return table


def _layer_of(name: str) -> int | None:
    """The layer of a ``"CA L{l}"`` map label, else None."""
    try:
        view = parse(name)
    except ValueError:
        return None
    return view.layer if view.kind == "layer" else None


def _best_layer(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Keep the ``"CA L{l}"`` rows of the best layer per model and task, as "CA best layer"."""
    layer = table["map"].str.fullmatch(r"CA L\d+")
    means = table[layer].groupby(["model", "task", "map"], sort=False)[metric].mean()
    best = set(means.groupby(level=["model", "task"], sort=False).idxmax())
    keys = zip(table["model"], table["task"], table["map"], strict=True)
    chosen = layer & np.array([key in best for key in keys])
    table = table[~layer | chosen].reset_index(drop=True)
    table.loc[chosen[~layer | chosen].to_numpy(), "map"] = BEST_LAYER
    return table


def timing_summary(
    table: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "task", "subset", "map", "layer"),
    metrics: Sequence[str] = METRICS,
    overall: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """A long table, one row per ``by`` group and metric (:meth:`TimingScore.to_frame` names:
    ``within_100ms`` is the share of gold boundaries within 100 ms, ``f1_100ms`` its tolerance
    F1, ``mae_ms``, ``bias_ms`` > 0 late): ``mean`` over utterances with a 95% percentile
    bootstrap CI (``low, high``) over ``n`` utterances (``n_nan``: those without a value),
    ``pooled`` (all boundaries of the group pooled, :func:`pool_scores`) and the group's
    ``n_words`` (gold) and ``n_matched_words``. ``overall`` adds ``subset == "all"``."""
    columns = [*by, "metric", "mean", "low", "high", "n", "n_nan", "pooled", "n_words"]
    if table.empty:
        return pd.DataFrame(columns=[*columns, "n_matched_words"])
    if overall and "subset" in by:
        table = pd.concat([table.assign(subset="all"), table], ignore_index=True)
    rows = []
    for key, group in table.groupby(list(by), sort=False, dropna=False):
        pooled = pool_scores(group["score"]).to_frame().iloc[0]
        for metric in metrics:
            est = bootstrap_ci(group[metric].to_numpy(float), n_boot=n_boot, seed=seed)
            rows.append(dict(zip(by, key, strict=True)) | {"metric": metric, "mean": est.mean}
                        | {"low": est.low, "high": est.high, "n": est.n, "n_nan": est.n_nan}
                        | {"pooled": pooled[metric], "n_words": int(pooled["n_gold_words"]),
                           "n_matched_words": int(pooled["n_matched_words"])})  # fmt: skip
    ranks = _RANKS | {"metric": {m: i for i, m in enumerate(metrics)}}
    return (
        pd.DataFrame(rows)
        .sort_values(
            [*by, "metric"],
            key=lambda col: col.map(ranks[col.name]).fillna(99) if col.name in ranks else col,
            kind="stable",
        )
        .reset_index(drop=True)
    )


def boundary_errors(table: pd.DataFrame) -> pd.DataFrame:
    """One row per matched boundary of a :func:`timing_table`: its labels, ``boundary``
    ("start" or "end") and ``error_ms`` (predicted minus gold, > 0 late)."""
    labels = [c for c in ("model", "task", "subset", "utterance", "map", "layer") if c in table]
    if "score" not in table:  # an empty timing_table
        return pd.DataFrame(columns=[*labels, "boundary", "error_ms"])
    rows = [
        dict(zip(labels, values, strict=True)) | {"boundary": which, "error_ms": 1000 * err}
        for values, score in zip(table[labels].itertuples(index=False), table["score"], strict=True)
        for which in ("start", "end")
        for err in getattr(score, f"{which}_errors")
    ]
    return pd.DataFrame(rows, columns=[*labels, "boundary", "error_ms"])

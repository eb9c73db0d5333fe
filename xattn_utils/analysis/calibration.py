"""Head weights and offsets for word timestamps, learned from a labelled corpus.

:func:`fit_calibration` ranks every (layer, head) by how well its map alone times the words of
the fit set (share of gold boundaries within 100 ms, then 50 ms, pooled over utterances), keeps
the top ``k`` heads (``k`` chosen on the same fit set), then sets constant start and end offsets
to the median start and end errors of those heads. :func:`calibrate` does it for a corpus and
returns a :class:`Calibration` (``xattn calibrate`` writes it as JSON; :func:`load_calibration`
reads it back, or the one shipped for a bundled model). Fitted on labelled data, so score it out
of sample: :func:`leave_one_out` refits without each utterance in turn and scores that utterance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..maps.views import View
from ..model.loading import LoadedModel
from .alignment import Alignment, align_inputs, timings_from_alignment
from .boundaries import SnapOptions
from .timestamp_methods import get_method
from .timestamps import TimingScore, pool_scores, score_timings

METHOD_NAMES = (
    "whisper", "all-heads", "all-heads-refined", "all-heads-snap", "chars", "chars-refined",
    "chars-guided",
)  # fmt: skip
OBJECTIVE = (100.0, 50.0)  # rank by share within 100 ms, ties by share within 50 ms


# -- calibration files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Heads and constant offsets learned on a labelled corpus (:func:`fit_calibration`).

    ``heads``: (layer, head) pairs; ``offsets``: seconds added to word starts and ends;
    ``method``: the base method they were learned for; ``fitted_on``: utterance ids used.
    """

    model: str
    heads: tuple[tuple[int, int], ...]
    offsets: tuple[float, float]
    method: str = "chars-refined"
    fitted_on: tuple[str, ...] = ()
    notes: str = ""

    def to_json(self) -> str:
        d = {"model": self.model, "method": self.method, "heads": [list(h) for h in self.heads]}
        d |= {"offsets": list(self.offsets), "fitted_on": list(self.fitted_on)}
        return json.dumps(d | {"notes": self.notes}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        return cls(
            model=d["model"],
            heads=tuple((int(a), int(b)) for a, b in d["heads"]),
            offsets=(float(d["offsets"][0]), float(d["offsets"][1])),
            method=d.get("method", "chars-refined"),
            fitted_on=tuple(d.get("fitted_on", ())),
            notes=d.get("notes", ""),
        )


CALIBRATION_DIR = Path(__file__).resolve().parent / "calibrations"


def load_calibration(source: LoadedModel | str | os.PathLike) -> Calibration:
    """A calibration JSON file, or the one shipped for a bundled model (by its name)."""
    if isinstance(source, LoadedModel):
        source = source.name
    path = Path(source)
    if not path.is_file():
        path = CALIBRATION_DIR / f"{source}.json"
    if not path.is_file():
        raise ValueError(
            f"no calibration for {source!r}: learn one with `xattn calibrate --model "
            f"{source} --data DIR` (a corpus with .words.json word boundaries)"
        )
    return Calibration.from_json(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class LabelledAlignment:
    """An :class:`Alignment` with the gold words of its utterance."""

    id: str
    alignment: Alignment
    gold: tuple
    skip_first_start: bool = False

    def score(self, words) -> TimingScore:
        return score_timings(words, self.gold, skip_first_start=self.skip_first_start)


def _pooled(
    items: Sequence[LabelledAlignment], method: str, heads, offsets=(0.0, 0.0)
) -> TimingScore:
    m = get_method(method)
    return pool_scores(
        item.score(timings_from_alignment(item.alignment, m, heads=heads, offsets=offsets))
        for item in items
    )


def _objective(score: TimingScore) -> tuple[float, ...]:
    return tuple(score.rates(tol)[1] for tol in OBJECTIVE) + (-score.mae_ms(),)


def fit_calibration(
    items: Sequence[LabelledAlignment],
    *,
    model: str,
    method: str = "chars-refined",
    max_heads: int = 8,
) -> Calibration:
    """Heads and offsets for ``method`` that time the words of ``items`` best (in sample)."""
    if not items:
        raise ValueError("calibration needs at least one utterance with gold word timings")
    scores = items[0].alignment.ca.scores
    single = {
        h: _objective(_pooled(items, method, [h])) for h in View.all().pairs(*scores.shape[:2])
    }
    ranked = sorted(single, key=single.get, reverse=True)
    best_k = max(range(1, max_heads + 1),
                 key=lambda k: _objective(_pooled(items, method, ranked[:k])))  # fmt: skip
    heads = ranked[:best_k]
    pooled = _pooled(items, method, heads)
    offsets = (
        -float(np.median(pooled.start_errors)) if pooled.start_errors else 0.0,
        -float(np.median(pooled.end_errors)) if pooled.end_errors else 0.0,
    )
    return Calibration(
        model=model,
        heads=tuple(heads),
        offsets=offsets,
        method=method,
        fitted_on=tuple(item.id for item in items),
        notes=f"top {best_k} of {len(ranked)} heads by single-head share within 100 ms; "
        "offsets: minus the median start and end errors (in sample)",
    )


def leave_one_out(
    items: Sequence[LabelledAlignment],
    *,
    method: str = "chars-refined",
    max_heads: int = 8,
    snap: SnapOptions | None = None,
) -> dict[str, TimingScore]:
    """Out-of-sample scores: each utterance timed with a calibration fitted on all the others
    (``snap``: its boundaries then snapped to the audio, as ``method="calibrated"`` does)."""
    out = {}
    timing = replace(get_method(method), snap=snap)
    for i, item in enumerate(items):
        rest = [x for j, x in enumerate(items) if j != i]
        cal = fit_calibration(rest, model="", method=method, max_heads=max_heads)
        words = timings_from_alignment(item.alignment, timing, heads=cal.heads, offsets=cal.offsets)
        out[item.id] = item.score(words)
    return out


def labelled_alignments(
    loaded: LoadedModel,
    utterances: Sequence,
    *,
    method: str = "chars-refined",
    progress: bool = False,
    use_reference_text: bool = False,
    cache: Callable[[str, Callable[[], Alignment]], Alignment] | None = None,
) -> list[LabelledAlignment]:
    """Align every utterance with gold words (transcription, English unless it says otherwise)
    with ``method``'s unit: its greedy decode, or its reference text (``use_reference_text``);
    guided by the token alignment when ``method`` needs it. ``cache(key, compute)`` may memoise
    the alignments."""
    unit = get_method(method).unit
    guide = unit == "chars" and get_method(method).guide_band_s is not None
    out = []
    for utt in tqdm(utterances, desc=f"aligning {loaded.name}", disable=not progress):
        if not utt.words:
            continue
        language = (utt.language or "en") if loaded.multilingual else None

        def compute(utt=utt, language=language) -> Alignment:
            text = utt.text if use_reference_text else None
            return align_inputs(
                loaded, utt.load(), unit=unit, text=text, language=language, guide=guide
            )

        key = f"{loaded.name}/{unit}{'+guide' if guide else ''}/{utt.id}"
        al = cache(key, compute) if cache else compute()
        out.append(LabelledAlignment(utt.id, al, tuple(utt.words), utt.skip_first_start))
    if not out:
        raise ValueError("none of the utterances has gold word timings (.words.json)")
    return out


def calibrate(
    loaded: LoadedModel,
    utterances: Sequence,
    *,
    method: str = "chars-refined",
    max_heads: int = 8,
    progress: bool = False,
) -> Calibration:
    """Learn a :class:`Calibration` for ``loaded`` from ``utterances`` with gold word times."""
    items = labelled_alignments(loaded, utterances, method=method, progress=progress)
    return fit_calibration(items, model=loaded.name, method=method, max_heads=max_heads)


def method_table(
    loaded: LoadedModel,
    utterances: Sequence,
    *,
    methods: Sequence[str] = METHOD_NAMES,
    loo: bool = True,
    use_reference_text: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Every timestamp method scored on every utterance with gold words: one row per
    (utterance, method) shaped like :func:`~xattn_utils.analysis.timestamps.timing_table` (``map``
    is the method), so :func:`~xattn_utils.analysis.timestamps.timing_summary` gives means with
    bootstrap CIs. ``loo`` adds ``"calibrated (LOO)"``: heads and offsets refitted without each
    utterance, boundaries snapped as ``method="calibrated"`` does."""
    units = {get_method(m).unit for m in methods} | ({"chars"} if loo else set())
    by_unit = {
        unit: labelled_alignments(
            loaded,
            utterances,
            method=_unit_method(unit),
            progress=progress,
            use_reference_text=use_reference_text,
        )
        for unit in sorted(units)
    }
    subsets = {u.id: u.subset or "unknown" for u in utterances}
    scores: dict[str, dict[str, TimingScore]] = {}
    for m in methods:
        items = by_unit[get_method(m).unit]
        scores[m] = {
            x.id: x.score(timings_from_alignment(x.alignment, get_method(m))) for x in items
        }
    if loo and len(by_unit["chars"]) > 1:
        scores["calibrated (LOO)"] = leave_one_out(
            by_unit["chars"], snap=get_method("calibrated").snap
        )
    rows = []
    for name, per_utt in scores.items():
        for uid, score in per_utt.items():
            labels = {"model": loaded.name, "task": "transcribe", "subset": subsets[uid]}
            labels |= {"utterance": uid, "map": name, "layer": None}
            rows.append(labels | score.to_frame().to_dict("records")[0] | {"score": score})
    return pd.DataFrame(rows)


def _unit_method(unit: str) -> str:
    return "chars-guided" if unit == "chars" else "whisper"  # chars: guided, for chars-guided

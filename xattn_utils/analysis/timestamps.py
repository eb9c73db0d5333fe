"""Word timestamps from cross-attention, or from any (tokens, enc_frames) map, the Whisper way.

:func:`word_timings` follows openai-whisper's ``timing.find_alignment`` (release 20250625):

1. maps of the chosen heads, shape = (heads, tokens, enc_frames), each row a distribution over
   the speech frames. Whisper softmaxes the logits over the first ``num_frames // 2`` enc frames;
   our CA was softmaxed over all 1500 and cropped, so rows are renormalised to sum 1
   (``row_norm="sum"``): the same numbers;
2. z-normalise each head **per enc frame, over the tokens** (whisper's ``std_mean(dim=-2)``; the
   issue and study notes say "over frames", the code says otherwise and we follow the code);
   all rows take part, prompt outputs included;
3. median filter along time, width 7, torch "reflect" padding (= scipy.ndimage "mirror");
4. mean over heads;
5. keep the rows of the text tokens and of the ``eot`` after them (it marks where the last word
   ends) and run :func:`dtw` on the negated matrix;
6. a token starts at the first enc frame where the path enters its row; tokens join into words
   (a token that starts with a space, is punctuation or is special starts a word: whisper's
   ``split_tokens_on_spaces``, done on decoded token strings); a word ends where the next starts;
7. punctuation joins its neighbour (:func:`merge_punctuations`), which keeps its own times.

Not reproduced, on purpose: ``transcribe()``'s heuristics in ``add_word_timestamps`` (clipping
words longer than twice the median duration next to sentence ends and after pauses, snapping the
first and last words to the segment timestamps of a timestamp-mode decode, rounding to 10 ms).
Against openai-whisper on the same weights, tests/test_timestamps.py measures the remaining gap.

Corpus level (notebook 04): :func:`timing_table` times every explanation's words from CA views
and saliency maps and scores them against gold (:func:`score_timings`); :func:`timing_summary`
gives means with bootstrap CIs over utterances;
:func:`~xattn_utils.reference.whisper.whisper_words` and
:func:`~xattn_utils.reference.whisper.whisper_comparison` set our alignment-head times next to
``transcribe()``'s.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..audio import ENC_FRAME_SECONDS
from ..maps.attention import CrossAttention
from ..maps.views import ALIGNMENT, ALL, View, is_ca, parse
from ..maps.views import stack as stack_heads
from ..model.decode import Transcript
from .compare import pool_to_enc
from .stats import bootstrap_ci

if TYPE_CHECKING:
    from ..maps.explanation import Explanation

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
MapLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class TimingOptions:
    """Knobs of :func:`word_timings`; the defaults are openai-whisper's."""

    medfilt_width: int = 7
    row_norm: Literal["sum"] | None = "sum"  # None for signed maps
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    split_on_spaces: bool = True  # False: every token is a word (whisper's zh/ja/th/lo/my/yue)
    enc_frame_seconds: float = ENC_FRAME_SECONDS


@dataclass(frozen=True)
class WordTiming:
    """One word: text as decoded (leading space kept, like whisper), start and end in seconds,
    its tokens and their rows in the map, mean token probability when given. Punctuation merged
    into a word does not change its times (whisper): " cat," ends where "," starts."""

    word: str
    start: float
    end: float
    tokens: tuple[str, ...]
    rows: tuple[int, ...]
    probability: float | None = None

    def to_frame(self) -> pd.DataFrame:
        return timings_frame([self])


def timings_frame(words: Iterable[WordTiming], **labels) -> pd.DataFrame:
    """Tidy frame, one row per word: ``index, word, start, end, duration, n_tokens,
    probability`` and the constant ``labels`` columns (``utterance=..., map=...``)."""
    cols = ["index", "word", "start", "end", "duration", "n_tokens", "probability"]
    rows = [(i, w.word.strip(), w.start, w.end, w.end - w.start, len(w.tokens), w.probability)
            for i, w in enumerate(words)]  # fmt: skip
    return pd.DataFrame(rows, columns=cols).assign(**labels)


# -- the algorithm ------------------------------------------------------------------------------


def median_filter(x: MapLike, width: int = 7) -> MapLike:
    """Whisper's median filter along the last axis: reflect padding without repeating the edge
    (torch ``"reflect"``, scipy ``"mirror"``); inputs no longer than ``width // 2`` come back
    unchanged, as in whisper. Returns the input's type."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"the filter width must be a positive odd number, got {width}")
    t = torch.as_tensor(x)
    pad = width // 2
    if t.shape[-1] <= pad or width == 1:
        return x
    flat = t.reshape(-1, 1, t.shape[-1])
    out = F.pad(flat, (pad, pad), mode="reflect").unfold(-1, width, 1).sort()[0][..., pad]
    out = out.reshape(t.shape)
    return out.numpy() if isinstance(x, np.ndarray) else out


def dtw(cost: MapLike) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotone path through ``cost`` shape = (tokens, frames), from (0, 0) to the
    last cell, with diagonal, down and right steps. Returns (text_indices, time_indices), one entry
    per path cell. A numpy port of whisper's ``dtw_cpu`` with its tie-breaking (diagonal or down
    only when strictly cheaper), vectorised over anti-diagonals. Costs accumulate in float64: the
    numba-compiled original types ``np.ones(..., float32) * np.inf`` as float64 (plain numpy would
    keep float32), and paths through exact ties differ between the two."""
    x = np.asarray(cost, dtype=np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"cost must be a non-empty (tokens, frames) matrix, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("cost holds NaN or infinite values")
    n, m = x.shape
    acc = np.full((n + 1, m + 1), np.inf)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    acc[0, 0] = 0
    for k in range(2, n + m + 1):  # cells (i, j) with i + j = k depend only on k-1 and k-2
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        acc[i, j] = x[i - 1, j - 1] + np.choose(t, (c0, c1, c2))
        trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    text, time = np.array(path[::-1]).T
    return text, time


def timing_matrix(
    maps: MapLike, *, medfilt_width: int = 7, row_norm: Literal["sum"] | None = "sum"
) -> torch.Tensor:
    """Steps 1-4: row normalisation, z-score per frame over tokens, median filter, mean over heads.

    ``maps`` shape = (heads, tokens, enc_frames) or (tokens, enc_frames) -> (tokens, enc_frames),
    float32. Constant frames (std 0) become 0 where whisper would give NaN.
    """
    w = torch.as_tensor(maps).detach().float().cpu()
    w = w[None] if w.ndim == 2 else w
    if w.ndim != 3 or 0 in w.shape:
        raise ValueError(f"need (heads, tokens, enc_frames) maps, got {tuple(w.shape)}")
    if row_norm == "sum":
        if (w < 0).any():
            raise ValueError("row_norm='sum' needs a non-negative map; use row_norm=None")
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.zeros_like(w))
    elif row_norm is not None:
        raise ValueError(f"row_norm must be 'sum' or None, got {row_norm!r}")
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, correction=0)
    w = torch.where(std > 0, (w - mean) / std, torch.zeros_like(w))
    return median_filter(w, medfilt_width).mean(0)


def split_words(tokens: Sequence[str], special: Sequence[bool], *, on_spaces: bool = True):
    """Group tokens into words like whisper's ``split_tokens_on_spaces``: a token starts a new
    word if it is special, starts with a space or is punctuation. Returns [(word, [indices])].
    Multi-byte characters split over tokens keep their U+FFFD pieces (no tokenizer here)."""
    words: list[tuple[str, list[int]]] = []
    for i, (tok, sp) in enumerate(zip(tokens, special, strict=True)):
        new = sp or not on_spaces or tok.startswith(" ") or tok.strip() in string.punctuation
        if new or not words:
            words.append((tok, [i]))
        else:
            words[-1] = (words[-1][0] + tok, words[-1][1] + [i])
    return words


def merge_punctuations(words: list[str], tokens: list[list], prepended: str, appended: str) -> None:
    """Whisper's ``merge_punctuations``, in place on parallel lists of word texts and token lists:
    opening punctuation joins the following word, closing punctuation the previous one. The word
    joined keeps its times; the emptied entry is left as ``""`` with no tokens."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i].startswith(" ") and words[i].strip() in prepended:
            words[j], tokens[j] = words[i] + words[j], tokens[i] + tokens[j]
            words[i], tokens[i] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i].endswith(" ") and words[j] in appended:
            words[i], tokens[i] = words[i] + words[j], tokens[i] + tokens[j]
            words[j], tokens[j] = "", []
        else:
            i = j
        j += 1


def _stack(scores, heads) -> torch.Tensor:
    """Maps (tokens, enc_frames) or (maps, tokens, enc_frames), or the ``heads`` of a CA."""
    if isinstance(scores, CrossAttention) or torch.as_tensor(scores).ndim == 4:
        view = View.all() if heads is None else View.alignment() if heads == "alignment" else heads
        return stack_heads(scores, view).float().cpu()  # whisper's (layer, head) order
    t = torch.as_tensor(scores).detach().float().cpu()
    if t.ndim not in (2, 3):
        raise ValueError(f"need CA (layers, heads, tokens, enc_frames) or maps, got {t.shape}")
    return t


def word_timings(
    scores: CrossAttention | MapLike,
    transcript: Transcript | Sequence[str] | None = None,
    *,
    heads: Iterable[tuple[int, int]] | str | None = "alignment",
    special: Sequence[bool] | None = None,
    probabilities: Sequence[float] | None = None,
    options: TimingOptions = TimingOptions(),  # noqa: B008 (frozen)
) -> list[WordTiming]:
    """Word start and end times from cross-attention or any (tokens, enc_frames) map.

    ``scores``: a :class:`CrossAttention` (its transcript is used; ``heads``: ``"alignment"``,
    ``None`` for all, (layer, head) pairs or a :class:`~xattn_utils.maps.views.View` or its label,
    each head normalised and filtered on its own, as whisper does), a CA tensor (layers, heads,
    tokens, enc_frames) with explicit ``heads``, or a map (tokens, enc_frames) such as a CA
    view, SM_H or ``compare.pool_to_enc(SM_X)``, or a stack of maps (maps, tokens, enc_frames).
    Rows are output tokens (see :mod:`xattn_utils.model.decode`); the time axis starts at 0 s and
    should stop at the end of the speech (crop padding frames). ``transcript`` is a
    :class:`Transcript` or token strings with ``special`` flags (default: tokens written
    ``<|...|>``). Special rows are left out of the DTW, except the special row right after the
    text (``eot``), which ends the last word; without one the last word ends at the end of the
    map. All rows take part in the z-normalisation. ``probabilities`` (one per row) give each
    word the mean of its tokens' (before punctuation is merged, as in whisper).
    """
    if isinstance(scores, CrossAttention):
        transcript = scores.transcript if transcript is None else transcript
        options = replace(options, enc_frame_seconds=scores.enc_frame_seconds)
    if transcript is None:
        raise ValueError("give the transcript (or token strings) the map's rows belong to")
    tokens = list(transcript.tokens if isinstance(transcript, Transcript) else transcript)
    if special is None and isinstance(transcript, Transcript):
        special = transcript.special
    elif special is None:
        special = [t.startswith("<|") and t.endswith("|>") for t in tokens]
    stack = _stack(scores, heads)
    if not (stack.shape[-2] == len(tokens) == len(special)):
        raise ValueError(
            f"the map has {stack.shape[-2]} token rows but there are {len(tokens)} tokens and "
            f"{len(special)} special flags (SM_X must be pooled first: compare.pool_to_enc)"
        )
    o = options
    matrix = timing_matrix(stack, medfilt_width=o.medfilt_width, row_norm=o.row_norm).numpy()
    rows = [i for i, s in enumerate(special) if not s]
    if not rows:
        return []
    has_eot = rows[-1] + 1 < len(tokens) and bool(special[rows[-1] + 1])
    rows += [rows[-1] + 1] if has_eot else []
    text_idx, time_idx = dtw(-matrix[rows].astype(np.float64))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    starts = list(time_idx[jumps] * o.enc_frame_seconds)
    if not has_eot:
        starts.append(matrix.shape[1] * o.enc_frame_seconds)
    pieces = split_words(
        [tokens[r] for r in rows], [special[r] for r in rows], on_spaces=o.split_on_spaces
    )[: -1 if has_eot else None]
    texts = [text for text, _ in pieces]
    groups = [[rows[k] for k in idx] for _, idx in pieces]
    times = [(float(starts[idx[0]]), float(starts[idx[-1] + 1])) for _, idx in pieces]
    probs = [None if probabilities is None else float(np.mean([probabilities[r] for r in g]))
             for g in groups]  # fmt: skip
    merge_punctuations(texts, groups, o.prepend_punctuations, o.append_punctuations)
    return [
        WordTiming(text, start, end, tuple(tokens[r] for r in g), tuple(g), p)
        for text, g, (start, end), p in zip(texts, groups, times, probs, strict=True)
        if text
    ]


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

    def rates(self, tolerance_ms: float) -> tuple[float, float, float]:
        """(precision, recall, F1) of boundaries within ``tolerance_ms`` (inclusive); recall is
        the share of gold boundaries hit."""
        hits = int((np.abs(self.errors) * 1000 <= tolerance_ms + 1e-6).sum())
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

"""Word timings from a transcript's cross-attention: the pipeline every timestamp method runs.

:mod:`xattn_utils.analysis.timing` (Whisper's algorithm on any map) and
:mod:`xattn_utils.analysis.timestamps` (scoring against gold) measure how well a map times words.
This module turns what they found into the best timestamps a Whisper user can get without
training; :mod:`xattn_utils.analysis.timestamp_methods` names the recipes and
:func:`~xattn_utils.analysis.aligner.word_timestamps` runs them on a file. Every method runs the
same pipeline:

1. a transcript: the greedy decode (or ``text=``, forced alignment), as BPE tokens, or one
   character per decoder position with explicit space tokens (``unit="chars"``: *character-level
   teacher forcing* after "Whisper Has an Internal Word Aligner", arXiv 2509.09987: every word
   spans several DTW rows and the space rows take the pauses, so words stop absorbing them);
2. its cross-attention, shape = (layers, heads, tokens, enc_frames), one teacher-forced forward;
3. a set of heads: Whisper's alignment heads, all heads, the top ``k`` heads of *this*
   utterance ranked without labels by how peaked and monotone their token x enc-frame maps are
   (:func:`~xattn_utils.analysis.heads.rank_heads`), or heads learned on a labelled corpus
   (:mod:`xattn_utils.analysis.calibration`);
4. Whisper's normalisation, median filter, head mean and DTW
   (:func:`~xattn_utils.analysis.timing.timing_matrix`,
   :func:`~xattn_utils.analysis.timing.dtw`);
5. optional refinements: a boundary placed between two enc frames where the two rows' scores
   cross (``subframe``, the 20 ms grid interpolated), a word end pulled back from a following
   silence and a start pushed past a leading one (``pauses``, from the audio's frame energy),
   a word's end moved into the row after it (``end_into_next_row``: its space),
   constant start/end offsets (calibrated methods only), and boundaries snapped to energy dips
   and to the edges of nearby pauses (``snap``, :mod:`xattn_utils.analysis.boundaries`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..audio import ENC_FRAME_SECONDS, SAMPLE_RATE, duration
from ..maps.attention import CrossAttention, forward_attention
from ..maps.views import View
from ..model.decode import (
    DecodeError,
    Transcript,
    decode,
    decoder_positions,
    features,
    log_probs,
    prompt_ids,
    transcript,
)
from ..model.loading import LoadedModel
from .boundaries import envelope_db, silent_frames, snap_boundaries
from .guide import Span, band_matrix, guide_spans
from .heads import rank_heads, rank_heads_by_norms
from .timestamp_methods import TimestampMethod, Unit
from .timing import (
    APPEND_PUNCTUATIONS,
    PREPEND_PUNCTUATIONS,
    WordTiming,
    dtw,
    softmax_matrix,
    split_words,
    timing_matrix,
)

PUNCTUATION = "".join(sorted(set(APPEND_PUNCTUATIONS + PREPEND_PUNCTUATIONS + ";…")))
# the token alignment that guides a character one (guide_band_s): every head, plain DTW
GUIDE = TimestampMethod("guide", heads="all", aggregate="softmax", medfilt_width=3)


# -- transcripts and their cross-attention -------------------------------------------------------


class TranscriptTooLong(DecodeError):
    """The transcript, one decoder input per character, needs more positions than the decoder
    has (448 for Whisper: about 60-80 words)."""


@dataclass(frozen=True)
class Alignment:
    """A transcript's cross-attention and the word each of its rows belongs to.

    ``word_of_row``: per output row, the index of its word in ``words`` or -1 (prompt, spaces,
    end-of-text). ``energy_db`` shape = (enc_frames,): frame energy of the audio, dB;
    ``envelope_db``: its loudness every 5 ms (:func:`~xattn_utils.analysis.boundaries.envelope_db`;
    ``None``: methods with ``snap`` leave the boundaries as they are); ``guide``: per word, its
    (start, end) seconds in the token alignment of the same transcript (:data:`GUIDE`), or
    ``None`` (no such word, or not computed: methods with ``guide_band_s`` run unguided).
    """

    ca: CrossAttention
    words: tuple[str, ...]
    word_of_row: tuple[int, ...]
    energy_db: np.ndarray = field(repr=False)
    unit: Unit = "tokens"
    probabilities: tuple[float, ...] | None = None  # per output row, under teacher forcing
    envelope_db: np.ndarray | None = field(default=None, repr=False)
    guide: tuple[Span | None, ...] | None = None

    @property
    def transcript(self) -> Transcript:
        return self.ca.transcript


def char_ids(loaded: LoadedModel, text: str) -> tuple[list[int], list[int], list[str]]:
    """One decoder input per character of ``" " + text`` (whitespace collapsed; a character the
    tokenizer splits into bytes gets several), the word index of each (-1 for spaces) and the
    words."""
    tok = loaded.processor.tokenizer
    words = text.split()
    if not words:
        raise DecodeError("the transcript is empty: nothing to align")
    ids, owner = [], []
    for k, word in enumerate(words):
        core = word.strip(PUNCTUATION) or word  # punctuation rows belong to no word
        lead = word.index(core)
        who = [-1 if not lead <= i < lead + len(core) else k for i in range(len(word))]
        for ch, w in [(" ", -1), *zip(word, who, strict=True)]:
            piece = tok(ch, add_special_tokens=False).input_ids
            ids += piece
            owner += [w] * len(piece)
    return ids, owner, words


def frame_energy_db(
    audio: np.ndarray, n_frames: int, *, frame_seconds: float = ENC_FRAME_SECONDS
) -> np.ndarray:
    """RMS energy of each enc frame (20 ms: Whisper's) in dB (re full scale), shape =
    (n_frames,)."""
    hop = int(SAMPLE_RATE * frame_seconds)
    padded = np.zeros(n_frames * hop, dtype=np.float64)
    padded[: min(audio.size, padded.size)] = audio[: padded.size]
    rms = np.sqrt((padded.reshape(n_frames, hop) ** 2).mean(1))
    return 20 * np.log10(np.maximum(rms, 1e-10))


@torch.no_grad()
def align_inputs(
    loaded: LoadedModel,
    audio: np.ndarray,
    *,
    unit: Unit = "tokens",
    text: str | None = None,
    language: str | None = None,
    guide: bool = False,
) -> Alignment:
    """Decode (or take ``text``), re-tokenise per ``unit`` and run one teacher-forced forward.
    ``audio``: 16 kHz mono, at most 30 s. ``guide`` (characters only): also align the same
    transcript's tokens (a second forward) and keep their word spans as ``Alignment.guide``."""
    if unit not in ("tokens", "chars"):
        raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")
    tr = decode(loaded, audio, text=text, language=language)
    if not tr.text.strip():
        raise DecodeError("the model heard no words in this audio (empty transcript)")
    n = loaded.family.n_enc_frames(audio)
    heard = _Audio(
        features(loaded, audio),
        frame_energy_db(audio, n, frame_seconds=loaded.family.enc_frame_seconds),
        envelope_db(audio),
        duration(audio),
    )
    al = _teacher_forced(loaded, heard, tr, unit, language)
    if guide and unit == "chars":
        by_tokens = timings_from_alignment(_teacher_forced(loaded, heard, tr, "tokens"), GUIDE)
        al = replace(al, guide=guide_spans(al.words, by_tokens))
    return al


@dataclass(frozen=True)
class _Audio:
    """What every forward of one clip shares: its log-mel features, the frame energy (dB, shape =
    (enc_frames,)), the 5 ms loudness envelope and the duration in seconds."""

    mel: torch.Tensor
    energy_db: np.ndarray
    envelope_db: np.ndarray
    seconds: float


def _teacher_forced(
    loaded: LoadedModel, heard: _Audio, tr: Transcript, unit: Unit, language: str | None = None
) -> Alignment:
    """The :class:`Alignment` of transcript ``tr`` re-tokenised per ``unit``."""
    if unit == "chars":
        ids, owner, words = char_ids(loaded, tr.text)
        prompt = prompt_ids(loaded, language=language)
        if len(prompt) + len(ids) + 1 > decoder_positions(loaded):
            raise TranscriptTooLong(
                f"the transcript has {len(ids)} characters; with its prompt the decoder holds "
                f"{decoder_positions(loaded) - len(prompt) - 1}: align a shorter window, or use "
                "a method on tokens"
            )
        tr = transcript(loaded, prompt, ids, task="transcribe", language=language)
        word_of_row = [-1] * (len(prompt) - 1) + owner + [-1]
    elif unit == "tokens":
        groups = split_words(list(tr.tokens), list(tr.special))
        words, word_of_row = [], [-1] * len(tr.tokens)
        for text_, rows in groups:
            if tr.special[rows[0]]:
                continue
            if not text_.strip(PUNCTUATION + " "):  # punctuation: shown with its word, no rows
                if words and text_.strip() in APPEND_PUNCTUATIONS:
                    words[-1] += text_.strip()
                continue
            for r in rows:
                word_of_row[r] = len(words)
            words.append(text_.strip())
    scores, logits = forward_attention(loaded, heard.mel, tr)
    ids = torch.tensor([tr.output_ids], device=logits.device)
    probs = tuple(log_probs(logits[None], ids)[0].exp().tolist())
    ca = CrossAttention(
        scores=scores[..., : heard.energy_db.size].contiguous(),
        transcript=tr,
        model=loaded.name,
        alignment_heads=loaded.alignment_heads,
        duration=heard.seconds,
        enc_frame_seconds=loaded.family.enc_frame_seconds,
    )
    return Alignment(
        ca, tuple(words), tuple(word_of_row), heard.energy_db, unit, probs, heard.envelope_db
    )


# -- heads ---------------------------------------------------------------------------------------


def choose_heads(
    alignment: Alignment, method: TimestampMethod, calibrated: Sequence | None = None
) -> list[tuple[int, int]]:
    """The (layer, head) pairs ``method`` uses on this alignment."""
    ca = alignment.ca
    if method.heads == "alignment":
        if not ca.alignment_heads:
            raise ValueError(
                f"{ca.model} has no alignment heads: use method='select' or 'chars' (no labels "
                "needed) or calibrate it (xattn calibrate)"
            )
        return list(ca.alignment_heads)
    if method.heads == "all":
        return list(View.all().pairs(*ca.scores.shape[:2]))
    if method.heads == "calibrated":
        if not calibrated:
            raise ValueError(f"no calibration for {ca.model}: run xattn calibrate first")
        return [tuple(h) for h in calibrated]
    rows = [r for r, w in enumerate(alignment.word_of_row) if w >= 0]
    if method.heads == "norms":
        ranked = rank_heads_by_norms(ca.scores, rows, medfilt_width=method.medfilt_width)
    else:
        ranked = rank_heads(ca.scores, rows)
    return ranked[: max(1, method.top_k)]


# -- boundaries ----------------------------------------------------------------------------------


def row_starts(matrix: np.ndarray, rows: Sequence[int], *, subframe: bool) -> np.ndarray:
    """DTW over ``matrix[rows]`` (shape = (tokens, enc_frames), larger = more attention); the
    time in enc frames where the path enters each row, plus the end of the map. With
    ``subframe``, a boundary at frame j moves to where the two neighbouring rows' scores cross
    (linear interpolation between frame centres, the crossing nearest to j within a frame)."""
    sub = matrix[list(rows)].astype(np.float64)
    text_idx, time_idx = dtw(-sub)
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    starts = time_idx[jumps].astype(np.float64)
    if subframe:
        for r in range(1, len(starts)):
            j = int(starts[r])
            d = sub[r] - sub[r - 1]  # < 0 where row r-1 holds the frame, > 0 where row r does
            for f in sorted(range(j - 2, j + 1), key=lambda f: abs(f + 1 - j)):
                if 0 <= f < sub.shape[1] - 1 and d[f] < 0 <= d[f + 1]:
                    starts[r] = f + 0.5 + (-d[f]) / (d[f + 1] - d[f])
                    break
        starts = np.maximum.accumulate(starts)
    return np.append(starts, sub.shape[1])


def pull_out_of_pauses(
    spans: list[list[float]], silent: np.ndarray, *, min_frames: int
) -> list[list[float]]:
    """Move a word's end back over a trailing silent run of at least ``min_frames`` enc frames
    inside the word, and its start forward over a leading one (times in enc frames; a word
    keeps at least one frame)."""
    out = []
    for start, end in spans:
        a, b = int(np.floor(start)), int(np.ceil(end))
        frames = silent[a:b]
        if frames.size and not frames.all():
            voiced = np.flatnonzero(~frames)
            lead, trail = voiced[0], frames.size - 1 - voiced[-1]
            start = a + lead if lead >= min_frames else start
            end = b - trail if trail >= min_frames else end
        out.append([start, max(end, start + 1)] if end <= start else [start, end])
    return out


def timings_from_alignment(
    alignment: Alignment,
    method: TimestampMethod,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    offsets: tuple[float, float] = (0.0, 0.0),
    probabilities: Sequence[float] | None = None,
) -> list[WordTiming]:
    """Word timings of an :class:`Alignment` by ``method`` (``heads`` overrides its choice;
    ``offsets``: seconds added to every start and end)."""
    ca = alignment.ca
    heads = list(heads) if heads is not None else choose_heads(alignment, method)
    stack = ca.scores[[h[0] for h in heads], [h[1] for h in heads]]
    aggregate = softmax_matrix if method.aggregate == "softmax" else timing_matrix
    matrix = aggregate(stack, medfilt_width=method.medfilt_width).numpy()
    owner, special = alignment.word_of_row, ca.special
    rows = [r for r, s in enumerate(special) if not s]  # text rows (spaces, punctuation too)
    rows += [rows[-1] + 1] if rows[-1] + 1 < len(special) else []  # eot ends the last word
    if method.guide_band_s is not None and alignment.guide is not None:
        matrix = band_matrix(
            matrix, rows, owner, alignment.guide,
            band_s=method.guide_band_s, enc_frame_seconds=ca.enc_frame_seconds,
        )  # fmt: skip
    starts = row_starts(matrix, rows, subframe=method.subframe)
    spans: dict[int, list[float]] = {}
    for k, r in enumerate(rows):
        if owner[r] >= 0:
            span = spans.setdefault(owner[r], [starts[k], starts[k + 1]])
            span[1] = starts[k + 1]
            if k + 1 < len(rows) and owner[rows[k + 1]] < 0:  # the word's last row
                span[1] += method.end_into_next_row * (starts[k + 2] - starts[k + 1])
    order = sorted(spans)
    frames = [spans[w] for w in order]
    if method.pauses:
        silent = silent_frames(alignment.energy_db, method.silence_db)
        min_frames = max(1, round(method.min_pause_s / ca.enc_frame_seconds))
        frames = pull_out_of_pauses(frames, silent, min_frames=min_frames)
    dt, end_time = ca.enc_frame_seconds, ca.duration
    seconds = [[a * dt + offsets[0], b * dt + offsets[1]] for a, b in frames]
    for prev, nxt in zip(seconds, seconds[1:], strict=False):  # an end offset past the next
        if prev[1] > nxt[0]:  # start: the two words meet halfway (they never overlap)
            prev[1] = nxt[0] = (prev[1] + nxt[0]) / 2
    if method.snap is not None and alignment.envelope_db is not None:
        seconds = snap_boundaries(seconds, alignment.envelope_db, method.snap)
    out = []
    for w, (a, b) in zip(order, seconds, strict=True):
        word_rows = tuple(r for r, o in enumerate(owner) if o == w)
        p = None if probabilities is None else float(np.mean([probabilities[r] for r in word_rows]))
        start = float(np.clip(a, 0, end_time))
        end = float(np.clip(b, start, end_time))
        tokens = tuple(ca.tokens[r] for r in word_rows)
        out.append(WordTiming(" " + alignment.words[w], start, end, tokens, word_rows, p))
    return out

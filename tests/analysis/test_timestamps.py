"""timestamps: DTW, median filter, word merging and scoring; agreement with openai-whisper (slow).

The slow tests build openai-whisper's own model from our tiny.en weights (``whisper_ref``) and
compare word timings on demo utterances, on whisper's transcript (teacher-forced into ours):

- same encoder input (whisper's mel, the decoder input ending in eot as whisper's does): our
  implementation gives exactly whisper's ``find_alignment`` + ``merge_punctuations``;
- our default pipeline (transformers' features, CA of our transcript rows) against whisper:
  mostly equal, with some words off by one or more 20 ms frames. The causes, measured:
  1. ``transcribe()`` cuts the log-mel of the speech and pads it to 3000 frames with **0**,
     whereas transformers' feature extractor (and whisper's own ``pad_or_trim(audio)`` path)
     pads the *audio*, so padding holds the features of silence (about -0.6 for these files).
     The speech frames agree to 1e-7, but the encoder mixes across time, so CA differs
     slightly everywhere, and where the DTW path is nearly tied a boundary can move by several
     frames (up to 300 ms seen on one word);
  2. whisper's decoder input ends in ``eot``, so its per-frame z-normalisation over tokens sees
     one more row (the position after eot) than our transcripts have: at most one frame, rarely;
  3. ``transcribe()`` applies heuristics after the alignment (clipping over-long words next to
     sentence ends, after pauses, and to the segment timestamps) and rounds to 10 ms; on these
     utterances they seldom fire;
  4. our crop keeps ceil(mel_frames / 2) enc frames, whisper's ``num_frames // 2`` floors.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch

import xattn_utils as xu
from xattn_utils import timestamps as T
from xattn_utils import whisper_ref
from xattn_utils.analysis.compare import pool_to_enc
from xattn_utils.data import Word, load_corpus

# -- DTW and the median filter ------------------------------------------------------------------


def planted(n_tokens: int, n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random monotone staircase: token k holds frames [b_k, b_k+1), every run >= 1 frame."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n_frames), size=n_tokens - 1, replace=False))
    bounds = np.concatenate([[0], cuts, [n_frames]])
    text = np.repeat(np.arange(n_tokens), np.diff(bounds))
    return text, np.arange(n_frames)


@pytest.mark.parametrize("seed", range(5))
def test_dtw_recovers_a_planted_path(seed):
    n, m = 12, 90
    text, time = planted(n, m, seed)
    rng = np.random.default_rng(100 + seed)
    score = rng.uniform(-1.0, -0.7, size=(n, m))  # off the path: cost > 0 (as z-scores go)
    score[text, time] = rng.uniform(0.7, 1.0, size=m)
    got_text, got_time = T.dtw(-score)
    np.testing.assert_array_equal(got_text, text)
    np.testing.assert_array_equal(got_time, time)


def test_dtw_path_is_monotone_and_complete():
    text, time = T.dtw(np.random.default_rng(0).standard_normal((7, 30)))
    assert (text[0], time[0]) == (0, 0) and (text[-1], time[-1]) == (6, 29)
    steps = np.stack([np.diff(text), np.diff(time)])
    assert set(map(tuple, steps.T)) <= {(1, 1), (1, 0), (0, 1)}


def test_dtw_matches_whisper_including_ties():
    timing = pytest.importorskip("whisper.timing")
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, m = rng.integers(1, 25), rng.integers(1, 70)
        for x in (rng.standard_normal((n, m)), rng.standard_normal((n, m)).round(1)):
            np.testing.assert_array_equal(np.stack(T.dtw(x)), timing.dtw_cpu(x))


def test_dtw_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        T.dtw(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="NaN"):
        T.dtw(np.array([[0.0, np.nan]]))


@pytest.mark.parametrize("width", [1, 3, 7])
def test_median_filter_matches_scipy_mirror(width):
    x = np.random.default_rng(1).standard_normal((2, 3, 40)).astype(np.float32)
    ref = scipy.ndimage.median_filter(x, size=(1, 1, width), mode="mirror")
    got = T.median_filter(x, width)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(T.median_filter(torch.from_numpy(x), width).numpy(), ref)


def test_median_filter_edge_cases_follow_whisper():
    x = torch.arange(3.0)
    assert T.median_filter(x, 7) is x  # no longer than width // 2: unchanged, as in whisper
    with pytest.raises(ValueError, match="odd"):
        T.median_filter(x, 4)
    timing = pytest.importorskip("whisper.timing")
    y = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(T.median_filter(y, 7), timing.median_filter(y, 7), rtol=0, atol=0)


# -- words ---------------------------------------------------------------------------------------


def test_split_words_on_spaces_punctuation_and_specials():
    tokens = [" Hello", ",", " wor", "ld", "!", "<|endoftext|>"]
    got = T.split_words(tokens, [False] * 5 + [True])
    assert got == [
        (" Hello", [0]),
        (",", [1]),
        (" world", [2, 3]),
        ("!", [4]),
        ("<|endoftext|>", [5]),
    ]
    assert [w for w, _ in T.split_words(["a", "b"], [False, False], on_spaces=False)] == ["a", "b"]


def test_merge_punctuations_like_whisper():
    words = [' "', "Hello", ",", " (", " world", ")", ".", '"']
    tokens = [[i] for i in range(len(words))]
    expect_words = ["", ' "Hello,', "", "", ' ( world)."', "", "", ""]
    expect_tokens = [[], [0, 1, 2], [], [], [3, 4, 5, 6, 7], [], [], []]
    w, t = list(words), [list(x) for x in tokens]
    T.merge_punctuations(w, t, T.PREPEND_PUNCTUATIONS, T.APPEND_PUNCTUATIONS)
    assert (w, t) == (expect_words, expect_tokens)
    timing = pytest.importorskip("whisper.timing")
    ref = [timing.WordTiming(x, list(y), 0.0, 0.0, 1.0) for x, y in zip(words, tokens, strict=True)]
    timing.merge_punctuations(ref, T.PREPEND_PUNCTUATIONS, T.APPEND_PUNCTUATIONS)
    assert [r.word for r in ref] == expect_words
    assert [r.tokens for r in ref] == expect_tokens


TOKENS = [
    "<|notimestamps|>",
    " The",
    " cat",
    ",",
    " sat",
    " on",
    " the",
    " mat",
    ".",
    "<|endoftext|>",
]
BOUNDS = [0, 10, 24, 30, 45, 52, 60, 80, 88]  # text token k holds [BOUNDS[k], BOUNDS[k+1])


def diagonal_map(noise: float = 0.0) -> np.ndarray:
    """Rows = TOKENS; each text token attends to its block, eot to the tail, the prompt to all."""
    m = np.full((len(TOKENS), 110), 1e-3)
    m[0] = 1.0
    for k in range(len(BOUNDS) - 1):
        m[k + 1, BOUNDS[k] : BOUNDS[k + 1]] = 1.0
    m[-1, BOUNDS[-1] :] = 1.0  # eot
    m += noise * np.random.default_rng(0).uniform(size=m.shape)
    return m / m.sum(-1, keepdims=True)


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_word_timings_on_a_diagonal_map(noise):
    words = T.word_timings(diagonal_map(noise), TOKENS)
    assert [w.word for w in words] == [" The", " cat,", " sat", " on", " the", " mat."]
    starts = [w.start for w in words]
    ends = [w.end for w in words]
    assert starts == sorted(starts) and all(s < e for s, e in zip(starts, ends, strict=True))
    assert all(e <= s for e, s in zip(ends[:-1], starts[1:], strict=True))  # no overlap
    # merged punctuation keeps the times of the word it joins (whisper): " cat," ends where
    # "," starts, and " mat." where "." starts
    atol = 0.02 if noise else 1e-9
    np.testing.assert_allclose(starts, [BOUNDS[k] * 0.02 for k in (0, 1, 3, 4, 5, 6)], atol=atol)
    np.testing.assert_allclose(ends, [BOUNDS[k] * 0.02 for k in (1, 2, 4, 5, 6, 7)], atol=atol)
    assert words[1].tokens == (" cat", ",") and words[1].rows == (2, 3)


def test_word_timings_inputs_and_options():
    m = diagonal_map()
    base = T.word_timings(m, TOKENS)
    # SM_X-like input, pooled to the enc grid with max pooling, gives the same words
    sm_x = np.repeat(m, 2, axis=1)[:, :, None].repeat(8, axis=2)
    assert T.word_timings(pool_to_enc(sm_x), TOKENS) == base
    with pytest.raises(ValueError, match="pool_to_enc"):
        T.word_timings(sm_x, TOKENS)
    # a stack of identical maps, and torch input, change nothing
    assert T.word_timings(torch.from_numpy(np.stack([m, m])), TOKENS) == base
    # without an eot row the last word ends at the end of the map
    no_eot = T.word_timings(m[:-2], TOKENS[:-2])  # also without "."
    assert no_eot[-1].word == " mat" and no_eot[-1].end == pytest.approx(110 * 0.02)
    assert no_eot[:-1] == base[:-1]
    probs = np.linspace(0.1, 1.0, len(TOKENS))
    with_p = T.word_timings(m, TOKENS, probabilities=probs)
    assert with_p[1].probability == pytest.approx(probs[2])  # " cat" keeps its own probability
    with pytest.raises(ValueError, match="non-negative"):
        T.word_timings(m - 0.5, TOKENS)
    assert T.word_timings(m - 0.5, TOKENS, options=T.TimingOptions(row_norm=None)) != []
    assert T.word_timings(m, ["<|notimestamps|>", "<|endoftext|>"] + [" x"] * 8)[0].word == " x"
    frame = T.timings_frame(base, utterance="u1")
    assert list(frame.columns[:4]) == ["index", "word", "start", "end"]
    assert frame["utterance"].eq("u1").all() and len(frame) == len(base)
    assert len(base[0].to_frame()) == 1


def test_word_timings_from_cross_attention(tiny, tone):
    ca = xu.cross_attention(tiny, tone, text="hello world, fine.")
    words = T.word_timings(ca)
    assert [w.word for w in words] == [" hello", " world,", " fine."]
    assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:], strict=False))
    assert T.word_timings(ca, heads=None)[0].word == " hello"
    assert T.word_timings(ca.scores, ca.transcript, heads=[(1, 0)]) == T.word_timings(
        ca, heads=[(1, 0)]
    )
    with pytest.raises(ValueError, match="alignment heads"):
        T.word_timings(ca.scores, ca.transcript)
    # a view label or View picks the same heads as the pairs
    layer_1 = [(1, h) for h in range(tiny.n_heads)]
    assert T.word_timings(ca, heads="CA L1") == T.word_timings(ca, heads=layer_1)
    m = T.timing_matrix(ca.scores[1])
    assert m.shape == ca.scores.shape[2:]


# -- scoring -------------------------------------------------------------------------------------

GOLD = [Word("The", 0.0, 0.3), Word("cat", 0.3, 0.7), Word("sat", 0.8, 1.2)]


def wt(word, start, end):
    return T.WordTiming(word, start, end, (word,), (0,))


def test_score_timings_exact_numbers():
    pred = [wt(" the", 0.04, 0.32), wt(" cat,", 0.32, 0.9), wt(" sat.", 0.9, 1.2)]
    s = T.score_timings(pred, GOLD)
    np.testing.assert_allclose(s.start_errors, [0.04, 0.02, 0.1], atol=1e-12)
    np.testing.assert_allclose(s.end_errors, [0.02, 0.2, 0.0], atol=1e-12)
    assert s.mae_ms() == pytest.approx(380 / 6)
    assert s.mae_ms("start") == pytest.approx(160 / 3)
    assert s.mae_ms("end") == pytest.approx(220 / 3)
    assert s.bias_ms == pytest.approx(380 / 6)
    assert s.rates(50) == pytest.approx((4 / 6, 4 / 6, 4 / 6))
    assert s.rates(100) == pytest.approx((5 / 6, 5 / 6, 5 / 6))  # 100 ms counts (inclusive)
    row = s.to_frame().iloc[0]
    assert row["within_50ms"] == pytest.approx(4 / 6) and row["n_matched_words"] == 3


def test_score_timings_unmatched_words_and_skipped_start():
    pred = [wt(" The", 0.1, 0.3), wt(" big", 0.3, 0.5), wt(" cat", 0.5, 0.7)]
    s = T.score_timings(pred, [dict(word=w.word, start=w.start, end=w.end) for w in GOLD])
    assert (s.n_matched_words, s.n_gold, s.n_predicted) == (2, 6, 6)
    np.testing.assert_allclose(s.start_errors, [0.1, 0.2])
    np.testing.assert_allclose(s.end_errors, [0.0, 0.0])
    precision, recall, f1 = s.rates(50)
    assert (precision, recall, f1) == pytest.approx((2 / 6, 2 / 6, 2 / 6))
    skipped = T.score_timings(pred, GOLD, skip_first_start=True)
    assert (skipped.n_gold, skipped.n_predicted) == (5, 5)
    np.testing.assert_allclose(skipped.start_errors, [0.2])
    assert skipped.rates(50) == pytest.approx((2 / 5, 2 / 5, 2 / 5))
    pooled = T.pool_scores([s, skipped])
    assert pooled.n_gold == 11 and len(pooled.errors) == 7
    empty = T.score_timings([], GOLD)
    assert empty.n_matched_words == 0 and empty.rates(50)[1] == 0 and np.isnan(empty.mae_ms())
    assert T.normalize_word(" Don't,") == "dont"


# -- openai-whisper as the reference (slow) ----------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("whisper")
    from xattn_utils import whisper_ref

    loaded = xu.load_model("tiny.en", device="cpu")
    return loaded, whisper_ref.build_whisper(loaded), whisper_ref, {}


SLOW_UTTERANCES = ["syn_en_01", "syn_en_02", "real_LJ001-0001", "real_LJ001-0004"]


def demo(uid):
    return next(u for u in load_corpus("demo", language="en") if u.id == uid)


def whisper_case(reference, uid):
    """(our transcript of whisper's tokens, audio, whisper's mel, num_frames, reference words,
    transcribe() words) for one demo utterance."""
    from xattn_utils.model.decode import prompt_ids, transcript

    loaded, model, W, cache = reference
    if uid not in cache:
        audio = demo(uid).load()
        tokens, words = W.first_window(model, W.transcribe(model, audio))
        tr = transcript(loaded, prompt_ids(loaded), tokens, task="transcribe", language="en")
        mel, num_frames = W.mel_segment(model, audio)
        ref = W.reference_alignment(model, audio, tokens)
        cache[uid] = tr, audio, mel, num_frames, ref, words
    return cache[uid]


def diffs(ours, ref) -> np.ndarray:
    """|start| and |end| differences in seconds, shape = (words, 2); the words must be the
    same. ``ref``: whisper ``WordTiming`` objects or transcribe()'s word dicts."""
    ref = [r if isinstance(r, dict) else vars(r) for r in ref]
    assert [w.word for w in ours] == [r["word"] for r in ref]
    theirs = np.array([(r["start"], r["end"]) for r in ref], dtype=float)
    return np.abs(np.array([(w.start, w.end) for w in ours]) - theirs)


@pytest.mark.slow
def test_whisper_ref_model_equals_ours(reference):
    loaded, model, W, _ = reference
    audio = demo("syn_en_01").load()
    mel, _ = W.mel_segment(model, audio)
    tokens = [50257, 50362, 464, 3329]
    with torch.no_grad():
        ours = loaded.model(input_features=mel[None], decoder_input_ids=torch.tensor([tokens]))
        theirs = model(mel[None], torch.tensor([tokens]))
    torch.testing.assert_close(ours.logits, theirs, atol=2e-3, rtol=1e-4)
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    assert sorted(map(tuple, heads)) == sorted(loaded.alignment_heads)


@pytest.mark.slow
@pytest.mark.parametrize("uid", SLOW_UTTERANCES)
def test_same_input_gives_whisper_find_alignment_exactly(reference, uid):
    from xattn_utils.maps.attention import forward_attention

    loaded, *_ = reference
    tr, _, mel, num_frames, ref, _ = whisper_case(reference, uid)
    # whisper's decoder input ends in eot: one more row (the position after it) in the z-norm
    full = dataclasses.replace(tr, input_ids=(*tr.input_ids, loaded.special.eot))
    ca, _ = forward_attention(loaded, mel[None], full)
    labels = [*tr.tokens, "<|endoftext|>"]
    ours = T.word_timings(ca[..., : num_frames // 2], labels, heads=loaded.alignment_heads)
    assert diffs(ours, ref).max() < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("uid", SLOW_UTTERANCES)
def test_default_pipeline_agrees_with_openai_whisper(reference, uid):
    from xattn_utils.audio import n_enc_frames
    from xattn_utils.maps.attention import forward_attention
    from xattn_utils.model.decode import features

    loaded, *_ = reference
    tr, audio, _, _, ref, transcribed = whisper_case(reference, uid)
    ca, _ = forward_attention(loaded, features(loaded, audio), tr)
    ours = T.word_timings(ca[..., : n_enc_frames(audio)], tr, heads=loaded.alignment_heads)
    core, final = diffs(ours, ref), diffs(ours, transcribed)
    print(
        f"{uid}: {len(ours)} words; vs find_alignment max {core.max():.2f} s mean "
        f"{core.mean() * 1000:.1f} ms; vs transcribe() max {final.max():.2f} s mean "
        f"{final.mean() * 1000:.1f} ms"
    )
    assert core.mean() < 0.03 and (core <= 0.02 + 1e-9).mean() >= 0.85
    assert final.mean() < 0.04


# -- corpus tables ------------------------------------------------------------------------------

GOLD_DIAGONAL = [  # the words of diagonal_map(), at the times its blocks give them
    Word(w, BOUNDS[a] * 0.02, BOUNDS[b] * 0.02)
    for w, a, b in [("The", 0, 1), ("cat", 1, 2), ("sat", 3, 4), ("on", 4, 5), ("the", 5, 6),
                    ("mat", 6, 7)]
]  # fmt: skip


def planted_explanation(uid: str, *, task: str = "transcribe") -> xu.Explanation:
    """Layer 1 (the alignment heads) and both saliency maps hold diagonal_map(); layer 0 noise."""
    m = torch.from_numpy(diagonal_map()).float()
    noise = torch.rand((2, *m.shape), generator=torch.Generator().manual_seed(0))
    ca = torch.stack([noise / noise.sum(-1, keepdim=True), torch.stack([m, m])])
    special = tuple(t.startswith("<|") for t in TOKENS)
    n = len(TOKENS)
    transcript = xu.Transcript(tuple(range(n)), tuple(range(1, n + 1)), tuple(TOKENS), special,
                               "The cat, sat on the mat.", task, "en")  # fmt: skip
    return xu.Explanation(
        transcript=transcript,
        cross_attention=ca,
        input_saliency=m.repeat_interleave(2, 1)[:, :, None].repeat(1, 1, 8),
        encoder_saliency=m,
        model="planted",
        method="spes",
        params={"task": task},
        alignment_heads=((1, 0), (1, 1)),
        duration=2.2,
        utterance=uid,
    )


def gold_utterance(uid, subset, shift=0.0, words=GOLD_DIAGONAL):
    words = tuple(dataclasses.replace(w, start=w.start + shift, end=w.end + shift) for w in words)
    return SimpleNamespace(id=uid, subset=subset, words=words, skip_first_start=False)


@pytest.fixture(scope="module")
def planted_table():
    utts = [gold_utterance("u1", "synthetic"), gold_utterance("u2", "real", shift=0.06)]
    utts.append(gold_utterance("u3", "real", words=()))
    exps = [planted_explanation(u) for u in ("u1", "u2", "u3")]
    exps.append(planted_explanation("u1", task="translate"))
    extra = {"gold": {"u1": GOLD_DIAGONAL}}
    return T.timing_table(exps, utts, extra=extra)


def test_timing_table_recovers_planted_word_times(planted_table):
    t = planted_table.set_index(["utterance", "map"])
    assert set(t.loc["u1"].index) == {
        "CA alignment heads", "CA all heads", "CA best layer", "SM_H", "SM_X", "gold",
    }  # fmt: skip
    assert t.loc[("u1", "CA best layer"), "layer"] == 1  # the planted layer, not the noise
    assert t.loc[("u1", "SM_H"), "layer"] is pd.NA
    for name in ["CA alignment heads", "CA best layer", "SM_H", "SM_X", "gold"]:
        row = t.loc[("u1", name)]
        assert row["mae_ms"] == pytest.approx(0, abs=1e-6), name
        assert row["within_50ms"] == 1 and row["f1_50ms"] == 1 and row["n_matched_words"] == 6
        # gold 60 ms later: every boundary 60 ms early
        row = t.loc[("u2", name)] if name != "gold" else None
        if row is not None:
            assert row["bias_ms"] == pytest.approx(-60) and row["mae_ms"] == pytest.approx(60)
            assert (row["within_50ms"], row["within_100ms"]) == (0, 1)
    assert planted_table.attrs["skipped"] == {
        "planted/transcribe/u3": "no gold word timings",
        "planted/translate/u1": "translation: the gold words are in the source language",
    }
    assert set(planted_table["task"]) == {"transcribe"}
    layers = T.timing_table([planted_explanation("u1")], [gold_utterance("u1", "s")],
                            best_layer_by=None)  # fmt: skip
    assert {"CA L0", "CA L1"} <= set(layers["map"])


def test_timing_summary_pools_utterances(planted_table):
    summary = T.timing_summary(planted_table, seed=0)
    s = summary.set_index(["subset", "map", "metric"])
    assert s.loc[("all", "SM_H", "within_50ms"), "mean"] == pytest.approx(0.5)
    assert s.loc[("all", "SM_H", "within_50ms"), "pooled"] == pytest.approx(0.5)
    assert s.loc[("all", "SM_H", "mae_ms"), "mean"] == pytest.approx(30)
    row = s.loc[("all", "SM_H", "within_100ms")]
    assert (row["mean"], row["low"], row["high"], row["n"], row["n_words"]) == (1, 1, 1, 2, 12)
    assert s.loc[("real", "SM_H", "bias_ms"), "mean"] == pytest.approx(-60)
    assert s.loc[("synthetic", "SM_H", "within_50ms"), "n"] == 1
    assert s.loc[("all", "gold", "within_50ms"), "n"] == 1  # extra maps only where given
    assert set(summary["metric"]) == set(T.METRICS)
    assert T.timing_summary(planted_table.iloc[:0]).empty
    errors = T.boundary_errors(planted_table)
    sm_h = errors[errors["map"] == "SM_H"]
    assert len(sm_h) == 24 and set(sm_h["boundary"]) == {"start", "end"}
    np.testing.assert_allclose(sm_h.groupby("utterance")["error_ms"].mean(), [0, -60], atol=1e-6)


def test_whisper_comparison_and_skips(tiny):
    ours = T.word_timings(diagonal_map(), TOKENS)
    later = [{"word": w.word, "start": w.start + 0.01, "end": w.end + 0.02} for w in ours]
    table = whisper_ref.whisper_comparison([planted_explanation("u1")], {"u1": later[1:]})
    assert list(table["word"]) == ["cat", "sat", "on", "the", "mat"]
    np.testing.assert_allclose(table["d_start_ms"], -10, atol=1e-6)
    np.testing.assert_allclose(table["d_end_ms"], -20, atol=1e-6)
    assert whisper_ref.whisper_comparison([planted_explanation("u1")], {}).empty
    words, note = whisper_ref.whisper_words(tiny, [], task="translate")
    assert words == {} and "skipped" in note
    words, note = whisper_ref.whisper_words(tiny, [])
    assert words == {} and "random test model" in note


def test_plot_timing_errors_returns_axes(planted_table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xattn_utils import charts

    ax = charts.plot_timing_errors(T.boundary_errors(planted_table))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:4] == ["CA alignment heads", "CA all heads", "CA best layer", "SM_H"]
    summary = T.timing_summary(planted_table)
    ax = charts.plot_timing_errors(summary, metric="within_50ms")
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == [
        "CA alignment heads", "CA all heads", "CA best layer",
    ]  # fmt: skip
    assert len(ax.get_legend().get_texts()) == 3  # all, synthetic, real
    for empty in [T.boundary_errors(T.timing_table([], [])), summary.iloc[:0]]:
        ax = charts.plot_timing_errors(empty, metric=None if "error_ms" in empty else "mae_ms")
        assert "no boundaries" in ax.texts[0].get_text()
    plt.close("all")

"""timing: DTW, median filter, word merging, word timings; agreement with openai-whisper (slow).

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

import numpy as np
import pytest
import scipy.ndimage
import torch

import xattn_utils as xu
from xattn_utils import timing as T
from xattn_utils.analysis.compare import pool_to_enc
from xattn_utils.data import load_corpus

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

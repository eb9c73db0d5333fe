"""openai-whisper as a reference implementation, built offline from our converted weights.

The ``openai-whisper`` package (PyPI ``openai-whisper==20250625``, installed with ``--no-deps``
so that it does not pull triton; it needs ``tiktoken``, ``numba`` and ``more-itertools``) holds
the reference word-timestamp algorithm (``whisper/timing.py``). Its model downloads weights from
the network; :func:`build_whisper` instead fills ``whisper.model.Whisper`` with the state dict of
one of our :class:`~xattn_utils.model.loading.LoadedModel` (same numbers, openai names) and sets its
alignment heads, so :mod:`xattn_utils.analysis.timing` can be checked against it offline.

:func:`whisper_words` and :func:`whisper_comparison` put ``transcribe()``'s word timestamps next
to ours (notebook ``04_timestamps``); without openai-whisper they say so instead of failing.
"""

from __future__ import annotations

import base64
import gzip
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..analysis.timestamps import match_words, normalized_words
from ..analysis.timing import word_timings
from ..audio import N_MEL_FRAMES, N_SAMPLES, load_audio
from ..model.loading import RANDOM_TINY, LoadedModel

if TYPE_CHECKING:
    from whisper.model import Whisper

    from ..maps.explanation import Explanation

# transformers name -> openai-whisper name, applied in order to every key
RENAMES = [
    (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
    (r"^model\.(encoder|decoder)\.layers\.(\d+)\.", r"\1.blocks.\2."),
    (r"^model\.encoder\.", "encoder."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]


def _whisper():
    try:
        import whisper
    except ImportError as err:
        raise ImportError(
            "the reference implementation needs openai-whisper: pip install --no-deps "
            "openai-whisper==20250625 && pip install tiktoken numba more-itertools"
        ) from err
    return whisper


def openai_name(name: str) -> str:
    """The openai-whisper name of a transformers Whisper parameter."""
    for pattern, repl in RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def openai_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Our model's weights under openai-whisper names (``proj_out`` is tied: left out)."""
    sd = loaded.model.state_dict()
    return {
        openai_name(k): v.detach().float().cpu() for k, v in sd.items() if k != "proj_out.weight"
    }


def dimensions(loaded: LoadedModel):
    """``whisper.model.ModelDimensions`` of our model."""
    from whisper.model import ModelDimensions

    c = loaded.model.config
    return ModelDimensions(
        n_mels=c.num_mel_bins,
        n_audio_ctx=c.max_source_positions,
        n_audio_state=c.d_model,
        n_audio_head=c.encoder_attention_heads,
        n_audio_layer=c.encoder_layers,
        n_vocab=c.vocab_size,
        n_text_ctx=c.max_target_positions,
        n_text_state=c.d_model,
        n_text_head=c.decoder_attention_heads,
        n_text_layer=c.decoder_layers,
    )


def alignment_heads_dump(heads, n_layers: int, n_heads: int) -> bytes:
    """(layer, head) pairs in the base85(gzip(bool array)) form ``set_alignment_heads`` reads."""
    mask = np.zeros((n_layers, n_heads), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def build_whisper(loaded: LoadedModel) -> Whisper:
    """An openai-whisper ``Whisper`` (CPU, float32, eval) holding our model's weights and
    alignment heads. Raises if any key is missing or unexpected."""
    whisper = _whisper()
    model = whisper.model.Whisper(dimensions(loaded))
    model.load_state_dict(openai_state_dict(loaded), strict=True)
    dims = model.dims
    model.set_alignment_heads(
        alignment_heads_dump(loaded.alignment_heads, dims.n_text_layer, dims.n_text_head)
    )
    return model.eval()


def transcribe(model: Whisper, audio, *, language: str | None = "en", **options) -> dict:
    """``whisper.transcribe`` with word timestamps, greedy, fp32 and no conditioning on previous
    text; ``options`` override these. Returns whisper's result dict (``segments[*]["words"]``)."""
    whisper = _whisper()
    kwargs = dict(
        word_timestamps=True,
        language=language,
        condition_on_previous_text=False,
        temperature=0.0,
        fp16=False,
        verbose=None,
    )
    kwargs.update(options)
    return whisper.transcribe(model, load_audio(audio), **kwargs)


def tokenizer(model: Whisper, language: str | None = "en"):
    """openai-whisper's tokenizer for ``model`` (bundled with the package: no network)."""
    return _whisper().tokenizer.get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language=language
    )


def first_window(model: Whisper, result: dict) -> tuple[list[int], list[dict]]:
    """Text token ids and words of the segments decoded in the first 30 s window (``seek == 0``)
    of a :func:`transcribe` result. Later windows (whisper re-decodes the tail after a segment
    that ends without a closing timestamp) are aligned separately, with their own offset."""
    segments = [s for s in result["segments"] if s["seek"] == 0]
    eot = tokenizer(model).eot
    tokens = [t for s in segments for t in s["tokens"] if t < eot]
    words = [w for s in segments for w in s.get("words", [])]
    return tokens, words


def mel_segment(model: Whisper, audio) -> tuple[torch.Tensor, int]:
    """Whisper's input for the first window as ``transcribe`` builds it: the log-mel of the audio
    followed by 30 s of zeros, cut to 3000 frames; and ``num_frames``, the mel frames of speech
    (``len(audio) // 160``)."""
    whisper = _whisper()
    audio = load_audio(audio)
    mel = whisper.audio.log_mel_spectrogram(audio, model.dims.n_mels, padding=N_SAMPLES)
    num_frames = mel.shape[-1] - N_MEL_FRAMES
    segment = whisper.audio.pad_or_trim(mel[:, :num_frames], N_MEL_FRAMES)
    return segment, num_frames


def reference_alignment(
    model: Whisper, audio, text_tokens: list[int], *, language: str | None = "en"
) -> list:
    """openai-whisper's ``find_alignment`` + ``merge_punctuations`` on the first window, without
    transcribe()'s heuristics: the core algorithm
    :func:`xattn_utils.analysis.timing.word_timings` reproduces. Returns whisper ``WordTiming``
    objects (words of empty text left out)."""
    _whisper()
    from whisper.timing import find_alignment, merge_punctuations

    mel, num_frames = mel_segment(model, audio)
    alignment = find_alignment(model, tokenizer(model, language), text_tokens, mel, num_frames)
    merge_punctuations(alignment, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    return [w for w in alignment if w.word]


# -- openai-whisper's transcribe() as a reference -----------------------------------------------


def whisper_words(
    loaded: LoadedModel, utterances: Sequence, *, task: str = "transcribe"
) -> tuple[dict[str, list[dict]], str]:
    """openai-whisper's ``transcribe(word_timestamps=True)`` words (dicts with ``word, start,
    end, probability``) per utterance id, from the same weights (:func:`build_whisper`; greedy,
    fp32, each utterance in its own language), and a note saying what was done. Empty, with the
    reason in the note, for translation, for the random test model and without openai-whisper.
    """
    if task != "transcribe":
        return {}, f"openai-whisper comparison skipped: task {task!r} has no gold words"
    if loaded.family.name != "whisper":
        return {}, f"openai-whisper comparison skipped: {loaded.name} is not a Whisper model"
    if loaded.name.startswith(RANDOM_TINY):
        return {}, "openai-whisper comparison skipped: the random test model transcribes noise"
    try:
        import whisper
    except ImportError:
        return {}, (
            "openai-whisper comparison skipped: openai-whisper is not installed "
            "(pip install --no-deps openai-whisper==20250625 tiktoken numba more-itertools)"
        )
    model = build_whisper(loaded)
    words = {}
    for utt in utterances:
        result = transcribe(model, utt.load(), language=utt.language or "en")
        words[utt.id] = [w for segment in result["segments"] for w in segment.get("words", [])]
    note = f"openai-whisper {whisper.__version__}: transcribe(word_timestamps=True), greedy, fp32"
    return words, f"{note}, {len(words)} utterances"


def whisper_comparison(
    explanations: Sequence[Explanation], reference: Mapping[str, Sequence]
) -> pd.DataFrame:
    """Our alignment-head word timings next to ``reference`` (:func:`whisper_words`), word by
    word: ``utterance, word, start, end, whisper_start, whisper_end, d_start_ms, d_end_ms``
    (ours minus whisper). Words are matched by normalised text as in
    :func:`~xattn_utils.analysis.timestamps.score_timings`; words that only one of the two
    transcripts has are left out."""
    columns = ["utterance", "word", "start", "end", "whisper_start", "whisper_end"]
    rows = []
    for e in explanations:
        if e.utterance not in reference or not e.alignment_heads:
            continue
        ours = normalized_words(
            word_timings(e.cross_attention, e.transcript, heads=e.alignment_heads)
        )
        theirs = normalized_words(reference[e.utterance])
        rows += [(e.utterance, *ours[i], *theirs[j][1:]) for i, j in match_words(ours, theirs)]
    out = pd.DataFrame(rows, columns=columns).astype({c: float for c in columns[2:]})
    out["d_start_ms"] = 1000 * (out["start"] - out["whisper_start"])
    out["d_end_ms"] = 1000 * (out["end"] - out["whisper_end"])
    return out

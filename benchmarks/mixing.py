"""Value-zeroing speed on this machine, measured in one run (one demo utterance).

Per encoder layer, the batched rank-1 path (:func:`xattn_utils.analysis.mixing.layer_distances`: one
attention pass, then only the MLP per zeroed frame) against the real layer run once per zeroed
frame with a hook (:func:`~xattn_utils.analysis.mixing.layer_distances_looped`), on a sample of
frames (the looped path is timed on ``--sample`` frames and scaled to all of them, printed as
``*_extrapolated``); and the whole :func:`~xattn_utils.analysis.mixing.encoder_mixing` for
``group`` 1 and 4. Prints ``name: value`` lines. Usage:
``python benchmarks/mixing.py [--model tiny.en] [--utterance ID] [--sample 16]``
"""

from __future__ import annotations

import argparse
import time

import torch

import xattn_utils as xu
from xattn_utils.analysis.mixing import (
    encoder_mixing,
    encoder_states,
    layer_distances,
    layer_distances_looped,
)
from xattn_utils.audio import N_ENC_FRAMES, n_enc_frames
from xattn_utils.model.decode import features


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--utterance", default=None)
    parser.add_argument("--sample", type=int, default=16)
    args = parser.parse_args()
    loaded = xu.load_model(args.model, "cpu")
    corpus = xu.load_corpus("demo")
    utt = next((u for u in corpus if u.id == args.utterance), corpus[0])
    audio = utt.load()
    s = n_enc_frames(audio)
    states = encoder_states(loaded, features(loaded, audio))
    layer = loaded.model.model.encoder.layers[0]
    rows = torch.cat([torch.arange(s), torch.arange(s, N_ENC_FRAMES, 10)])
    sample = [torch.tensor([j]) for j in range(args.sample)]
    all_frames = [torch.tensor([j]) for j in range(s)]
    fast, t_fast = timed(layer_distances, layer, states[0], all_frames, rows)
    slow, t_slow = timed(layer_distances_looped, layer, states[0], sample, rows)
    err = (fast[:, : args.sample] - slow).abs().max().item()
    print(f"utterance: {utt.id} ({s} speech enc_frames), threads: {torch.get_num_threads()}")
    print(f"layer0_batched_s: {t_fast:.2f}")
    print(f"layer0_looped_s_extrapolated: {t_slow * s / args.sample:.2f}")
    print(f"speedup: {t_slow * s / args.sample / t_fast:.1f}x  (max abs difference {err:.1e})")
    for group in (1, 4):
        _, t = timed(encoder_mixing, loaded, audio, group=group)
        print(f"encoder_mixing_group{group}_s: {t:.1f}")


if __name__ == "__main__":
    main()

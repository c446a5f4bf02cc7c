"""Sampling text from the default model: the layer-stepper sampler vs Hugging Face generate.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
        .venv/bin/python benchmarks/bench_sampling.py [--rows 128] [--length 127] [--corpus]

``interp_edit.editing.keys.sample_token_ids`` draws ROME's context prefixes and the default
``corpus="generated"`` for the key statistics. On Llama-family models it runs on the layer
stepper (key/value buffers, no bridge wrappers) and draws what ``generate`` draws. This runs
one batch of ``--rows`` x ``--length`` new tokens both ways, one after the other in one
process, and prints the wall times, the ratio, and how many rows came out identical.
``--corpus`` then builds the whole default corpus (100,000 tokens, 782 x 128) into a
temporary cache directory, as the first ``ie.edit(..., method="rome")`` on a fresh machine
does, and prints its time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import interp_edit as ie
from interp_edit.arch.stepper import Stepper
from interp_edit.editing import stats
from interp_edit.editing.keys import sample_token_ids


def timed_sample(model, generic: bool, rows: int, length: int) -> tuple[list[list[int]], float]:
    """``rows`` sequences of ``length`` new tokens (one starter, one batch), and the seconds."""
    supports = Stepper.supports
    if generic:  # the path every other model takes: model.hf_model.generate
        Stepper.supports = staticmethod(lambda model: False)
    try:
        t0 = time.perf_counter()
        out = sample_token_ids(model, rows, length, seed=0, exact=True, batch_size=rows,
                               starters=("The",))
        return out, time.perf_counter() - t0
    finally:
        Stepper.supports = supports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--length", type=int, default=127)
    parser.add_argument("--corpus", action="store_true", help="also time the default corpus")
    args = parser.parse_args()

    model = ie.load_model()
    fast, t_fast = timed_sample(model, False, args.rows, args.length)
    slow, t_slow = timed_sample(model, True, args.rows, args.length)
    same = sum(a == b for a, b in zip(fast, slow, strict=True))
    print(f"Sampling from {model.name}, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: one batch of {args.rows} x "
          f"{args.length} new tokens (top-k 5, fp32)\n")
    print("| | s | ms per step |\n|---|---|---|")
    for what, t in (("layer stepper", t_fast), ("Hugging Face generate", t_slow)):
        print(f"| {what} | {t:.1f} | {1000 * t / args.length:.0f} |")
    print(f"\n{t_slow / t_fast:.2f}x faster; {same} of {args.rows} rows identical.")
    if args.corpus:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["INTERP_EDIT_CACHE"] = tmp  # read when the corpus is cached
            t0 = time.perf_counter()
            ids = stats._chunks(model, stats.GENERATED, 100_000, 128, 0, True)
            print(f"\nThe default generated corpus ({ids.shape[0]} x {ids.shape[1]} tokens): "
                  f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

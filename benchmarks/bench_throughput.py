"""Dataset tracing throughput: facts traced per hour on the default model, in this process
(``executor="local"``) and on Ray with 1 and 2 workers, side by side in one run.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_throughput.py \
        [--facts 24] [--samples 10] [--kinds all] [--workers 1x1,2x1,1x2] [--rounds 1]
        [--data DIR] [--gpu-tmacs 20]

Every configuration traces the same first ``--facts`` known_1000 facts (those the model
predicts top-1) from an empty result directory, so each does all the work. A Ray
configuration ``WxT`` is W workers of T torch threads each: the local cluster is started with
W x T CPUs, so the executor gives each worker T threads (1x1 against 2x1 is the scaling of
workers at a fixed budget per worker; 1x2 is the executor's default for one worker here). The rounds
alternate the order of the configurations and the table gives the median, so a machine that
gets busier during the run does not favour one. Times are wall clock; a Ray run's includes
starting its workers (each imports torch and loads the model once), which is also timed
alone and subtracted in the last rate column: the rate a long study reaches.
On a shared machine only the ratios, measured side by side, mean anything.

It ends with the work behind one fact (the fast engine's own multiply-add count, as in
``bench_trace.py``, for the traced kinds, over the traced facts), the same count for a
Llama-2-7B-shaped model, and what a 1,000-fact study costs on N GPUs at an assumed
``--gpu-tmacs`` effective rate per GPU (the units are independent: N workers, N times the
rate). Prints markdown (README.md, "Dataset studies on Ray").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import interp_edit as ie
from interp_edit.jobs import ModelSpec, Plan, open_executor

from bench_trace import Fact, multiply_adds  # benchmarks/, beside this script

# Llama-2-7B's shape (config.json of meta-llama/Llama-2-7b-hf)
LLAMA_7B = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32)


def trace_once(model, facts, args, out: Path, executor: str, workers: int | None) -> tuple:
    """Wall seconds of one trace_dataset from an empty directory, and the facts it kept."""
    t0 = time.perf_counter()
    avg = ie.trace_dataset(model, facts, args.kinds, samples=args.samples, cache_dir=out,
                           executor=executor, workers=workers, progress=False)
    return time.perf_counter() - t0, avg


def start_seconds(model, workers: int, spill: Path) -> float:
    """Wall seconds to start ``workers`` Ray workers (each loads the model) and end them, in
    the cluster that is running."""
    plan = Plan("trace", ModelSpec.of(model, spill), {}, (), str(spill))
    t0 = time.perf_counter()
    with open_executor(plan, model, "ray", workers):
        pass
    return time.perf_counter() - t0


def work_per_fact(model, avg, samples: int) -> tuple[float, float]:
    """Mean multiply-adds of one fact's traces (the traced kinds), on the model and on a
    Llama-2-7B-shaped model tracing the same tokens."""
    big = SimpleNamespace(hf_model=SimpleNamespace(config=LLAMA_7B), n_layers=32,
                          tokenize=model.tokenize, subject_range=model.subject_range)
    kinds = sorted({c.kind for c in avg.conditions if not c.sever})
    ours, theirs = [], []
    for prompt, subject in zip(avg.prompts, avg.subjects):
        fact = Fact(prompt, subject)
        ours.append(sum(multiply_adds(model, fact, samples)[k][1] for k in kinds))
        theirs.append(sum(multiply_adds(big, fact, samples)[k][1] for k in kinds))
    return statistics.mean(ours), statistics.mean(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=24, help="known_1000 facts offered (first N)")
    ap.add_argument("--samples", type=int, default=10, help="noise samples per trace")
    ap.add_argument("--kinds", default="all", help="'all' or one of resid, mlp, attn")
    ap.add_argument("--workers", default="1x1,2x1,1x2",
                    help="Ray configurations to compare: workers x torch threads each")
    ap.add_argument("--rounds", type=int, default=1, help="times each configuration runs")
    ap.add_argument("--gpu-tmacs", type=float, default=20.0,
                    help="assumed effective fp32 rate of one GPU, in 10^12 multiply-adds/s")
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data")  # fmt: skip
    args = ap.parse_args()
    import ray

    model = ie.load_model()
    facts = ie.load_known_facts(args.data / "known_1000.json")[: args.facts]
    cpus = os.cpu_count() or 1
    configs = [("local", None, torch.get_num_threads())] + [
        ("ray", *map(int, c.split("x"))) for c in args.workers.split(",")]
    walls: dict[tuple, list[float]] = {c: [] for c in configs}
    starts: dict[tuple, list[float]] = {c: [] for c in configs if c[0] == "ray"}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for k, c in enumerate(configs if r % 2 == 0 else configs[::-1]):
                if c[0] == "ray":
                    ray.init(num_cpus=c[1] * c[2], include_dashboard=False, log_to_driver=False)
                wall, avg = trace_once(model, facts, args, Path(tmp) / f"{r}-{k}", *c[:2])
                walls[c].append(wall)
                if c in starts:
                    starts[c].append(start_seconds(model, c[1], Path(tmp) / "spill"))
                    ray.shutdown()
        ours, big = work_per_fact(model, avg, args.samples)

    n = avg.n_facts
    print(f"## {model.name}: {n} of {len(facts)} facts kept, kinds {args.kinds}, "
          f"{args.samples} samples; {platform.machine()}, {cpus} CPUs, {args.rounds} round(s)\n")
    print("| executor | workers x torch threads | wall s | worker start s | facts/hour | "
          "facts/hour without the start |")
    print("|---|---|---|---|---|---|")
    rate = {}
    for c in configs:
        wall = statistics.median(walls[c])
        start = statistics.median(starts[c]) if c in starts else 0.0
        rate[c] = 3600 * n / max(wall - start, 1e-9)
        print(f"| {c[0]} | {c[1] or 1} x {c[2]} | {wall:.1f} | {start:.1f} | "
              f"{3600 * n / wall:.0f} | {rate[c]:.0f} |")
    print()
    one = next((c for c in configs if c[0] == "ray" and c[1] == 1), None)
    for c in configs:
        if one is not None and c[0] == "ray" and c[1] > 1:
            print(f"{c[1]} Ray workers x {c[2]} / 1 x {one[2]}: {rate[c] / rate[one]:.2f}x "
                  "(without the start)")
    achieved = ours * n / (3600 * n / rate[configs[0]])
    print(f"\nWork per fact: {ours / 1e9:.1f} GMAC on {model.name} (the fast engine's count; "
          f"{achieved / 1e9:.0f} GMAC/s achieved in-process), {big / 1e12:.2f} TMAC on a "
          f"Llama-2-7B-shaped model ({big / ours:.0f}x).")
    study = 1000 * big
    print(f"A 1,000-fact study on 7B: {study / 1e15:.0f} PMAC; at {args.gpu_tmacs:g} TMAC/s "
          "effective per GPU: " + ", ".join(
              f"{g} GPU{'s' if g > 1 else ''} {study / (g * args.gpu_tmacs * 1e12) / 60:.1f} min"
              for g in (1, 8, 32)) + " (plus one model load per worker).")


if __name__ == "__main__":
    main()

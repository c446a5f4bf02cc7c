"""MEND edit latency on the default model, after the editor is loaded.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE \
        .venv/bin/python benchmarks/bench_mend.py [--editor PATH] [--n 20]

``OMP_WAIT_POLICY=ACTIVE`` keeps torch's OpenMP threads spinning between parallel regions. An
edit is about a thousand small matrix multiplies (16 rows), and with the default policy each
one pays for waking the second thread: ~150 us for a 576 x 192 product that takes 19 us on one
thread. The policy is read when torch loads, so it must be set in the environment; the table's
header prints it. Session 5 measured both (README, "MEND").

``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` (glibc) keep freed
memory in the heap instead of returning it to the system, so the weight-sized and
vocabulary-wide tensors each edit allocates do not page-fault on first touch again (session
6: 13–20 ms an edit). Also the user's choice (the process keeps its peak memory); the header
prints them.

An edit (``interp_edit.editing.mend``) runs the edit prompt + target (and + the old target, for
an editor trained with ``contrast``), up to the last position that predicts a target token,
through the blocks below the first edited one on the layer stepper without gradients (rows
that repeat there, a one-token fact's two, run once), then the edited blocks with gradients, the unembedding only
at the target positions, a backward pass to the first edited block, one pass of the editor
network (and the preconditioner), and adds ΔW to the edited projections. A further pass
(``passes`` > 1) resumes from the first edited block and stops after its forward pass once
p(new) > p(true). Times ``ie.edit(model, [req], method="mend", editor=..., passes=k)`` for
k = 1 (MEND's one pass) and 3 (the default) on the first ``--n`` counterfact-val records (each
edit undone before the next), after one warm-up edit (which also makes the bf16 copies of the
weights below the edit), on the layer stepper with ``below="auto"`` (the default: bf16 on a
CPU with AMX or AVX-512 BF16, as this one) and ``below="model"`` (fp32 throughout) and on
the bridge path that models without the stepper take (forced by installing a hook that
does nothing; it still unembeds only the target positions and resumes later passes from the
first edited block), and splits one pass into its phases: the ranges the library marks with
``torch.profiler.record_function`` ("mend: ...", "edit: ..."), timed by the profiler over 10
edits (which adds its own overhead per operation, most in the many small ones below the
edit), next to a plain forward pass of the same tokens through the bridge (on a busy CPU
every number scales with the load). Prints a markdown table (pasted into README.md, "MEND") with the torch
thread count and the load average, since the CPU is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import interp_edit as ie
from interp_edit.editing.mend import default_editor_path, load_editor
from interp_edit.editing.mend_factors import TargetBatch
from interp_edit.hooks import capture, hooked
from interp_edit.models import resid_hook

from _machine import matmul_rate, up_proj, weight_stream  # benchmarks/, beside this script

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--editor", default=None, help="editor file (default: the cached one)")
    parser.add_argument("--data", default=str(DATA / "counterfact-val.json"))
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()

    model = ie.load_model()
    t0 = time.perf_counter()
    editor = load_editor(model, args.editor)
    load_s = time.perf_counter() - t0
    path = args.editor or default_editor_path(model)
    requests = [r.request for r in ie.load_counterfact(args.data)[: args.n + 1]]

    ie.edit(model, requests[0], method="mend", editor=str(path)).undo()  # warm-up
    # (passes, generic, below): generic=True installs a hook that does nothing, which sends
    # the edit down the bridge path every model takes (the layer stepper does not run bridge
    # hooks, and below does not apply there)
    configs = [(1, False, "auto"), (3, False, "auto"), (1, False, "model"), (3, False, "model"),
               (1, True, "auto"), (3, True, "auto")]
    times: dict[tuple[int, bool, str], list[float]] = {c: [] for c in configs}
    used, resolved = [], ""
    for req in requests[1:]:
        for (passes, generic, below), ts in times.items():
            with hooked(model, [capture(resid_hook(0), {})] if generic else []):
                t0 = time.perf_counter()
                edit = ie.edit(model, req, method="mend", editor=str(path), passes=passes,
                               below=below)
                ts.append(time.perf_counter() - t0)
            edit.undo()
            if (passes, generic, below) == (3, False, "auto"):
                used.append(edit.info["passes"])
                resolved = edit.info["below"]

    # phase by phase: the ranges the library marks with record_function, measured by the
    # profiler over 10 edits (default passes, layer stepper; the profiler adds a little)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for req in requests[1:11]:
            ie.edit(model, req, method="mend", editor=str(path)).undo()
    marked = {e.key: e.cpu_time_total / e.count / 1000 for e in prof.key_averages()
              if e.key.startswith(("mend: ", "edit: "))}
    req = requests[1]
    away = [req.target_true] if editor.config.contrast else None
    batch = TargetBatch.build(model, [req.text] * (2 if away else 1),
                              [req.target_new, *(away or [])])
    floor = []
    for _ in range(5):  # for scale: one plain forward pass of the same tokens
        t0 = time.perf_counter()
        with torch.no_grad():
            model.logits(batch.ids)
        floor.append(1000 * (time.perf_counter() - t0))
    stream_ms, stream_mb = weight_stream(model)
    rows = batch.ids.numel()
    rates = {(n, dt): matmul_rate(up_proj(model), n, dt) for n in (rows, 1024)
             for dt in (torch.float32, torch.bfloat16)}

    ms = {k: sorted(1000 * t for t in ts) for k, ts in times.items()}
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (spin briefly, then sleep)")
    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
              if k in os.environ} or "glibc defaults"
    print(f"MEND edit latency, {model.name}, layers {list(editor.config.layers)}, "
          f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY {policy}, malloc {malloc}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| | ms |\n|---|---|")
    print(f"| load the editor (once) | {1000 * load_s:.0f} |")
    for (k, generic, below), v in ms.items():
        what = (f"passes={k} (default; {statistics.mean(used):.1f} used on average)" if k > 1
                else "passes=1 (MEND)")
        note = f" ({resolved})" if below == "auto" else ""
        path_used = ("bridge path (a hook installed)" if generic
                     else f"layer stepper, below={below}{note}")
        print(f"| edit, {what}, {path_used}: median of {len(v)} (min / max) "
              f"| {statistics.median(v):.0f} ({v[0]:.0f} / {v[-1]:.0f}) |")
    for what, ms_ in marked.items():
        print(f"| per call (profiler, 10 edits): {what} | {ms_:.1f} |")
    print(f"| for scale: one no-grad forward pass of the same tokens (bridge) "
          f"| {statistics.median(floor):.0f} |")
    print(f"| the floor of any pass: every weight matrix read once ({stream_mb:.0f} MB, one "
          f"matrix-vector product each; {stream_mb / stream_ms:.1f} GB/s; median of 5) "
          f"| {stream_ms:.0f} |")
    print(f"\nOne multiply of the MLP's up-projection shape, GMAC/s: at the edit's {rows} rows "
          f"fp32 {rates[rows, torch.float32]:.0f}, bf16 {rates[rows, torch.bfloat16]:.0f}; "
          f"at 1024 rows fp32 {rates[1024, torch.float32]:.0f}, "
          f"bf16 {rates[1024, torch.bfloat16]:.0f}.")


if __name__ == "__main__":
    main()

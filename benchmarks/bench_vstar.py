"""Batched v* against one optimisation per fact, and the layer stepper's path against full
passes through the hooks, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_vstar.py [--n 8] [--layer 7] [--steps 10]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_vstar.py --model gemma-3-270m --layer 4

For ``--n`` CounterFact-edit facts at ``--layer`` (the top of MEMIT's default range), with
MEMIT's default v* settings and a fixed number of steps (``v_nll_stop=0``, so both do the same
work): wall and CPU seconds of one batched optimisation (:func:`optimise_deltas` over all
facts: one forward and backward per step, on the layer stepper from ``--layer`` up, unembedding
only the positions the losses read), of the same with a bridge hook installed (which makes
every step a full pass through the hooks with logits at every position: the path before the
stepper took over) and of ``--n`` one-fact optimisations; the ratios, and the largest
differences between the sets of δ relative to ‖δ‖. Alternating runs, ``--repeats`` each,
median. On a shared machine compare the ratios, not the seconds.
"""

from __future__ import annotations

import statistics
import time

import torch

import interp_edit as ie
from interp_edit import hooks
from interp_edit.arch import adapter
from interp_edit.editing.keys import context_templates, keys_star
from interp_edit.editing.memit import MEMITHparams
from interp_edit.editing.vstar import VOptions, optimise_deltas

from _args import load, parser  # benchmarks/, beside this script


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    model = load(args)
    hp = MEMITHparams(v_steps=args.steps, v_nll_stop=0.0)
    opts = VOptions.of(hp)
    records = ie.load_counterfact(args.data / "counterfact-edit.json")[: args.n]
    facts = [(r.request.template, r.subject, r.target_new) for r in records]
    contexts = context_templates(model, hp.n_prefixes, hp.prefix_len, seed=hp.seed)
    k = keys_star(model, args.layer, [(t, s) for t, s, _ in facts], contexts)
    v0 = k @ adapter(model).mlp_out_matrix(args.layer).detach().T  # W k*, either orientation

    def batched():
        return optimise_deltas(model, args.layer, facts, v0, contexts, opts)[0]

    def through_hooks():
        with hooks.hook_path(model):
            return batched()

    def one_by_one():
        return torch.cat([optimise_deltas(model, args.layer, [f], v0[i:i + 1], contexts, opts)[0]
                          for i, f in enumerate(facts)])

    runs = (("batched", batched), ("batched, full passes through hooks", through_hooks),
            ("one by one", one_by_one))
    times: dict[str, list] = {name: [] for name, _ in runs}
    out = {}
    for _ in range(args.repeats):
        for name, fn in runs:
            w0, c0 = time.perf_counter(), time.process_time()
            out[name] = fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in times.items()}
    def rel(a: str, b: str) -> float:
        return float(((out[a] - out[b]).norm(dim=1) / out[b].norm(dim=1).clamp(min=1e-12)).max())

    print(f"{model.name}")
    print(f"| v* of {args.n} facts, layer {args.layer}, {args.steps} steps, "
          f"{len(contexts)} contexts, {args.threads} thread(s), {hp.precision} | wall s | CPU s |")
    print("|---|---:|---:|")
    for name, (w, c) in med.items():
        print(f"| {name} | {w:.1f} | {c:.1f} |")
    batched_cpu = med["batched"][1]
    print(f"\none by one / batched, CPU seconds: {med['one by one'][1] / batched_cpu:.2f}x; "
          f"max ‖δ_batched − δ_alone‖ / ‖δ_alone‖ = {rel('batched', 'one by one'):.1e}")
    print(f"full passes through hooks / stepper, CPU seconds: "
          f"{med['batched, full passes through hooks'][1] / batched_cpu:.2f}x; max ‖δ_stepper − "
          f"δ_hooks‖ / ‖δ_hooks‖ = {rel('batched', 'batched, full passes through hooks'):.1e}")


if __name__ == "__main__":
    main()

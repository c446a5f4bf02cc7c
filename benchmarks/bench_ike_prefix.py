"""IKE evaluation with the shared-prefix key/value cache against plain passes, side by side in
one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ike_prefix.py [--n 3] [--model NAME]

``ie.evaluate(..., method="ike")`` on the first ``--n`` CounterFact-val records (IKE pool:
counterfact-train.json, default hparams): wall seconds per evaluated fact with the cache (the
default: ``Model.logits`` runs the demonstrations once per batch, :mod:`interp_edit.arch.prefix`)
and without it (a no-op bridge hook installed, so every pass is the bridge's own over the whole
context), their ratio, and the largest difference between the two runs' metrics. One
untimed edit first embeds the pool. On a shared machine compare the ratio, not the seconds.
"""

from __future__ import annotations

import contextlib
import time

import interp_edit as ie
from interp_edit import hooks

from _args import load, parser  # benchmarks/, beside this script


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=3)
    args = ap.parse_args()
    model = load(args)
    records = ie.load_counterfact(args.data / "counterfact-val.json")
    pool = str(args.data / "counterfact-train.json")
    ie.edit(model, [records[0].request], method="ike", pool=pool).undo()  # embeds the pool

    def run(cached: bool) -> tuple[float, list[dict]]:
        plain = hooks.hook_path(model)
        with contextlib.nullcontext() if cached else plain:
            t0 = time.perf_counter()
            rep = ie.evaluate(model, records, method="ike", n=args.n, pool=pool, progress=False)
            seconds = time.perf_counter() - t0
        return seconds / len(rep.rows), rep.rows

    (fast, rows), (slow, want) = run(True), run(False)
    skip = {"seconds", "info_seconds"}
    diff = max((abs(a[k] - b[k]) for a, b in zip(rows, want) for k in a
                if k not in skip and isinstance(a[k], float) and isinstance(b[k], float)),
               default=0.0)
    context = [r.get("info_context_tokens") for r in rows]
    print(f"model {model.name}, {len(rows)} CounterFact-val facts, IKE context tokens {context}")
    print("| path | s / fact |")
    print("|---|---|")
    print(f"| shared-prefix cache | {fast:.2f} |")
    print(f"| plain passes | {slow:.2f} |")
    print(f"ratio plain / cached: {slow / fast:.2f}x; largest metric difference: {diff:.2e}")


if __name__ == "__main__":
    main()

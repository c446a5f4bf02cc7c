"""Causal tracing benchmark: reference vs fast vs attribution on the default model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_trace.py [--facts 20] [--data DIR]

1. One fact (10-token prompt, 10 noise samples), kinds resid/mlp/attn: wall time of the
   reference (one forward pass per cell), the hook-batched fallback (clean run once, 16 cells
   per pass; kind resid only), the fast engine (per kind, and all three kinds sharing runs)
   and attribution patching; speed-ups; the max abs difference from the reference.
2. Attribution vs exact: Pearson r per kind between the attribution estimate and the exact
   (fast) grid, over the first ``--facts`` known facts (Meng et al. 2022) that the model
   predicts (top-1 = the known attribute's first token); only cells at or after the subject's
   first token enter (earlier cells equal ``low_score`` exactly in both).
3. Peak RSS of the process.
Prints markdown tables (pasted into README.md, "Causal tracing").
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

import interp_edit as ie
from interp_edit.tracing import engine, reference
from interp_edit.tracing.inputs import TraceInputs, prepare, select_cells

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
KINDS = ("resid", "mlp", "attn")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fallback(inputs: TraceInputs, kind: str):
    cells = select_cells(inputs, None, None)
    return reference.run(inputs, (kind,), window=10, sever=None, cells=cells, progress=False,
                         cells_per_pass=engine._FALLBACK_CELLS_PER_PASS)  # fmt: skip


def speed_table(model, samples: int) -> list[str]:
    ntok = len(model.tokenize(PROMPT))
    kw = dict(samples=samples, progress=False)
    rows, totals = [], {"reference": 0.0, "fast": 0.0, "attribution": 0.0}
    for kind in KINDS:
        def run(method):
            return timed(lambda: ie.trace(model, PROMPT, SUBJECT, kind=kind, method=method, **kw))

        ref, t_ref = run("reference")
        fast, t_fast = run("fast")
        _, t_att = run("attribution")
        diff = float((fast.scores - ref.scores).abs().max())
        batched = "–"
        if kind == "resid":  # one kind shows what batching cells through hooks buys
            inputs = prepare(model, PROMPT, SUBJECT, None, samples, "s3", 1)
            (fb, _), t_fb = timed(lambda: fallback(inputs, kind))
            diff, batched = max(diff, float((fb[kind] - ref.scores).abs().max())), f"{t_fb:.1f}"
        for name, t in zip(totals, (t_ref, t_fast, t_att)):
            totals[name] += t
        print(f"  {kind}: reference {t_ref:.1f}s fast {t_fast:.2f}s diff {diff:.1e}", flush=True)
        rows.append(f"| {kind} | {t_ref:.1f} | {batched} | {t_fast:.2f} | {t_att:.2f} | "
                    f"{t_ref / t_fast:.1f}x | {t_fast / t_att:.0f}x | {diff:.1e} |")  # fmt: skip
    _, t_all = timed(lambda: ie.trace_all(model, PROMPT, SUBJECT, **kw))
    _, t_all_att = timed(lambda: ie.trace_all(model, PROMPT, SUBJECT, method="attribution", **kw))
    r, f, a = totals.values()
    return [
        f"Prompt {PROMPT!r} ({ntok} tokens), subject {SUBJECT!r}, {samples} noise samples, "
        f"{model.n_layers} layers; times in seconds.",
        "",
        "| kind | reference | hook-batched | fast | attribution | fast vs reference "
        "| attribution vs fast | max abs diff vs reference |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        f"| all three (sum) | {r:.1f} | | {f:.2f} | {a:.2f} | {r / f:.1f}x | {f / a:.0f}x | |",
        f"| all three (`trace_all`) | | | {t_all:.2f} | {t_all_att:.2f} | {r / t_all:.1f}x "
        f"| {t_all / t_all_att:.0f}x | |",
    ]


def known_facts(model, path: Path, n: int) -> list[dict]:
    out = []
    for rec in json.loads(path.read_text()):
        target = model.target_ids(rec["attribute"])[0]
        if int(model.last_logits([rec["prompt"]])[0].argmax()) == target:
            out.append(rec)
            if len(out) == n:
                break
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def attribution_table(model, facts: list[dict], samples: int) -> list[str]:
    per_kind = {k: [] for k in KINDS}
    pooled = {k: ([], []) for k in KINDS}
    t_exact = t_att = 0.0
    for rec in facts:
        kw = dict(target=rec["attribute"], samples=samples, progress=False)
        exact, dt = timed(lambda: ie.trace_all(model, rec["prompt"], rec["subject"], **kw))
        t_exact += dt
        approx, dt = timed(lambda: ie.trace_all(model, rec["prompt"], rec["subject"],
                                                method="attribution", **kw))  # fmt: skip
        t_att += dt
        start = exact.resid.subject_range[0]
        for k in KINDS:
            e, a = exact[k].indirect_effect[start:], approx[k].indirect_effect[start:]
            per_kind[k].append(pearson(a, e))
            pooled[k][0].append(a.flatten())
            pooled[k][1].append(e.flatten())
        rs = " ".join(f"{k} {per_kind[k][-1]:.2f}" for k in KINDS)
        print(f"  fact {len(per_kind['resid'])}/{len(facts)} {rec['prompt']!r}: r {rs}", flush=True)
    lines = [
        f"{len(facts)} known facts the model predicts, {samples} samples; exact (fast, "
        f"`trace_all`) {t_exact:.0f} s in all, attribution {t_att:.1f} s "
        f"({t_exact / t_att:.0f}x faster).",
        "",
        "| kind | Pearson r, mean over facts | median | min | r, all cells pooled |",
        "|---|---|---|---|---|",
    ]
    for k in KINDS:
        rs = torch.tensor(per_kind[k])
        pool = pearson(torch.cat(pooled[k][0]), torch.cat(pooled[k][1]))
        lines.append(f"| {k} | {rs.mean():.2f} | {rs.median():.2f} | {rs.min():.2f} | {pool:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data")  # fmt: skip
    args = ap.parse_args()
    model = ie.load_model()
    print(f"## {model.name} on {platform.machine()}, {torch.get_num_threads()} torch threads\n")
    print("\n".join(speed_table(model, args.samples)), "\n", flush=True)
    facts = known_facts(model, args.data / "known_1000.json", args.facts)
    print("\n".join(attribution_table(model, facts, args.samples)), "\n")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"Peak RSS: {rss:.2f} GiB")


if __name__ == "__main__":
    main()

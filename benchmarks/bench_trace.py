"""Causal tracing benchmark: reference vs fast vs attribution on the default model.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_trace.py \
        [--facts 20] [--pearson-samples 3] [--pearson-only] [--steps] [--work-only] [--profile]
        [--data DIR] [--model FAMILY|tiny|PATH]

``--model``: fast vs reference side by side on another model (a tiny random model of a family,
every family, or a path / name for ``ie.load_model``), see ``_families.py``.

1. One fact (10-token prompt, 10 noise samples), kinds resid/mlp/attn: wall and CPU time of the
   reference (one forward pass per cell), the fast engine (per kind, and all three kinds sharing
   runs) and attribution patching in fp32 (``precision="model"``); speed-ups; the max abs
   difference from the reference. Then attribution with ``precision="auto"`` (the default:
   bf16 multiplies where the CPU has them) per kind: its CPU time, its speed-up over fast and
   reference, and how far its grid is from the fp32 one (Pearson r over the computed cells,
   the low_score difference).
   CPU time (``time.process_time``, one torch thread) is the steadier yardstick on a shared
   machine; both are printed (for attribution, the median of 5 runs; the exact methods run
   once, 20-100 s each). ``--steps`` adds where the speed comes from (kind resid): each
   step of the fast engine with its multiply-adds, and CPU time for those that run alone (the
   hook-batched fallback with and without full logits).
2. Attribution vs exact: Pearson r per kind between the attribution estimate and the exact
   (fast) grid, over the first ``--facts`` known facts (Meng et al. 2022) that the model
   predicts (top-1 = the known attribute's first token), with ``--pearson-samples`` noise
   samples; only cells at or after the subject's first token enter (earlier cells equal
   ``low_score`` exactly in both); for the default screen (``estimate="logodds"``) in fp32
   and at ``precision="auto"``, and for ``estimate="prob"`` (first order in p) in fp32; with
   Spearman's r (ranks) and how often the exact grid's peak cell is among the screen's top 5.
   ``--pearson-only`` runs this part alone.
3. Peak RSS of the process.
The first line counts multiply-adds, reference / fast, from the engine's own plans: the
ceiling of the speed-up when both run their matrix multiplies equally fast. The second divides
them by each method's CPU time, next to the CPU's fp32 matrix-multiply peak. The third times
one multiply of that shape in each dtype, with the dtype of its output: whether a lower
precision could take an exact engine past the fp32 ceiling (``--work-only`` prints the first
and the third). ``--profile`` prints where the fast engine's time goes instead: the share in
matrix multiplies and their rate.
Prints markdown tables (pasted into README.md, "Measured so far").
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import interp_edit as ie
from interp_edit.tracing import engine, reference
from interp_edit.tracing.inputs import plan, prepare, select_cells

from _families import side_by_side  # benchmarks/, beside this script
from _machine import dtype_line, matmul_rate, up_proj

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"  # defaults
KINDS = ("resid", "mlp", "attn")
SCREEN_REPEATS = 5  # attribution timings: the median of this many runs


class Fact(NamedTuple):
    prompt: str
    subject: str


def timed(fn, repeat: int = 1):
    """``fn()``, its wall time and its CPU time (seconds); with ``repeat``, the median of that
    many runs (for the sub-second screens, whose single runs vary by ~10% here)."""
    runs = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = (sorted(r[i] for r in runs)[len(runs) // 2] for i in (0, 1))
    return out, wall, cpu


def speed_table(model, fact: Fact, samples: int, macs: dict[str, tuple[float, float]]
                ) -> tuple[list[str], dict[str, tuple[float, float]], Tensor]:
    """The speed table's lines; CPU seconds of (reference, fast) per kind; the reference's
    resid grid."""
    ntok = len(model.tokenize(fact.prompt))
    kw = dict(samples=samples, progress=False)
    rows, low_rows = [], []
    totals = {m: [0.0, 0.0] for m in ("reference", "fast", "attribution")}
    cpu, ref_resid = {}, None  # kind -> CPU seconds of (reference, fast)
    # the bf16 copies of the weights are made once per process (as for MEND's warm-up edit)
    ie.trace(model, *fact, method="attribution", precision="auto", **kw)
    for kind in KINDS:
        def run(method):  # the screen in fp32 here (the model's dtype); bf16 just below
            return timed(lambda: ie.trace(model, *fact, kind=kind, method=method,
                                          precision="model", **kw),
                         SCREEN_REPEATS if method == "attribution" else 1)

        times = {}
        ref, *times["reference"] = run("reference")
        fast, *times["fast"] = run("fast")
        attr, *times["attribution"] = run("attribution")
        # the screen with precision="auto" (bf16 multiplies where the CPU has them)
        low, _, lc = timed(lambda: ie.trace(model, *fact, kind=kind, method="attribution",
                                            precision="auto", **kw), SCREEN_REPEATS)
        keep = ~attr.scores.isnan()
        low_rows.append(f"| {kind} | {times['attribution'][1]:.2f} | {lc:.2f} ({low.precision}) "
                        f"| {times['fast'][1] / lc:.0f}x | {times['reference'][1] / lc:.0f}x "
                        f"| {pearson(attr.scores[keep], low.scores[keep]):.4f} "
                        f"| {abs(low.low_score - attr.low_score):.1e} |")
        diff = float((fast.scores - ref.scores).abs().max())
        ref_resid = ref.scores if kind == "resid" else ref_resid
        for name, (w, c) in times.items():
            totals[name][0] += w
            totals[name][1] += c
        (rw, rc), (fw, fc), (aw, ac) = times.values()
        cpu[kind] = (rc, fc)
        print(f"  {kind}: reference {rw:.1f}s fast {fw:.2f}s attribution {aw:.2f}s "
              f"diff {diff:.1e}", flush=True)  # fmt: skip
        rows.append(f"| {kind} | {rw:.1f} / {rc:.1f} | {fw:.2f} / {fc:.2f} | "
                    f"{aw:.2f} / {ac:.2f} | {rw / fw:.1f}x / {rc / fc:.1f}x | "
                    f"{fw / aw:.0f}x / {fc / ac:.0f}x | {rw / aw:.0f}x / {rc / ac:.0f}x "
                    f"| {diff:.1e} |")  # fmt: skip
    _, aw, ac = timed(lambda: ie.trace_all(model, *fact, **kw))
    _, bw, bc = timed(lambda: ie.trace_all(model, *fact, method="attribution",
                                           precision="model", **kw),
                      SCREEN_REPEATS)
    (rw, rc), (fw, fc), (tw, tc) = totals.values()
    lines = [
        work_line(macs),
        throughput_line(model, macs, cpu),
        dtype_line(up_proj(model), 1024),
        "",
        f"Prompt {fact.prompt!r} ({ntok} tokens), subject {fact.subject!r}, {samples} noise "
        f"samples, "
        f"{model.n_layers} layers; seconds per trace, wall / CPU.",
        "",
        "| kind | reference | fast | attribution (fp32) | fast vs reference "
        "| attribution vs fast | attribution vs reference | max abs diff vs reference |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        f"| all three (sum) | {rw:.1f} / {rc:.1f} | {fw:.2f} / {fc:.2f} | {tw:.2f} / {tc:.2f} "
        f"| {rw / fw:.1f}x / {rc / fc:.1f}x | {fw / tw:.0f}x / {fc / tc:.0f}x "
        f"| {rw / tw:.0f}x / {rc / tc:.0f}x | |",
        f"| all three (`trace_all`) | | {aw:.2f} / {ac:.2f} | {bw:.2f} / {bc:.2f} "
        f"| {rw / aw:.1f}x / {rc / ac:.1f}x | {aw / bw:.0f}x / {ac / bc:.0f}x "
        f"| {rw / bw:.0f}x / {rc / bc:.0f}x | |",
        "",
        "Attribution with `precision=\"auto\"` (bf16 multiplies, forward and backward, where "
        "the CPU has them; the default) next to the fp32 one; CPU seconds:",
        "",
        "| kind | attribution fp32 | attribution auto | fast vs auto | reference vs auto "
        "| Pearson r, auto vs fp32 grid | abs diff of low_score |",
        "|---|---|---|---|---|---|---|",
        *low_rows,
    ]
    return lines, cpu, ref_resid


class Costs(NamedTuple):
    """The default model's matrix sizes in layer-positions: one layer at one position is
    ``unit`` multiply-adds (q, o; k, v; the MLP)."""

    unit: float
    unembed: float  # one position's unembedding
    mlp: float  # one position's MLP
    kv: float  # one position's k and v projections
    L: int

    @classmethod
    def of(cls, model) -> "Costs":
        cfg = model.hf_model.config
        d = cfg.hidden_size
        kv = cfg.num_key_value_heads * d // cfg.num_attention_heads
        mlp = 3 * d * cfg.intermediate_size
        unit = 2 * d * d + 2 * d * kv + mlp
        return cls(unit, d * cfg.vocab_size / unit, mlp / unit, 2 * d * kv / unit, model.n_layers)


def multiply_adds(model, fact: Fact, samples: int, window: int = 10
                  ) -> dict[str, tuple[float, float]]:
    """Multiply-adds of one trace per kind, ``(reference, fast)``: the matrix multiplies of the
    layers and the unembedding (attention scores are negligible at this length), the fast
    engine's counted from its own plans and state sharing. Their ratio is the ceiling of the
    speed-up when both run their matrix multiplies equally fast."""
    c, T = Costs.of(model), len(model.tokenize(fact.prompt))
    subject_start = model.subject_range(*fact)[0]
    L, unembed = c.L, c.unembed
    ref = L * T * T * (L + unembed)  # every cell: every layer at every position, full logits
    out = {}
    for kind in KINDS:
        work = 0.0
        for t in range(subject_start, T):
            plans = [engine.effective_plan(plan(kind, layer, window, L), t, T, L)
                     for layer in range(L)]  # fmt: skip
            plans = [p for p in plans if p and not (t == T - 1 and p[0].layer == L - 1
                                                   and p[0].site == "resid")]  # fmt: skip
            work += len(plans) * unembed
            for j in range(min((p[0].layer for p in plans), default=L), L):
                for key in {engine._prefix(p, j) for p in plans if p[0].layer <= j}:
                    first = not engine._prefix(key, j - 1)
                    rows = 1 if first else T - t
                    cost = 1 + (rows - 1) * c.kv if j == L - 1 and not first else rows
                    restored_mlp = any(r.layer == j and r.site == "mlp" for r in key)
                    work += cost - (c.mlp if restored_mlp else 0)
        out[kind] = (ref * c.unit * samples, work * c.unit * samples)
    return out


def work_line(macs: dict[str, tuple[float, float]]) -> str:
    bound = ", ".join(f"{k} {r / f:.1f}x" for k, (r, f) in macs.items())
    return f"Multiply-adds, reference / fast (the ceiling at equal efficiency): {bound}."


def work_spread(model, path: Path, samples: int, n: int = 200) -> str:
    """The multiply-add ceiling over the first ``n`` known facts' prompts: it depends on where
    the subject starts (tokens before it cost the fast engine nothing) and on the length."""
    ratios = {k: [] for k in KINDS}
    starts = []
    for rec in json.loads(path.read_text())[:n]:
        fact = Fact(rec["prompt"], rec["subject"])
        starts.append(model.subject_range(*fact)[0])
        for k, (ref, fast) in multiply_adds(model, fact, samples).items():
            ratios[k].append(ref / fast)
    spread = ", ".join(f"{k} median {torch.tensor(v).median():.1f}x (min {min(v):.1f}x, "
                       f"max {max(v):.1f}x)" for k, v in ratios.items())
    at_zero = sum(s == 0 for s in starts)
    return (f"Over the first {len(starts)} known facts' prompts ({at_zero} with the subject at "
            f"token 0): {spread}.")


def steps_table(model, fact: Fact, samples: int, macs: dict[str, tuple[float, float]],
                cpu: dict[str, tuple[float, float]], ref_grid: Tensor) -> list[str]:
    """Where the fast engine's speed comes from, kind ``"resid"``: each step's multiply-adds
    (counted) and, for the steps that run on their own, CPU time (the reference and the fast
    engine from the speed table; the hook-batched fallback measured here)."""
    c, T = Costs.of(model), len(model.tokenize(fact.prompt))
    L, U, S = c.L, c.unembed, samples * c.unit
    inputs = prepare(model, *fact, None, samples, "s3", 1)
    cells = select_cells(inputs, None, None)

    def batched(last_logits: bool) -> tuple[float, float]:
        (grids, *_), _, sec = timed(lambda: reference.run(
            inputs, ("resid",), window=10, sever=None, cells=cells, progress=False,
            cells_per_pass=engine._FALLBACK_CELLS_PER_PASS, last_logits=last_logits))
        return sec, float((grids["resid"] - ref_grid).abs().max())

    ref_sec, fast_sec = cpu["resid"]
    steps = [  # (what, multiply-adds, (CPU seconds, max abs diff) or None)
        ("reference: one pass per cell over the samples, logits at every position",
         L * T * T * (L + U), (ref_sec, 0.0)),
        (f"+ {engine._FALLBACK_CELLS_PER_PASS} cells per pass, through the hooks",
         L * T * T * (L + U), batched(False)),
        ("+ logits at the last position only (the fallback for other models)",
         L * T * (T * L + U), batched(True)),
        ("+ layers from the restored one on only (layer stepper; counted, not run alone)",
         T * (T * L * (L - 1) / 2 + L * U), None),
        ("+ positions from the restored token on only (cached keys/values; counted)",
         L * (L - 1) / 2 * T * (T + 1) / 2 + T * L * U, None),
        ("+ no compute for cells that provably change nothing, shared states, replaced "
         "MLP rows skipped: the fast engine", macs["resid"][1] / S, (fast_sec, None)),
    ]
    lines = ["Where the speed comes from (kind resid; each step adds to the ones above):", "",
             "| step | multiply-adds (G) | vs reference, counted | CPU s | vs reference, "
             "measured | max abs diff vs reference |", "|---|---|---|---|---|---|"]
    ref_work = steps[0][1]
    for what, work, run in steps:
        sec, diff = run or (None, None)
        lines.append(f"| {what} | {work * S / 1e9:.0f} | {ref_work / work:.1f}x | "
                     + (f"{sec:.1f} | {ref_sec / sec:.1f}x" if sec else "– | –")
                     + (f" | {diff:.1e} |" if diff is not None else " | |"))
    return lines


def throughput_line(model, macs: dict[str, tuple[float, float]],
                    cpu: dict[str, tuple[float, float]]) -> str:
    """Multiply-adds per CPU second of each method, next to one large fp32 multiply of the
    MLP's shape (1024 rows, the fast engine's batch size): how much of the gap to the goal is
    left to efficiency rather than to work."""
    rates = ", ".join(f"{k} {macs[k][0] / rc / 1e9:.0f} / {macs[k][1] / fc / 1e9:.0f}"
                      for k, (rc, fc) in cpu.items())
    return (f"Multiply-adds per CPU second (GMAC/s), reference / fast: {rates}; one fp32 "
            f"matrix multiply of the MLP's shape at 1024 rows: "
            f"{matmul_rate(up_proj(model), 1024):.0f}.")


def profile_lines(model, fact: Fact, samples: int,
                  macs: dict[str, tuple[float, float]]) -> list[str]:
    """Where the fast engine's CPU time goes (kind resid, one trace under torch.profiler):
    the share in matrix multiplies (``mm``, ``addmm``: the layers and the unembedding) and the
    rate they run at, counting the engine's own multiply-adds; then the largest other ops. With
    every multiply at the CPU's fp32 rate and nothing else, the speed-up over the reference
    could not pass the ceiling times (that rate / the reference's)."""
    from torch.profiler import ProfilerActivity, profile

    kw = dict(kind="resid", samples=samples, progress=False)
    ie.trace(model, *fact, method="fast", **kw)  # warm: the stepper's masks, the allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ie.trace(model, *fact, method="fast", **kw)
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(ops.values())
    gemm = ops.get("aten::mm", 0.0) + ops.get("aten::addmm", 0.0)
    others = sorted(((t, k) for k, t in ops.items() if k not in ("aten::mm", "aten::addmm")),
                    reverse=True)[:6]
    return [
        f"Fast engine, kind resid, under torch.profiler: {total:.2f} CPU s; matrix multiplies "
        f"(aten::mm + aten::addmm) {gemm:.2f} s = {gemm / total:.0%}, at "
        f"{macs['resid'][1] / gemm / 1e9:.0f} GMAC/s (the engine's counted multiply-adds).",
        "Largest other ops (self CPU s): "
        + ", ".join(f"{k.removeprefix('aten::')} {t:.2f}" for t, k in others) + ".",
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


def rank(a: torch.Tensor) -> torch.Tensor:
    """Each cell's rank (ties broken by position): Pearson r of ranks is Spearman's."""
    return a.flatten().argsort().argsort().float()


PLATEAU = 0.02  # "as good as the peak": within this share of the grid's range below the peak


def plateau_floor(exact: torch.Tensor) -> torch.Tensor:
    """The lowest score "as good as the peak": :data:`PLATEAU` of the exact grid's range below
    its maximum. The exact peaks of a trace often lie on a plateau of near-equal cells
    (restoring the last subject token's hidden state at any early layer restores about as
    much), where which cell is the maximum is decided by the noise samples; the columns built
    on this say whether a screen finds the plateau, and how wide it is."""
    top = exact.max()
    return top - PLATEAU * (top - exact.min())


SCREENS = {  # name -> trace options of the screens compared with the exact grid
    "logodds": dict(method="attribution", precision="model", estimate="logodds"),
    "prob": dict(method="attribution", precision="model", estimate="prob"),
    "ig-4": dict(method="attribution", precision="model", estimate="ig-4"),
    "atpstar": dict(method="attribution", precision="model", estimate="atpstar"),
    "atpstar, auto": dict(method="attribution", precision="auto", estimate="atpstar"),
    "atpstar + exact top 10": dict(method="screen+exact", precision="model",
                                   estimate="atpstar", top=10),
    "logodds + exact top 10": dict(method="screen+exact", precision="model",
                                   estimate="logodds", top=10),
}


def attribution_table(model, facts: list[dict], samples: int,
                      screens: dict[str, dict] = SCREENS) -> list[str]:
    """Each screen (``screens``, default :data:`SCREENS`) against the exact (fast) grid, per kind: Pearson r and
    Spearman r over the cells from the subject's first token on, whether the exact peak is
    among the screen's top 5 cells (and a cell of its plateau, :func:`plateau_floor`), and
    whether the reported peak (for the confirmed screens the best exact cell) is the exact
    peak, the same (token, layer), or on its plateau (a confirmed cell's score
    can differ from the exact trace's by float rounding where the two run different paths,
    ~1e-7 on Gemma 3's windows); CPU time relative to the exact ``trace_all``, all run side by
    side in this process."""
    sample = next(iter(screens))
    keys = [(p, k) for p in screens for k in KINDS]
    per_kind, ranks, hits, near5, peaks, near, wide = ({key: [] for key in keys}
                                                       for _ in range(7))
    seconds = {"exact": 0.0, **{p: 0.0 for p in screens}}
    drops = []  # per fact: how far the corruption moves the answer's probability
    ran = "model"
    for rec in facts:
        kw = dict(target=rec["attribute"], samples=samples, progress=False)
        exact, _, dt = timed(lambda: ie.trace_all(model, rec["prompt"], rec["subject"], **kw))
        seconds["exact"] += dt
        start = exact.resid.subject_range[0]
        drops.append(exact.resid.high_score - exact.resid.low_score)
        for p, options in screens.items():
            approx, _, dt = timed(lambda: ie.trace_all(
                model, rec["prompt"], rec["subject"], **options, **kw))
            seconds[p] += dt
            ran = approx.resid.precision if options["precision"] == "auto" else ran
            for k in KINDS:
                e, a = exact[k].indirect_effect[start:], approx[k].indirect_effect[start:]
                per_kind[p, k].append(pearson(a, e))
                ranks[p, k].append(pearson(rank(a), rank(e)))
                top5 = a.flatten().topk(5).indices
                hits[p, k].append(bool((top5 == e.flatten().argmax()).any()))
                floor = plateau_floor(exact[k].indirect_effect)
                near5[p, k].append(bool((e.flatten()[top5] >= floor).any()))
                reported = approx[k].top_cells(1)[0][:2]  # (token, layer)
                peaks[p, k].append(reported == exact[k].top_cells(1)[0][:2])
                near[p, k].append(bool(exact[k].indirect_effect[reported] >= floor))
                wide[p, k].append(int((exact[k].indirect_effect >= floor).sum()))
        rs = "; ".join(f"{p}: " + " ".join(f"{k} {per_kind[p, k][-1]:.2f}" for k in KINDS)
                       for p in screens)
        print(f"  fact {len(per_kind[sample, 'resid'])}/{len(facts)} {rec['prompt']!r}: "
              f"drop {drops[-1]:.3f}, r {rs}", flush=True)
    t_exact = seconds["exact"]
    cost = ", ".join(f"{p} {seconds[p]:.1f} s (1/{t_exact / seconds[p]:.0f})" for p in screens)
    lines = [
        f"{len(facts)} known facts the model predicts, {samples} samples; CPU time, all three "
        f"kinds (`trace_all`), side by side in one process: exact (fast) {t_exact:.0f} s; "
        f"{cost}. `auto` ran {ran} multiplies here.",
        "",
        "| kind | screen | Pearson r, mean over facts | median | min | Spearman r, mean "
        "| exact peak in the screen's top 5 "
        f"| a cell within {PLATEAU:.0%} of the peak in the top 5 | reported peak = exact peak "
        f"| reported peak's exact score within {PLATEAU:.0%} of the peak's "
        "| cells that close to the peak, median |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in KINDS:
        for p in screens:
            rs = torch.tensor(per_kind[p, k])
            spear = torch.tensor(ranks[p, k]).mean()
            lines.append(f"| {k} | {p} | {rs.mean():.2f} | {rs.median():.2f} | "
                         f"{rs.min():.2f} | {spear:.2f} | {sum(hits[p, k])}/{len(hits[p, k])} "
                         f"| {sum(near5[p, k])}/{len(near5[p, k])} "
                         f"| {sum(peaks[p, k])}/{len(peaks[p, k])} "
                         f"| {sum(near[p, k])}/{len(near[p, k])} "
                         f"| {torch.tensor(wide[p, k]).median().item()} |")
    d = torch.tensor(drops)
    strong = torch.zeros(len(d), dtype=torch.bool)
    strong[d.argsort()[len(d) // 2:]] = True  # the half the corruption moves most
    lines += [
        "",
        f"Pearson r by how far the corruption moves the answer (p clean − p corrupted): mean "
        f"over the {int(strong.sum())} facts it moves most (drop ≥ {d[strong].min():.3f}) / "
        f"the {int((~strong).sum())} others.",
        "",
        "| screen | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for p in screens:
        cells = []
        for k in KINDS:
            rs = torch.tensor(per_kind[p, k])
            cells.append(f"{rs[strong].mean():.2f} / {rs[~strong].mean():.2f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20,
                    help="known facts in the Pearson part (0: skip that part)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--pearson-samples", type=int, default=3,
                    help="noise samples per trace in the Pearson part (both methods)")
    ap.add_argument("--steps", action="store_true",
                    help="also the table of each fast-engine step's gain (kind resid; runs the "
                         "hook-batched fallback twice)")
    ap.add_argument("--profile", action="store_true",
                    help="print where the fast engine's time goes (kind resid, torch.profiler): "
                         "the share in matrix multiplies and their rate")
    ap.add_argument("--work-only", action="store_true",
                    help="print the multiply-add ratios only, for the prompt and over the first "
                         "200 known facts (seconds, no tracing)")
    ap.add_argument("--pearson-only", action="store_true",
                    help="skip the speed table: only the Pearson part")
    ap.add_argument("--screens", default=None,
                    help="comma-separated names of the screens to compare (default: all of "
                         "SCREENS)")
    ap.add_argument("--prompt", default=PROMPT, help="the traced fact's prompt")
    ap.add_argument("--subject", default=SUBJECT, help="the traced fact's subject")
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data")  # fmt: skip
    ap.add_argument("--model", help="fast vs reference on this model instead: a family's tiny "
                    "model (e.g. gpt2), 'tiny' for every family, or a path / name")
    ap.add_argument("--trace-model", default=None,
                    help="the model of the speed and Pearson parts: a built-in name or a path "
                         "(default: the default built-in model)")
    args = ap.parse_args()
    if args.model:
        print(f"## fast vs reference, {torch.get_num_threads()} torch threads, CPU seconds\n")
        return print("\n".join(side_by_side(args.model, args.prompt, args.subject,
                                             args.samples)))
    model = ie.load_model(args.trace_model)
    print(f"## {model.name} on {platform.machine()}, {torch.get_num_threads()} torch threads\n")
    fact = Fact(args.prompt, args.subject)
    macs = multiply_adds(model, fact, args.samples)
    if args.work_only:
        print(work_line(macs))
        print(dtype_line(up_proj(model), 1024))
        return print(work_spread(model, args.data / "known_1000.json", args.samples))
    if args.profile:
        return print("\n".join(profile_lines(model, fact, args.samples, macs)))
    if not args.pearson_only:
        lines, cpu, ref_resid = speed_table(model, fact, args.samples, macs)
        print("\n".join(lines), "\n", flush=True)
        if args.steps:
            print("\n".join(steps_table(model, fact, args.samples, macs, cpu, ref_resid)),
                  "\n", flush=True)
        print(f"Peak RSS after the speed part: {peak_rss():.2f} GiB\n", flush=True)
    if args.facts < 1:
        return
    facts = known_facts(model, args.data / "known_1000.json", args.facts)
    screens = SCREENS if args.screens is None else {
        name: SCREENS[name] for name in args.screens.split(",")}
    print("\n".join(attribution_table(model, facts, args.pearson_samples, screens)), "\n")
    print(f"Peak RSS: {peak_rss():.2f} GiB")


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


if __name__ == "__main__":
    main()

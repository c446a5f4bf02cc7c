"""Causal tracing of the default model over ROME's known facts: figures and a peak table.

    .venv/bin/python analyses/trace_known_facts.py --limit 60

Regenerates, from scratch, into figures/:
  trace_example.png/.pdf         hidden state | MLP | attention heatmaps of one fact (ROME Fig. 1)
  trace_example_mlp.png/.pdf     the MLP heatmap alone, at paper-column width
  trace_aie.png/.pdf             AIE by layer per token group, 95% CIs (ROME Fig. 2)
  trace_aie_heatmaps.png/.pdf    the same means as token-group x layer heatmaps
  trace_severed.png/.pdf         AIE at the last subject token, MLP/attention severed (Fig. 3)
  known_facts_peaks.md           where each kind's AIE peaks, with CIs, and the run's settings

Per-fact traces are cached (see ie.trace_dataset), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import interp_edit as ie
from interp_edit.plotting import plot_trace, style
from interp_edit.tracing.average import peak_table
from interp_edit.tracing.results import TraceSet

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=Path, default=ROOT.parent / "shared" / "data" / "known_1000.json")
    p.add_argument("--limit", type=int, default=None, help="trace only the first N facts")
    p.add_argument("--samples", type=int, default=10, help="noise samples per trace (ROME: 10)")
    p.add_argument("--out", type=Path, default=ROOT / "figures")
    p.add_argument("--cache-dir", type=Path, default=None, help="per-fact trace cache")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = ie.load_model()
    facts = ie.load_known_facts(args.path)
    avg = ie.trace_dataset(model, facts, kinds="all", sever=True, limit=args.limit,
                           samples=args.samples, noise="s3", cache_dir=args.cache_dir)
    minutes = (time.perf_counter() - t0) / 60
    out = args.out

    example = pick_example(model, avg)
    traces = TraceSet(*(avg.fact_trace(example, k) for k in ("resid", "mlp", "attn")))
    style.save_figure(traces.plot(), out / "trace_example")
    style.save_figure(plot_trace(traces.mlp), out / "trace_example_mlp")
    style.save_figure(avg.plot(), out / "trace_aie")
    style.save_figure(avg.plot_heatmaps(), out / "trace_aie_heatmaps")
    style.save_figure(avg.plot_severed(), out / "trace_severed")

    command = "analyses/trace_known_facts.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    (out / "known_facts_peaks.md").write_text(report(avg, command, minutes, traces))
    print((out / "known_facts_peaks.md").read_text())


def pick_example(model, avg) -> int:
    """A readable example: a multi-token subject whose corruption hurts most (largest total
    effect), so the restored cells stand out."""
    lows = avg.low_scores[avg.conditions.index(avg.condition("resid"))]
    effect = (avg.high_scores - lows).tolist()
    multi = [i for i in range(avg.n_facts)
             if (lambda r: r[1] - r[0])(model.subject_range(avg.prompts[i], avg.subjects[i])) > 1]
    return max(multi or range(avg.n_facts), key=lambda i: effect[i])


def report(avg, command: str, minutes: float, example: TraceSet) -> str:
    r = example.resid
    return f"""# Where SmolLM2-135M-Instruct's known facts peak (causal tracing)

Regenerate: `.venv/bin/python {command.strip()}` ({minutes:.1f} min on a 2-core CPU with
other jobs running; per-fact traces are cached, so a rerun takes seconds).

- model: {avg.model_name}; facts: the first {avg.n_candidates} of known_1000, of which the model
  predicts {avg.n_facts} top-1 (only those are traced)
- corruption: Gaussian noise on the subject tokens' embeddings, std {avg.noise_std:.4f}
  ({avg.noise_source}); {avg.samples} noise samples, seed {avg.seed}; MLP/attention window
  {avg.window}; exact traces
- average total effect (clean minus corrupted p(target)): {avg.total_effect:.3f}
- AIE = mean over facts of (p(target) with the state restored - corrupted p(target)); a token
  group with several tokens is averaged within each fact first; 95% CI is a Student-t interval
  over facts; n = facts behind the number
- example fact in figures/trace_example.png: {r.prompt!r} -> {r.target!r}
  (clean p {r.high_score:.2f}, corrupted {r.low_score:.2f})

{peak_table(avg)}"""


if __name__ == "__main__":
    main()

"""What an edit does inside the model: the edit-effect figures of README "What does an edit do?".

For one fact the default model knows, edit it with ROME and with a second editor (MEND when a
trained editor exists for the model, else fine-tuning of one MLP, "ft"), and draw for each:

- ``figures/edit_effects_<method>_curves.png``: per-layer change of the residual stream, MLP
  and attention outputs at the last token, for the edit prompt, a paraphrase, a neighbourhood
  prompt and an unrelated prompt;
- ``..._heatmap.png``: token x layer change of the residual stream;
- ``..._lens.png``: logit-lens p(old answer) and p(new answer) by layer, before and after;
- ``..._trace.png``: the MLP causal trace of the fact before (old answer) and after (new answer).

    .venv/bin/python analyses/edit_effects.py                      # ~10 min on 2 CPU cores
    .venv/bin/python analyses/edit_effects.py --second ike --no-trace
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import interp_edit as ie
from interp_edit.analysis import compare_activations, probe_prompts, trace_edit
from interp_edit.evaluation.metrics import measure
from interp_edit.evaluation.records import EditRecord
from interp_edit.plotting.edits import plot_trace_before_after

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# A landmark fact the default model knows (p(Paris) ~ 0.7), with CounterFact-style probes.
FACT = EditRecord(
    case_id="eiffel",
    prompt="{} is located in the city of",
    subject="The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    paraphrases=("The Eiffel Tower stands in the heart of the city of",),
    neighborhood=(("The Louvre is located in the city of", "Paris"),),
)
UNRELATED = "The chemical symbol for gold is"


def second_method(model) -> str:
    """MEND if a trained editor for this model is in the cache, else FT."""
    try:
        from interp_edit.editing.mend import load_editor

        load_editor(model)
        return "mend"
    except Exception:  # no trained editor (or MEND unavailable): fall back to fine-tuning
        return "ft"


def figures_for(model, method: str, out: Path, *, trace: bool, samples: int, **hparams) -> None:
    t0 = time.perf_counter()
    edit = ie.edit(model, FACT.request, method=method, **hparams)
    scores = measure(model, FACT, edit, ("efficacy", "paraphrase", "neighborhood"))
    print(f"{method}: edited in {time.perf_counter() - t0:.1f}s, layer {edit.info.get('layer', '-')}; "
          + ", ".join(f"{k} {v:+.3f}" for k, v in scores.items() if k.endswith("_gap")))
    prompts = probe_prompts(FACT.request, paraphrase=FACT.paraphrases[0],
                            neighborhood=FACT.neighborhood[0][0], unrelated=UNRELATED)
    diff = compare_activations(model, edit, prompts)
    for what in ("curves", "heatmap", "lens"):
        _save(diff.plot(what), out / f"edit_effects_{method}_{what}.png")
    if trace and not edit.context:
        before, after = trace_edit(model, edit, kind="mlp", window=5, samples=samples)
        title = f"{method.upper()} edit: MLP causal trace of the fact (window 5, {samples} noise samples)"
        _save(plot_trace_before_after(before, after, title=title), out / f"edit_effects_{method}_trace.png")
    edit.undo()
    print(f"{method}: figures in {time.perf_counter() - t0:.1f}s")


def _save(fig, path: Path) -> None:
    fig.savefig(path)
    print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ie.load_model name or path (default model)")
    ap.add_argument("--second", default=None, choices=["mend", "ft", "ft-l", "ike"],
                    help="the second editor (default: mend if trained, else ft)")
    ap.add_argument("--rome-layer", default="auto", help='"auto" or a layer index')
    ap.add_argument("--corpus", default=str(DATA / "wikitext-2" / "valid.txt"),
                    help="text for ROME's key statistics")
    ap.add_argument("--samples", type=int, default=10, help="noise samples of the causal traces")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="skip the trace figures")
    ap.add_argument("--out", type=Path, default=ROOT / "figures")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = ie.load_model(args.model)
    print(model, "|", FACT.text, model.top_k(FACT.text, 3))
    layer = args.rome_layer if args.rome_layer == "auto" else int(args.rome_layer)
    figures_for(model, "rome", args.out, trace=args.trace, samples=args.samples, layer=layer,
                corpus=args.corpus)
    figures_for(model, args.second or second_method(model), args.out, trace=args.trace,
                samples=args.samples)


if __name__ == "__main__":
    main()

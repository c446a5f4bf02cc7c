"""What an edit does inside the model: the edit-effect figures of README "What does an edit do?".

For one fact the default model knows, edit it with ROME, a second weight editor (MEND when a
trained editor exists for the model, else fine-tuning of one MLP, "ft") and IKE (in context),
save the results under ``figures/edit_effects_data/`` and draw for each:

- ``figures/edit_effects_<method>_curves.png``: per-layer change of the residual stream, MLP
  and attention outputs at the last token, for the edit prompt, a paraphrase, a neighbourhood
  prompt and an unrelated prompt;
- ``..._heatmap.png``: token x layer change of the residual stream;
- ``..._lens.png``: logit-lens p(old answer) and p(new answer) by layer, before and after;
- ``..._trace.png`` (weight editors): the MLP causal trace of the fact before (old answer)
  and after (new answer).

    .venv/bin/python analyses/edit_effects.py                # ~20 min on a busy 2-core CPU
    .venv/bin/python analyses/edit_effects.py --replot       # redraw from the saved results
    .venv/bin/python analyses/edit_effects.py --methods rome --rome-layer 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import interp_edit as ie
from interp_edit.analysis import ActivationDiff, compare_activations, probe_prompts, trace_edit
from interp_edit.evaluation.metrics import measure
from interp_edit.evaluation.records import EditRecord
from interp_edit.plotting.edits import plot_trace_before_after
from interp_edit.tracing import TraceResult

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("INTERP_EDIT_DATA", str(DATA))  # IKE's default pool
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


def compute(model, method: str, data: Path, *, trace: bool, samples: int, **hparams) -> None:
    """Edit, measure, compare activations (and trace); save the results under ``data``."""
    t0 = time.perf_counter()
    edit = ie.edit(model, FACT.request, method=method, **hparams)
    scores = measure(model, FACT, edit, ("efficacy", "paraphrase", "neighborhood"))
    print(f"{method}: edited in {time.perf_counter() - t0:.0f}s, "
          f"layer {edit.info.get('layer', '-')}; "
          + ", ".join(f"{k} {v:+.3f}" for k, v in scores.items() if k.endswith("_gap")))
    prompts = probe_prompts(FACT.request, paraphrase=FACT.paraphrases[0],
                            neighborhood=FACT.neighborhood[0][0], unrelated=UNRELATED)
    compare_activations(model, edit, prompts).save(data / f"{method}_diff.npz")
    if trace and not edit.context:
        before, after = trace_edit(model, edit, kind="mlp", window=5, samples=samples)
        before.save(data / f"{method}_trace_before.npz")
        after.save(data / f"{method}_trace_after.npz")
    edit.undo()
    print(f"{method}: done in {time.perf_counter() - t0:.0f}s")


def draw(method: str, data: Path, out: Path) -> None:
    """The figures of one method from its saved results (nothing is recomputed)."""
    diff = ActivationDiff.load(data / f"{method}_diff.npz")
    for what in ("curves", "heatmap", "lens"):
        _save(diff.plot(what), out / f"edit_effects_{method}_{what}.png")
    if (data / f"{method}_trace_before.npz").exists():
        before, after = (TraceResult.load(data / f"{method}_trace_{s}.npz")
                         for s in ("before", "after"))
        where = f" at layer {diff.edit_layers[0]}" if len(diff.edit_layers) == 1 else ""
        title = (f"{method.upper()} edit{where}: MLP causal trace of the edited fact "
                 f"(window {before.window}, {before.samples} noise samples)")
        _save(plot_trace_before_after(before, after, title=title),
              out / f"edit_effects_{method}_trace.png")


def _save(fig, path: Path) -> None:
    fig.savefig(path)
    print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ie.load_model name or path (default model)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="editors (default: rome, mend if trained else ft, ike)")
    ap.add_argument("--rome-layer", default="auto", help='"auto" or a layer index')
    ap.add_argument("--corpus", default=str(DATA / "wikitext-2" / "valid.txt"),
                    help="text for ROME's key statistics")
    ap.add_argument("--samples", type=int, default=10, help="noise samples of the causal traces")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="skip the traces")
    ap.add_argument("--replot", action="store_true", help="only redraw from the saved results")
    ap.add_argument("--out", type=Path, default=ROOT / "figures")
    args = ap.parse_args()
    data = args.out / "edit_effects_data"
    data.mkdir(parents=True, exist_ok=True)
    if args.replot:
        methods = args.methods or sorted({p.name.split("_")[0] for p in data.glob("*_diff.npz")})
    else:
        model = ie.load_model(args.model)
        print(model, "|", FACT.text, model.top_k(FACT.text, 3))
        methods = args.methods or ["rome", second_method(model), "ike"]
        for method in methods:
            hp = {}
            if method == "rome":
                layer = args.rome_layer if args.rome_layer == "auto" else int(args.rome_layer)
                hp = {"corpus": args.corpus, "layer": layer}
            compute(model, method, data, trace=args.trace, samples=args.samples, **hp)
    for method in methods:
        draw(method, data, args.out)


if __name__ == "__main__":
    main()

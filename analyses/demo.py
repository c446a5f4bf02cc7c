"""The main job of `make demo`: load the default model offline, show what it knows, find where
it stores a fact (causal tracing), rewrite the fact with ROME, and show before and after.

Figures (PNG) go to ``figures/``:

- ``demo_trace.png``: the causal traces (hidden states, MLP, attention) of the Eiffel Tower fact;
- ``demo_rome_trace.png``: its MLP trace before the edit (Paris) and after it (Rome).

ROME's key statistics come from WikiText-2 when ``../shared/data`` has it, otherwise from text
sampled from the model itself (``corpus="generated"``), so a fresh offline machine needs
nothing but the model. Both are cached after the first run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import interp_edit as ie

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "The Colosseum is located in the city of",
]
EDIT = ie.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PROBES = {  # what should move (edit, paraphrase) and what should not (neighbour, unrelated)
    "edit": EDIT.text,
    "paraphrase": "The Eiffel Tower stands in the heart of the city of",
    "neighbour": "The Louvre is located in the city of",
    "unrelated": "The capital of Japan is",
}
SAMPLES = 5  # noise samples per trace (the paper uses 10)


def show_predictions(model: ie.Model) -> None:
    for prompt in PROMPTS:
        print(f"\n{prompt!r}")
        for tok, p in model.top_k(prompt, 5):
            print(f"  {p:6.3f}  {tok!r}")


def trace_fact(model: ie.Model, out: Path) -> int:
    """Trace the fact, draw it, say where it is recalled; returns the window it used."""
    t0 = time.perf_counter()
    loc = ie.locate(model, EDIT, samples=SAMPLES)
    window = loc.settings["window"]
    traces = ie.trace_all(model, EDIT.text, EDIT.subject, window=window, samples=SAMPLES)
    _save(traces.plot(), out / "demo_trace.png")
    mlp = traces.mlp
    print(f"\ncausal trace of {EDIT.text!r} -> {mlp.target!r} ({time.perf_counter() - t0:.0f}s): "
          f"clean p={mlp.high_score:.3f}, subject corrupted p={mlp.low_score:.3f}; "
          f"located at {loc.reason}")
    return window


def table(model: ie.Model, title: str) -> dict[str, tuple[float, float]]:
    probs = {k: model.next_token_probs([p, p], [EDIT.target_true, EDIT.target_new]).tolist()
             for k, p in PROBES.items()}
    print(f"\n{title}: p(Paris)  p(Rome)  top-1")
    for kind, prompt in PROBES.items():
        top = model.top_k(prompt, 1)[0][0]
        print(f"  {kind:10} {probs[kind][0]:8.3f} {probs[kind][1]:8.3f}  {top!r}   {prompt!r}")
    return probs


def edit_fact(model: ie.Model, out: Path, window: int) -> None:
    from interp_edit.analysis import trace_edit
    from interp_edit.plotting.edits import plot_trace_before_after

    corpus = str(WIKITEXT) if WIKITEXT.exists() else "generated"
    tokens = 100_000 if WIKITEXT.exists() else 20_000
    print(f"\nROME: key statistics from {Path(corpus).name} ({tokens:,} tokens; built once, cached)")
    table(model, "before the edit")
    gen_before = model.generate(EDIT.text, 12)
    before = {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}

    t0 = time.perf_counter()
    edit = ie.edit(model, EDIT, method="rome", corpus=corpus, stats_tokens=tokens)
    seconds = time.perf_counter() - t0
    print(f"\nedited in {seconds:.0f}s at layer {edit.info['layer']}: {edit.info['why']}")
    print("  phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in edit.info["timings"].items()))
    table(model, "after the edit")
    print(f"\n  before: {EDIT.text}{gen_before!r}")
    print(f"  after:  {EDIT.text}{model.generate(EDIT.text, 12)!r}")

    t0 = time.perf_counter()
    old, new = trace_edit(model, edit, kind="mlp", window=window, samples=SAMPLES)
    title = f"ROME edit at layer {edit.info['layer']}: MLP causal trace before (Paris) and after (Rome)"
    _save(plot_trace_before_after(old, new, title=title), out / "demo_rome_trace.png")
    print(f"  traced before/after in {time.perf_counter() - t0:.0f}s")

    edit.undo()
    same = all(torch.equal(before[k], v) for k, v in model.hf_model.named_parameters())
    print(f"\nundo: weights restored bit for bit: {same}; top-1 again {model.top_k(EDIT.text, 1)[0][0]!r}")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"  wrote {path.relative_to(ROOT)}")


def main() -> None:
    t0 = time.perf_counter()
    model = ie.load_model()
    print(f"loaded {model.name} ({model.n_layers} layers, d_model {model.d_model}) "
          f"in {time.perf_counter() - t0:.1f}s")
    show_predictions(model)
    out = ROOT / "figures"
    window = trace_fact(model, out)
    edit_fact(model, out, window)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()

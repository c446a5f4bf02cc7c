"""Do ROME's default v* settings work on every family? On the trained tiny model of each family
(:func:`interp_edit.testing.fact_model`, 4 layers, d_model 64, trained to recall synthetic
``subject -> city`` facts), each of ``--facts`` facts is edited to another city with
``ie.edit(..., method="rome")`` at ``layer="auto"`` and the default v* settings, then with the
settings in ``--variants``; the table gives the mean p(new) on the edit prompt before and after,
the share of edits whose top-1 becomes the new city, the median v* steps, and the norm of the
vector the edited matrix writes at the subject (‖v0‖, which scales ROME's weight decay
‖δ‖/‖v0‖² and its clamp). docs/rome_defaults.md cites the output.

    python analyses/rome_defaults.py                       # every family, 8 facts
    python analyses/rome_defaults.py --families llama opt --variants "v_lr=0.2"
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time

import torch

import interp_edit as ie
from interp_edit import hooks
from interp_edit.arch.tiny import TINY_FAMILIES
from interp_edit.models import mlp_write_hook
from interp_edit.testing import CITIES, fact_model

VARIANTS = ("v_lr=0.2", "v_weight_decay=0.0", "v_weight_decay=0.0,kl_factor=0.0")


def _parse(variant: str) -> dict:
    """``"a=1,b=0.5"`` -> ``{"a": 1, "b": 0.5}`` (values as Python literals)."""
    pairs = [kv.split("=", 1) for kv in variant.split(",") if kv]
    return {k.strip(): ast.literal_eval(v.strip()) for k, v in pairs}


def _v0_norm(model, prompt: str, subject: str, layer: int) -> float:
    store: dict = {}
    with torch.no_grad(), hooks.hooked(model, [hooks.capture(mlp_write_hook(layer), store)]):
        model.logits(model.tokenize(prompt)[None])
    return float(store[mlp_write_hook(layer)][0][model.subject_range(prompt, subject)[1] - 1]
                 .norm())


def run(family: str, n_facts: int, settings: dict) -> dict:
    fm = fact_model(family=family)
    model = fm.model
    facts = [f for f in fm.facts if f.relation == "city"][:n_facts]
    before, after, top1, steps, norms = [], [], [], [], []
    for f in facts:
        new = next(c for c in CITIES if c != f.attribute)
        request = ie.EditRequest(f.template, f.subject, new, f.attribute)
        before.append(float(model.next_token_probs(f.prompt, new)))
        with ie.edit(model, request, method="rome", stats_tokens=2000, **settings) as edit:
            after.append(float(model.next_token_probs(f.prompt, new)))
            top1.append(model.top_k(f.prompt, k=1)[0][0].strip() == new)
            steps.append(edit.info["edits"][0]["v"]["steps"])
            layer = edit.info["layer"]
        norms.append(_v0_norm(model, f.prompt, f.subject, layer))
    return {"before": statistics.mean(before), "after": statistics.mean(after),
            "top1": sum(top1) / len(top1), "steps": statistics.median(steps),
            "v0": statistics.mean(norms), "layer": layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=list(TINY_FAMILIES))
    ap.add_argument("--facts", type=int, default=8, help="city facts edited per family")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS),
                    help='settings besides the defaults, e.g. "v_lr=0.2"')
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = [("defaults", {})] + [(v, _parse(v)) for v in args.variants]
    head = " | ".join(f"{name}: p(new) / top-1" for name, _ in runs)
    print(f"| family | ‖v0‖ | p(new) before | {head} | v* steps (defaults) |")
    print("|---|---:|---:|" + "---:|" * len(runs) + "---:|")
    for family in args.families:
        rows = [run(family, args.facts, s) for _, s in runs]
        cells = " | ".join(f"{r['after']:.3f} / {r['top1']:.2f}" for r in rows)
        print(f"| {family} | {rows[0]['v0']:.2f} | {rows[0]['before']:.3f} | {cells} | "
              f"{rows[0]['steps']:.0f} |", flush=True)
    print(f"\n{args.facts} facts per family; {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()

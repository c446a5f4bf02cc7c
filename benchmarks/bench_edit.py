"""ROME benchmark on the default model: key statistics build time, and time per edit by phase.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_edit.py [--tokens 500000] [--edits 5]

1. Key statistics: C = E[k kᵀ] at the edit layer from ``--tokens`` tokens of WikiText-2
   (valid + test from ../shared/data, written once to a temporary file), rebuilt from scratch
   (``refresh=True``) in bf16 autocast (the default) and, with ``--fp32``, in float32:
   wall seconds, CPU seconds, tokens per second.
2. Edits with the statistics cached: ``--edits`` facts the model knows (the Eiffel Tower and
   CounterFact-val records it predicts), with the default hparams (fixed layer) and with
   ``layer="auto"``: median wall seconds per edit and per phase (locate, stats, k*, v*,
   update), median CPU seconds per edit, v* steps.
Wall times on a shared machine vary with its load; CPU seconds (this process) vary less.
Prints markdown tables (pasted into README.md, "Editing with ROME").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import interp_edit as ie
from interp_edit.editing.rome import ROMEHparams
from interp_edit.editing.stats import second_moment, stats_info

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EIFFEL = ie.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def wikitext_file(tmp: Path) -> Path:
    """valid + test of WikiText-2 in one file (about 570k tokens of the default tokenizer)."""
    path = tmp / "wikitext-2-valid-test.txt"
    path.write_text("".join((DATA / "wikitext-2" / f).read_text() for f in ("valid.txt", "test.txt")))
    return path


def bench_stats(model, corpus: Path, layer: int, tokens: int, precision: str) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    second_moment(model, layer, corpus, tokens, precision=precision, refresh=True, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = stats_info(model, layer, corpus, tokens, precision=precision)["n_tokens"]
    return {"precision": precision, "tokens": n, "wall": wall, "cpu": cpu, "tok/s": n / wall}


def known_requests(model, n: int) -> list[ie.EditRequest]:
    reqs = [EIFFEL]
    for r in json.loads((DATA / "counterfact-val.json").read_text()):
        if len(reqs) >= n:
            break
        req = ie.EditRequest(r["prompt"], r["subject"], r["target_new"], r["ground_truth"])
        if model.top_k(req.text, 1)[0][0].strip() == req.target_true.split()[0]:
            reqs.append(req)
    return reqs


def bench_edits(model, reqs, **hparams) -> dict:
    walls, cpus, phases, steps, flipped = [], [], [], [], 0
    for req in reqs:
        t0, c0 = time.perf_counter(), time.process_time()
        edit = ie.edit(model, req, method="rome", **hparams)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        phases.append(edit.info["timings"])
        steps.append(edit.info["edits"][0]["v"]["steps"])
        p = model.next_token_probs([req.text] * 2, [req.target_true, req.target_new])
        flipped += int(p[1] > p[0])
        edit.undo()
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return {"edit": statistics.median(walls), "edit CPU": statistics.median(cpus), **med,
            "steps": statistics.median(steps),
            "flipped": f"{flipped}/{len(reqs)}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=500_000, help="tokens for the statistics")
    ap.add_argument("--edits", type=int, default=5, help="facts to edit")
    ap.add_argument("--fp32", action="store_true", help="also time the float32 statistics pass")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help='skip layer="auto"')
    ap.add_argument("--no-stats", dest="stats", action="store_false",
                    help="skip timing the statistics rebuild (they are built once if not cached)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ie.load_model()
    hp = ROMEHparams()
    layer = hp.layer if isinstance(hp.layer, int) else 4
    print(f"{model.name}, {torch.get_num_threads()} threads; ROME layer {layer}\n")

    with tempfile.TemporaryDirectory() as tmp:
        corpus = wikitext_file(Path(tmp))
        if args.stats:
            rows = [bench_stats(model, corpus, layer, args.tokens, "bf16")]
            if args.fp32:
                rows.append(bench_stats(model, corpus, layer, args.tokens, "fp32"))
            print("| key statistics (layer %d) | tokens | wall s | CPU s | tokens/s |" % layer)
            print("|---|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['precision']} forward | {r['tokens']:,} | {r['wall']:.1f} "
                      f"| {r['cpu']:.1f} | {r['tok/s']:,.0f} |")

        reqs = known_requests(model, args.edits)
        common = dict(corpus=str(corpus), stats_tokens=args.tokens)
        ie.edit(model, reqs[0], method="rome", layer=layer, **common).undo()  # warm caches
        results = {f"layer={layer}": bench_edits(model, reqs, layer=layer, **common)}
        if args.auto:
            results['layer="auto"'] = bench_edits(model, reqs, layer="auto", **common)
    keys = ["edit", "edit CPU", "locate", "stats", "k", "v", "update"]
    print(f"\n| {len(reqs)} edits, median s | " + " | ".join(keys) + " | v* steps | flipped |")
    print("|---|" + "---:|" * (len(keys) + 2))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + f" | {r['steps']:.0f} | {r['flipped']} |")


if __name__ == "__main__":
    main()

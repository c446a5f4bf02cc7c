"""Sequential ROME: apply many edits one after another and watch the model for collapse.

For the first ``--n`` CounterFact-val records the default model knows (it prefers the true
target on the edit prompt), apply ROME edits one at a time, each on top of all earlier ones.
After every ``--every`` edits, measure:

- locality: the fraction of ``--unrelated`` held-out CounterFact prompts (other subjects) whose
  top-1 token is unchanged from the unedited model;
- retention: the fraction of edits so far whose new target still beats the true one;
- perplexity of the model on a WikiText-2 passage (a collapsing model's perplexity explodes).

Finally every edit is undone, newest first, and the weights are checked bit for bit.
Writes ``results/sequential_rome.json`` and ``figures/sequential_rome.png``.

    .venv/bin/python analyses/sequential_rome.py [--n 100] [--every 10] [--layer 2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import interp_edit as ie
from interp_edit.cli import enable_ctrl_c
from interp_edit.evaluation.metrics import top1

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def known_records(model, records, n: int):
    """The first ``n`` records whose true target the model prefers (by first-token prob)."""
    out, subjects = [], set()
    for r in records:
        if len(out) >= n:
            break
        if r.subject in subjects or r.target_new.strip() == r.target_true.strip():
            continue
        p = model.next_token_probs([r.text, r.text], [r.target_true, r.target_new])
        if p[0] > p[1]:
            out.append(r)
            subjects.add(r.subject)
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    logp = model.logits(ids[None]).log_softmax(-1)[0, :-1]
    return math.exp(-float(logp.gather(-1, ids[1:, None]).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="edits to apply")
    ap.add_argument("--every", type=int, default=10, help="measure after this many edits")
    ap.add_argument("--unrelated", type=int, default=100, help="held-out prompts for locality")
    ap.add_argument("--layer", default="2", help='edit layer, or "auto"')
    ap.add_argument("--corpus", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sequential_rome.json")
    ap.add_argument("--replot", action="store_true", help="only redraw from --out")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(args.out.read_text())
        plot(saved["rows"], ROOT / "figures" / "sequential_rome.png", saved["hparams"])
        return
    layer = args.layer if args.layer == "auto" else int(args.layer)
    hparams = dict(layer=layer, corpus=args.corpus)

    model = ie.load_model()
    records = ie.load_counterfact(DATA / "counterfact-val.json")
    edits_recs = known_records(model, records, args.n)
    edited = {r.subject for r in edits_recs}
    pool = [r for r in records if r.subject not in edited]
    held = random.Random(0).sample(pool, args.unrelated)
    prompts = [r.text for r in held]
    base_top1 = top1(model, prompts)
    text_ids = model.tokenize((DATA / "wikitext-2" / "test.txt").read_text()[:4000])[:256]
    before = {k: v.detach().clone() for k, v in model.hf_model.named_parameters()}

    def measure(k: int, seconds: float) -> dict:
        now = top1(model, prompts)
        kept = sum(a == b for a, b in zip(now, base_top1)) / len(prompts)
        done = edits_recs[:k]
        wins = [float(p[1] > p[0]) for p in (model.next_token_probs([r.text] * 2, [r.target_true, r.target_new])
                                             for r in done)]
        row = {"edits": k, "locality": kept, "retention": sum(wins) / len(wins) if wins else None,
               "perplexity": perplexity(model, text_ids), "seconds": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        return row

    rows, applied, t0 = [measure(0, 0.0)], [], time.perf_counter()
    enable_ctrl_c()  # Ctrl-C keeps the rows measured so far
    try:
        for i, rec in enumerate(edits_recs, 1):
            applied.append(ie.edit(model, rec.request, method="rome", **hparams))
            if i % args.every == 0 or i == len(edits_recs):
                rows.append(measure(i, time.perf_counter() - t0))
    except KeyboardInterrupt:  # keep the rows measured so far; undo and write them below
        print(f"interrupted after {len(applied)} edits", flush=True)
    for e in reversed(applied):
        e.undo()
    exact = all(torch.equal(before[k], v) for k, v in model.hf_model.named_parameters())
    print(f"undo of {len(applied)} edits restores the weights bit for bit: {exact}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    layers = [e.info["layer"] for e in applied]
    args.out.write_text(json.dumps({"model": model.name, "hparams": hparams, "rows": rows,
                                    "layers": layers, "undo_exact": exact,
                                    "n_unrelated": len(prompts)}, indent=1))
    plot(rows, ROOT / "figures" / "sequential_rome.png", hparams)
    print(f"wrote {args.out.relative_to(ROOT)} and figures/sequential_rome.png")


def plot(rows: list[dict], path: Path, hparams: dict) -> None:
    from interp_edit.plotting import style as st

    with st.style():
        fig = st.new_figure(st.TEXT_WIDTH, 2.4)
        ax1, ax2 = fig.subplots(1, 2)
        x = [r["edits"] for r in rows]
        ax1.plot(x, [r["locality"] for r in rows], marker="o", label="unchanged top-1 (unrelated)")
        ax1.plot(x[1:], [r["retention"] for r in rows[1:]], marker="s", label="edits still applied")
        ax1.axhline(0.6, color="#999999", linestyle=":", linewidth=1)
        ax1.set_ylim(0, 1.05)
        ax1.set_xlabel("sequential ROME edits")
        ax1.legend(loc="lower left", fontsize="small")
        ax2.plot(x, [r["perplexity"] for r in rows], marker="o", color="#D55E00")
        ax2.set_xlabel("sequential ROME edits")
        ax2.set_ylabel("WikiText-2 perplexity")
        fig.suptitle(f"Sequential ROME (layer {hparams['layer']}, consistent keys)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()

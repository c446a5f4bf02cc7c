"""MEMIT and AlphaEdit on a built-in model: one batch, and a sequential stream of batches.

From the edit stream ``counterfact-edit.json`` (the first records the model knows), through
``ie.evaluate``:

- **batch**: ``--n`` facts in one edit per method (``batch_size=n``), metrics on the edited
  records themselves, the time of the edit (key statistics cached beforehand);
- **sequential**: ``--batches`` batches of ``--batch`` facts, applied one after another without
  undo (``sequential=True``), with after every batch the efficacy, paraphrase and neighbourhood
  of every fact edited so far, WikiText-2 perplexity and (``--fluency``) n-gram entropy; then
  the whole stream is undone and the weights are checked bit for bit.

v* depends only on the facts, the v* settings and the weights: the runs share each fact's δ
through a cache on disk keyed by all three (:func:`share_vstar`; the batched optimisation
gives every fact its one-at-a-time δ, see ``tests/unit/test_vstar.py``), so the batch runs of
both methods and the first batch of each stream optimise it once, and a large batch can have
its δ optimised beforehand by ``--vstar-shard I/K`` processes side by side. Each run's report is written as soon as it ends
(``results/studies/mass_editing/<model>/<run>.json``, committed; ``--model`` picks a
built-in model other than the default) and a finished run is not
redone; a sequential run stopped with Ctrl-C resumes from its saved batch edits (beside the
report, not committed). Prints one markdown table; ``--plot`` draws the sequential curves;
``--collect`` computes nothing and shows the reports on disk, a stopped stream by its curve.

    python analyses/mass_editing.py --n 100 --batch 20 --batches 5
    python analyses/mass_editing.py --model gemma-3-270m --n 100 --batches 0
    python analyses/mass_editing.py --n 1000 --vstar-shard 0/2 &    # δ of half the facts ...
    python analyses/mass_editing.py --n 1000 --vstar-shard 1/2      # ... and of the other half
    python analyses/mass_editing.py --n 1000 --batches 0            # then the batch itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import interp_edit as ie
from interp_edit._files import write_json
from interp_edit.cli import enable_ctrl_c
from interp_edit.evaluation import EvalReport

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CURVE = ("efficacy", "paraphrase", "neighborhood", "perplexity", "fluency")


def share_vstar(model) -> None:
    """Memoise each fact's δ on disk, per weights, layer, contexts and v* settings.

    An entry is one safetensors file under the user cache dir
    (``vstar/<model fingerprint>/<key>.safetensors``, the loss curve in its header), keyed by
    :attr:`~interp_edit.models.Model.weights_key` (so a δ computed while edits are applied is
    only served to the same edited weights), the layer, the fact, the context prefixes and the
    :class:`~interp_edit.editing.vstar.VOptions`; checked when read, a damaged entry is
    recomputed. So the runs of one invocation share δ, a stopped run resumes without
    optimising again, and ``--vstar-shard`` processes can fill the cache side by side before
    a large batch."""
    from dataclasses import asdict

    from interp_edit._cache import cache_dir, stable_hash
    from interp_edit._files import load_cached, read_safetensors, save_safetensors
    from interp_edit.editing import memit

    real = memit.optimise_in_groups
    root = cache_dir("vstar", model.fingerprint)

    def load(path: Path):
        tensors, meta = read_safetensors(path)
        info = json.loads(meta["info"])
        if meta.get("key") != path.stem or tensors["delta"].shape != (model.d_model,):
            raise ValueError("not this entry's key or shape")
        return tensors["delta"], info

    def shared(m, layer, facts, v0, contexts, opts, group):
        keys = [stable_hash([m.weights_key, layer, list(f), list(contexts), asdict(opts)])
                for f in facts]
        found = [load_cached(root / f"{k}.safetensors", load) for k in keys]
        todo = [i for i, x in enumerate(found) if x is None]
        if todo:
            d, info = real(m, layer, [facts[i] for i in todo], v0[todo], contexts, opts, group)
            for j, i in enumerate(todo):
                found[i] = (d[j], info[j])
                save_safetensors({"delta": d[j].float()}, root / f"{keys[i]}.safetensors",
                                 metadata={"key": keys[i], "info": json.dumps(info[j])})
        dev = v0.device
        return (torch.stack([x[0].to(dev, v0.dtype) for x in found]), [x[1] for x in found])

    memit.optimise_in_groups = shared


def vstar_shard(model, records, n: int, shard: str, hp: dict) -> None:
    """Fill the δ cache for shard ``i/k`` of the ``n`` facts the batch runs edit (every k-th,
    from the i-th): one MEMIT edit of those facts at the top layer of the range alone (δ is
    optimised there; the keys of one layer cost little), undone at once."""
    from interp_edit.editing.base import make_hparams
    from interp_edit.evaluation import harness, streams

    i, k = (int(x) for x in shard.split("/"))
    chosen, _ = streams.select(model, records, n, harness._skip_reason)
    requests = [rec.request for rec, _ in chosen][i::k]
    top = make_hparams("memit", **hp).layers[-1]
    hp = {**hp, "layers": (top,)}
    print(f"shard {shard}: optimising δ of {len(requests)} of {len(chosen)} facts", flush=True)
    t0 = time.perf_counter()
    for lo in range(0, len(requests), 50):  # a stopped shard keeps what it finished
        ie.edit(model, requests[lo:lo + 50], method="memit", **hp).undo()
        print(f"shard {shard}: {lo + len(requests[lo:lo + 50])} done, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


def run(model, records, name: str, out: Path, method: str, collect: bool = False,
        **kw) -> EvalReport | None:
    """One evaluation, reused when its report exists (resumed when it was interrupted). With
    ``collect``, only the report as it is on disk (``None`` when there is none)."""
    path = out / f"{name}.json"
    resume = EvalReport.load(path) if path.exists() else None
    if collect:
        return resume
    if resume is not None and not resume.info.get("interrupted"):
        print(f"{name}: reusing {path}", flush=True)
        return resume
    rep = ie.evaluate(model, records, method=method, progress=False, resume=resume, **kw)
    rep.save(path)
    print(f"{name}: wrote {path} ({rep.n} facts, {rep.info['seconds_total']:.0f} s)", flush=True)
    return rep


def table(reports: dict[str, EvalReport]) -> str:
    lines = ["| run | n | efficacy | paraphrase | neighbourhood | unchanged top-1 | "
             "perplexity (start → end) | fluency (start → end) | edit s / batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        agg = rep.aggregate()

        curve = rep.info.get("curve") or []
        n = rep.n
        if curve and not rep.rows:  # a stream stopped early: its last checkpoint, no CI
            last = curve[-1]
            agg = {c: f"{last[c]:.3f}" for c in ("efficacy", "paraphrase", "neighborhood")
                   if last.get(c) is not None}
            n = last["edits"]
            name = f"{name} (stopped after {last['batches']} batches)"

        def cell(col):
            return str(agg[col]) if col in agg else ""

        ppl = (f"{curve[0]['perplexity']:.2f} → {curve[-1]['perplexity']:.2f}"
               if curve and "perplexity" in curve[0] else "")
        flu = (f"{curve[0]['fluency']:.2f} → {curve[-1]['fluency']:.2f}"
               if curve and curve[0].get("fluency") is not None else "")
        secs = ([p["batch_seconds"] for p in curve[1:]] if curve
                else sorted({r["batch_seconds"] for r in rep.rows}))
        lines.append(f"| {name} | {n} | {cell('efficacy')} | {cell('paraphrase')} | "
                     f"{cell('neighborhood')} | {cell('unchanged_top1')} | {ppl} | {flu} | "
                     f"{', '.join(f'{s:.0f}' for s in secs)} |")
    return "\n".join(lines)


def spectrum(model, corpus: str, layers, thresholds=(0.1, 0.2, 0.3, 0.5)) -> str:
    """Per layer: how many eigenvalues of C fall below each threshold × the mean (AlphaEdit's
    null space) and what share of the keys' energy they carry."""
    from interp_edit.editing.stats import second_moments

    moments = second_moments(model, list(layers), corpus)
    head = " | ".join(f"< {t} × mean: dims (energy)" for t in thresholds)
    lines = [f"| layer | min / mean eigenvalue | {head} |",
             "|---" * (2 + len(thresholds)) + "|"]
    for layer, c in moments.items():
        ev = torch.linalg.eigvalsh(c.double())
        cells = []
        for t in thresholds:
            sel = ev < t * ev.mean()
            cells.append(f"{int(sel.sum())} ({float(ev[sel].sum() / ev.sum()):.3f})")
        lines.append(f"| {layer} | {float(ev.min() / ev.mean()):.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(reports: dict[str, EvalReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = {k: r for k, r in reports.items() if r.info.get("curve")}
    cols = [c for c in CURVE if any(c in p for r in seq.values() for p in r.info["curve"])]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3))
    for ax, col in zip(axes, cols):
        for name, rep in seq.items():
            pts = [(p["edits"], p[col]) for p in rep.info["curve"] if p.get(col) is not None]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(col)
        ax.set_xlabel("facts edited")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="built-in model name (default: the default model, smollm2-135m)")
    ap.add_argument("--n", type=int, default=100, help="facts in the one-batch edit")
    ap.add_argument("--batch", type=int, default=20, help="facts per batch of the stream")
    ap.add_argument("--batches", type=int, default=5, help="batches in the stream")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--sequential-methods", default=None,
                    help="methods of the stream (default: --methods)")
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data directory")
    ap.add_argument("--corpus", default=None,
                    help="key statistics corpus (default: WikiText-2 valid from --data)")
    ap.add_argument("--fluency", action="store_true", help="n-gram entropy at checkpoints")
    ap.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                    help="editor hyperparameter for every run")
    ap.add_argument("--out", type=Path, default=None,
                    help="reports (default: results/studies/mass_editing/<model>)")
    ap.add_argument("--plot", type=Path, default=None, help="draw the stream curves here")
    ap.add_argument("--collect", action="store_true",
                    help="compute nothing: table, summary and plot of the reports on disk "
                         "(an interrupted stream shows its curve so far)")
    ap.add_argument("--vstar-shard", default=None, metavar="I/K",
                    help="only fill the δ cache for every K-th of the --n batch facts from "
                         "the I-th (run K of these side by side before a large batch)")
    ap.add_argument("--spectrum", action="store_true",
                    help="only print the key statistics' spectrum at MEMIT's default layers")
    args = ap.parse_args()
    from interp_edit.cli.evaluate import parse_hparams

    args.out = args.out or ROOT / "results" / "studies" / "mass_editing" / (
        args.model or "smollm2-135m")
    args.corpus = args.corpus or str(args.data / "wikitext-2" / "valid.txt")
    torch.set_num_threads(1)
    enable_ctrl_c()
    args.out.mkdir(parents=True, exist_ok=True)
    model = None if args.collect else ie.load_model(args.model)  # None: the default
    if model is not None:
        share_vstar(model)
    if args.spectrum:
        from interp_edit.editing.memit import MEMITHparams

        print(spectrum(model, args.corpus, MEMITHparams().layers))
        return
    records = None if args.collect else ie.load_counterfact(args.data / "counterfact-edit.json")
    hp = {"corpus": args.corpus, **parse_hparams(args.hparam)}
    if args.vstar_shard:
        vstar_shard(model, records, args.n, args.vstar_shard, hp)
        return
    reports: dict[str, EvalReport] = {}
    for method in args.methods.split(","):
        if args.n:
            reports[f"batch-{method}-n{args.n}"] = run(
                model, records, f"batch-{method}-n{args.n}", args.out, method, args.collect,
                n=args.n, batch_size=args.n, **hp)
    for method in (args.sequential_methods or args.methods).split(","):
        if not args.batches:
            continue
        name = f"sequential-{method}-{args.batches}x{args.batch}"
        reports[name] = run(
            model, records, name, args.out, method, args.collect, n=args.batch * args.batches,
            batch_size=args.batch, sequential=True, every=1, fluency=args.fluency,
            perplexity_text=str(args.data / "wikitext-2" / "test.txt"),
            edits_dir=str(args.out / f"{name}-edits"), **hp)
    reports = {k: r for k, r in reports.items() if r is not None}
    print(table(reports))
    summary = {k: {"n": r.n, "aggregate": {c: str(s) for c, s in r.aggregate().items()},
                   "curve": r.info.get("curve"), "undo_bit_exact": r.info.get("undo_bit_exact"),
                   "hparams": r.hparams} for k, r in reports.items()}
    write_json(args.out / "summary.json", summary, indent=1, default=str)
    if args.plot:
        plot(reports, args.plot)


if __name__ == "__main__":
    main()

"""``interp-edit evaluate``: edit, measure and undo each record of a dataset; write a report.

    interp-edit evaluate --method rome --path counterfact-val.json --n 200 --out results/
    interp-edit evaluate ... --out results/ --resume     # go on after Ctrl-C (same settings)
    interp-edit evaluate --method none --dataset probes --out results/      # no-edit baseline
    interp-edit evaluate --method rome --path zsre.json --dataset zsre --hparam layer=4
    interp-edit evaluate --method memit --path counterfact-edit.json --n 100 --batch-size 100
    interp-edit evaluate --method alphaedit --path counterfact-edit.json --n 100 \
        --batch-size 20 --sequential --every 1 --perplexity-text wikitext-2/test.txt --out res/
"""

from __future__ import annotations

import ast
import sys

_DATASETS = ("counterfact", "zsre", "probes")


def register(sub) -> None:
    p = sub.add_parser("evaluate",
                       help="evaluate an edit method on a dataset (edit, measure, undo)")
    p.add_argument("--method", default="rome",
                   help="editor name (rome, mend, ike, ft, ft-l, ...) or 'none' for the baseline")
    p.add_argument("--path", default=None,
                   help="dataset JSON (CounterFact official or flattened, or zsRE MEND format)")
    p.add_argument("--dataset", choices=_DATASETS, default=None,
                   help="how to read --path (default: counterfact; 'probes' without a path: the "
                        "model's reverse and portability probe set)")
    p.add_argument("--n", type=int, default=None, help="stop after this many evaluated records")
    p.add_argument("--out", default=None, help="directory (or .json path) for the report files")
    p.add_argument("--fluency", action="store_true", help="also measure generation n-gram entropy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="go on from the report in --out (a run stopped with Ctrl-C)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edit this many records per edit call (batch protocol)")
    p.add_argument("--sequential", action="store_true",
                   help="apply batch after batch without undo, measuring all edits so far")
    p.add_argument("--every", type=int, default=1,
                   help="--sequential: measure after every this many batches")
    p.add_argument("--perplexity-text", default=None,
                   help="--sequential: a text file (e.g. WikiText-2 test) for perplexity")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="editor hyperparameter, repeatable (values parsed as Python literals)")
    p.set_defaults(func=run)


def parse_hparams(pairs: list[str]) -> dict:
    """``["layer=4", "corpus=wiki.txt"]`` -> ``{"layer": 4, "corpus": "wiki.txt"}``."""
    from interp_edit.errors import InterpEditError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InterpEditError(f"--hparam {pair!r}: expected KEY=VALUE, e.g. --hparam layer=4")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value  # a bare string such as a path or "auto"
    return out


def run(args) -> int:
    from interp_edit.errors import InterpEditError
    from interp_edit.evaluation import (
        EvalReport, evaluate, load_counterfact, load_probes, load_zsre)
    from interp_edit.evaluation.report import report_path
    from interp_edit.models import load_model

    from interp_edit import _validate
    from interp_edit.cli import INTERRUPTED, writable

    _validate.optional_count("--n", args.n)
    if args.out:  # before any record is edited
        writable(report_path(args.out, args.method))
    kind = args.dataset or ("probes" if args.path is None else "counterfact")
    if kind == "probes":
        records = load_probes(args.path or args.model)
    elif args.path is None:
        raise InterpEditError(f"--dataset {kind} needs --path FILE.json")
    else:
        records = (load_zsre if kind == "zsre" else load_counterfact)(args.path)
    hparams = parse_hparams(args.hparam)
    resume = None
    if args.resume:
        if not args.out:
            raise InterpEditError("--resume needs --out (where the earlier report was written)")
        path = report_path(args.out, args.method)
        if path.exists():
            resume = EvalReport.load(path)
            print(f"resuming from {path}: {resume.n} records evaluated, "
                  f"{len(resume.skipped)} skipped")
        else:
            print(f"no report at {path} yet: starting afresh")
    model = load_model(args.model)
    protocol = {}
    if args.batch_size is not None or args.sequential:
        # a stream's batch edits are saved beside the report, so --resume can re-apply them
        edits = report_path(args.out, args.method).with_suffix("") if args.out else None
        if edits is not None:
            edits = edits.parent / (edits.name + "-edits")
            edits.mkdir(parents=True, exist_ok=True)
        protocol = dict(batch_size=args.batch_size, sequential=args.sequential,
                        every=args.every, perplexity_text=args.perplexity_text,
                        edits_dir=None if edits is None else str(edits))
    report = evaluate(model, records, method=args.method, n=args.n, fluency=args.fluency,
                      seed=args.seed, resume=resume, **protocol, **hparams)
    print(report.to_markdown())
    if args.out:
        print(f"wrote {report.save(args.out)} (+ .csv, .md)")
    if report.info.get("interrupted"):
        print(f"interrupted after {report.n} records" + (
            "; go on with the same command and --resume" if args.out else ""), file=sys.stderr)
        return INTERRUPTED
    return 0

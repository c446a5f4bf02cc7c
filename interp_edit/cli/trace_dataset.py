"""``interp-edit trace-dataset``: causal tracing over a known-facts file, averaged.

    interp-edit trace-dataset --path known_1000.json --limit 100 --kinds all --out runs/known
    interp-edit trace-dataset ... --executor ray --workers 8     # on Ray (local or --address)

Writes into ``--out``: ``average.npz`` (reload with ``ie.AverageTrace.load``), ``aie.png/.pdf``,
``severed.png/.pdf`` (with ``--sever``) and ``peaks.md``; prints the peak table.
"""

from __future__ import annotations

from pathlib import Path

from interp_edit.cli._executor import executor_arguments, executor_options
from interp_edit.cli.trace import screen_arguments


def register(sub) -> None:
    p = sub.add_parser("trace-dataset", help="trace many known facts and average the effects",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, type=Path, help="known_1000.json (ROME's known facts)")
    p.add_argument("--out", required=True, type=Path, help="directory for results and figures")
    p.add_argument("--limit", type=int, default=None, help="only the first N facts")
    p.add_argument("--kinds", default="all",
                   help="'all' or a comma-separated subset of resid,mlp,attn (default all)")
    p.add_argument("--sever", action="store_true",
                   help="also trace hidden states with the MLP / attention path severed")
    p.add_argument("--samples", type=int, default=10, help="noise samples per trace (default 10)")
    p.add_argument("--noise", default="s3", help="'sK' (K x subject embedding std) or a float")
    p.add_argument("--window", type=int, default=10, help="MLP/attention window (default 10)")
    p.add_argument("--method", default="fast",
                   choices=["fast", "reference", "attribution", "screen+exact"])
    screen_arguments(p)
    p.add_argument("--exact-sample", type=int, default=None,
                   help="with --method attribution: also trace N random facts exactly")
    p.add_argument("--cache-dir", type=Path, default=None, help="per-fact trace cache")
    executor_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import interp_edit as ie
    from interp_edit import _validate
    from interp_edit._files import write_text
    from interp_edit.cli import noise_arg, writable
    from interp_edit.plotting import style
    from interp_edit.tracing.average import peak_table

    noise = noise_arg(args.noise)
    _validate.optional_count("--limit", args.limit)  # (trace_dataset checks all again)
    writable(args.out, directory=True)
    if args.cache_dir is not None:
        writable(args.cache_dir, directory=True)
    kinds = "all" if args.kinds == "all" else tuple(k.strip() for k in args.kinds.split(","))
    model = ie.load_model(args.model)
    facts = ie.load_known_facts(args.path)
    avg = ie.trace_dataset(
        model, facts, kinds, samples=args.samples, noise=noise, window=args.window,
        method=args.method, precision=args.precision, estimate=args.estimate, top=args.confirm,
        sever=args.sever, limit=args.limit, exact_sample=args.exact_sample,
        cache_dir=args.cache_dir, **executor_options(args),
    )
    out = args.out
    avg.save(out / "average.npz")
    style.save_figure(avg.plot(), out / "aie")
    if args.sever:
        style.save_figure(avg.plot_severed(), out / "severed")
    table = peak_table(avg)
    write_text(out / "peaks.md", f"{avg!r}\n\n{table}")
    print(f"{avg!r}\n\n{table}\nwrote {out}/average.npz, aie.png/.pdf"
          + (", severed.png/.pdf" if args.sever else "") + ", peaks.md")
    return 0

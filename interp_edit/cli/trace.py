"""``interp-edit trace``: causal trace of one fact; writes the figure and the result file and
prints the cells whose restoration brings the answer back the most.

    interp-edit trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --kind all --out eiffel.pdf
"""

from __future__ import annotations

def register(sub) -> None:
    p = sub.add_parser("trace", help="causal trace of one fact (heatmap + .npz result)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--subject", required=True, help="the subject, as written in the prompt")
    p.add_argument("--target", default=None, help="answer to score (default: the model's top-1)")
    p.add_argument("--kind", default="resid", choices=["resid", "mlp", "attn", "all"])
    p.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    p.add_argument("--noise", default="s3", help="'sK' (K x subject-embedding std) or a float std")
    p.add_argument("--window", type=int, default=10, help="layers per mlp/attn window (default 10)")
    p.add_argument("--method", default="fast",
                   choices=["fast", "reference", "attribution", "screen+exact"])
    screen_arguments(p)
    p.add_argument("--sever", default=None, choices=["mlp", "attn"], help="severed paths (resid)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--top", type=int, default=5, help="how many top cells to print (default 5)")
    p.add_argument("--out", default="trace.pdf", help="figure path; the .npz result goes beside it")
    p.set_defaults(func=run)


def screen_arguments(p) -> None:
    """The options of ``--method attribution`` (this command's and ``trace-dataset``'s)."""
    p.add_argument("--precision", default="auto", choices=["model", "bfloat16", "auto"],
                   help="multiplies of --method attribution (default auto: bf16 where the "
                        "hardware has it; model: the model's dtype)")
    p.add_argument("--estimate", default="logodds",
                   help="how the screen scores cells: logodds (default: first order in the "
                        "log-odds of p), prob (first order in p), ig or ig-K (integrated "
                        "gradients, K steps), atpstar (attention reads exact, last token "
                        "exact); see interp_edit.tracing.attribution")
    p.add_argument("--confirm", type=int, default=None, metavar="N",
                   help="with --method screen+exact: cells of each kind confirmed exactly "
                        "(default 10)")


def run(args) -> int:
    from interp_edit._files import atomic_path
    from interp_edit.cli import noise_arg, writable
    from interp_edit.models import load_model
    from interp_edit.tracing import TraceSet, trace

    from interp_edit import _validate

    noise = noise_arg(args.noise)
    _validate.count("--top", args.top, 0)
    out = writable(args.out)  # before the trace runs, not after
    writable(out.with_suffix(".npz"))
    model = load_model(args.model)
    result = trace(
        model, args.prompt, args.subject, target=args.target, kind=args.kind,
        samples=args.samples, noise=noise, window=args.window, method=args.method,
        sever=args.sever, seed=args.seed, precision=args.precision,
        estimate=args.estimate, top=args.confirm, progress=True,
    )  # fmt: skip
    npz = out.with_suffix(".npz")
    result.save(npz)
    traces = list(result) if isinstance(result, TraceSet) else [result]
    first = traces[0]
    ran = ", ".join(filter(None, (first.method, first.precision, first.estimate)))
    print(f"{model.name}: {args.prompt!r} -> {first.target!r}  subject tokens "
          f"{first.subject_range}  p(clean)={first.high_score:.4f}  "
          f"p(corrupted)={first.low_score:.4f}  ({ran})")  # fmt: skip
    for r in traces:
        print(f"  top {r.kind} cells (token, layer, score):")
        for t, layer, score in r.top_cells(args.top):
            print(f"    {t:3d} {r.tokens[t]!r:>14}  layer {layer:3d}  {score:.4f}")
    print(f"result: {npz}")
    try:
        fig = result.plot()
    except ImportError as exc:  # plotting not installed/written yet: the .npz is still there
        print(f"figure not written ({exc}); plot later with TraceResult.load({str(npz)!r}).plot()")
        return 0
    with atomic_path(out, suffix=out.suffix) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    print(f"figure: {out}")
    return 0

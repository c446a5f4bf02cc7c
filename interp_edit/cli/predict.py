"""``interp-edit predict PROMPT``: the top-k next tokens with probabilities."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("predict", help="print the top-k next tokens of a prompt")
    p.add_argument("prompt")
    p.add_argument("-k", type=int, default=5, help="how many tokens (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    from interp_edit.models import load_model

    model = load_model(args.model)
    print(f"{model.name}: {args.prompt!r}")
    for tok, p in model.top_k(args.prompt, args.k):
        print(f"  {p:7.4f}  {tok!r}")
    return 0

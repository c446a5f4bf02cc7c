"""``interp-edit edit``: rewrite one fact and show the model before and after.

    interp-edit edit --method rome --prompt "{} is located in the city of" \\
        --subject "The Eiffel Tower" --target Rome [--true Paris] [--save edit.safetensors]
"""

from __future__ import annotations

def register(sub) -> None:
    p = sub.add_parser("edit", help="edit one fact (ROME, MEND, IKE, FT) and show before/after")
    p.add_argument("--method", default="rome", help="edit method (default rome)")
    p.add_argument("--prompt", required=True,
                   help="template with {} for the subject, or a prompt containing the subject")
    p.add_argument("--subject", required=True)
    p.add_argument("--target", required=True, help="the new answer")
    p.add_argument("--true", default=None,
                   help="the current answer (default: the model's own top-1 next token)")
    p.add_argument("--layer", default=None, help="edit layer: an index or 'auto'")
    p.add_argument("--hparams", default=None,
                   help='other hparams as JSON, e.g. \'{"corpus": "wiki.txt"}\'')
    p.add_argument("--tokens", type=int, default=12, help="generation length (default 12)")
    p.add_argument("--save", default=None, help="write the edit (safetensors + metadata)")
    p.set_defaults(func=run)


def run(args) -> int:
    import interp_edit as ie
    from interp_edit import _validate
    from interp_edit.cli import json_arg, writable
    from interp_edit.errors import InterpEditError

    hparams = json_arg(args.hparams, "--hparams")
    if args.layer is not None:
        try:
            hparams["layer"] = args.layer if args.layer == "auto" else int(args.layer)
        except ValueError:
            raise InterpEditError(f"--layer {args.layer!r}: give a layer index or 'auto'") from None
    _validate.count("--tokens", args.tokens)
    if args.save:
        writable(args.save)
    model = ie.load_model(args.model)
    req = ie.EditRequest(args.prompt, args.subject, args.target, args.true)
    req.validate(model)
    if req.target_true is None:
        true = model.top_k(req.text, 1)[0][0].strip()
        req = ie.EditRequest(args.prompt, args.subject, args.target, true)
    prompt = req.text
    before = _probs(model, prompt, req)
    gen_before = model.generate(prompt, args.tokens)

    edit = ie.edit(model, [req], method=args.method, **hparams)
    after = _probs(model, edit.wrap(prompt), req)
    gen_after = model.generate(edit.wrap(prompt), args.tokens)

    print(f"{model.name}, method {args.method}: {prompt!r}")
    print(f"  {'':8} p({req.target_true!r})  p({req.target_new!r})")
    for label, (pt, pn) in (("before", before), ("after", after)):
        print(f"  {label:8} {pt:9.4f}  {pn:9.4f}")
    if "layer" in edit.info:
        print(f"  layer {edit.info['layer']}: {edit.info.get('why', '')}")
    if "seconds" in edit.info:
        print(f"  edit took {edit.info['seconds']:.1f}s")
    print(f"  before: {prompt}{gen_before!r}")
    print(f"  after:  {prompt}{gen_after!r}")
    if args.save:
        print(f"  saved to {edit.save(args.save)}")
    edit.undo()  # the model object may outlive this command (tests, notebooks)
    return 0


def _probs(model, prompt: str, req) -> tuple[float, float]:
    p = model.next_token_probs([prompt, prompt], [req.target_true, req.target_new])
    return float(p[0]), float(p[1])

"""``interp-edit mend-train``: meta-train a MEND editor for a model.

    interp-edit mend-train --train ../shared/data/counterfact-train.json \\
        --val ../shared/data/counterfact-val.json --steps 2000 --out mend.safetensors
    interp-edit edit --method mend --hparams '{"editor": "mend.safetensors"}' ...
    interp-edit evaluate --method mend --hparam editor=mend.safetensors --path ... --n 200

``--config`` sets the other ``TrainConfig`` fields; the editor of README's "MEND" section is
``analyses/train_mend.py``'s ``CONFIG``: ``{"key_stats": "../shared/data/wikitext-2/valid.txt",
"contrast": true, "init_step": 0.005, "c_edit": 0.3, "c_margin": 1, "lr": 1e-3}``.

Training data: CounterFact (official or flattened) or zsRE (MEND format) files; ``--train`` may
be given more than once. Progress is checkpointed next to ``--out`` (``<out>.ckpt/``); running
the same command again resumes from the checkpoint.
"""

from __future__ import annotations

def register(sub) -> None:
    p = sub.add_parser("mend-train", help="meta-train a MEND editor (checkpointed, resumable)")
    p.add_argument("--train", action="append", required=True,
                   help="training records: CounterFact or zsRE JSON (repeatable)")
    p.add_argument("--val", required=True, help="validation records (CounterFact or zsRE JSON)")
    p.add_argument("--out", required=True, help="where to write the best editor (.safetensors)")
    p.add_argument("--steps", type=int, default=None, help="training steps (one record each)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much time")
    p.add_argument("--layers", default=None,
                   help="'last' (MEND, default), 'traced' (location-aware) or indices '27,28,29'")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default <out>.ckpt)")
    p.add_argument("--config", default=None,
                   help='other TrainConfig fields as JSON, e.g. \'{"lr": 1e-4, "c_loc": 2}\'')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from interp_edit.cli import json_arg, writable
    from interp_edit.editing.mend_train import TrainConfig, train_editor
    from interp_edit.errors import InterpEditError
    from interp_edit.models import load_model

    overrides = json_arg(args.config, "--config")
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.minutes is not None:
        overrides["max_minutes"] = args.minutes
    if args.layers is not None:
        layers = args.layers
        try:
            overrides["layers"] = layers if layers in ("last", "traced") else tuple(
                int(x) for x in layers.split(","))
        except ValueError:
            raise InterpEditError(f"--layers {layers!r}: use 'last', 'traced' or indices such "
                                  "as 27,28,29") from None
    try:
        cfg = TrainConfig(**overrides)
    except TypeError as exc:
        raise InterpEditError(f"--config: {exc}") from None
    train = [r for path in args.train for r in load_records(path)]
    val = load_records(args.val)
    writable(args.out)
    model = load_model(args.model)
    result = train_editor(model, train, val, cfg, out=args.out, checkpoint=args.checkpoint,
                          progress=not args.quiet)
    best = result.editor.info
    print(f"{result.stopped}; best editor (step {best.get('best_step')}, validation "
          f"{best.get('validation')}) written to {args.out}")
    return 0


def load_records(path: str):
    """CounterFact records, or zsRE ones when the file is in the zsRE (MEND) format."""
    from interp_edit.errors import InterpEditError
    from interp_edit.evaluation import load_counterfact, load_zsre

    try:
        return load_counterfact(path)
    except InterpEditError as exc:
        if "zsRE" not in str(exc):
            raise
        return load_zsre(path)

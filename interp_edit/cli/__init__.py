"""The ``interp-edit`` console script. Each subcommand lives in its own module here with a
``register(subparsers)`` function that adds its parser and sets ``func``."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# one line per subcommand module
_COMMANDS = ["predict", "evaluate", "trace", "trace_dataset", "mend_train", "edit"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interp-edit",
        description="Locate facts in language models (causal tracing), edit them, measure edits.",
    )
    parser.add_argument("--model", default=None,
                        help="model name, local HF dir or .gguf path "
                             "(default: SmolLM2-135M-Instruct)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"interp_edit.cli.{name}").register(sub)
    return parser


def enable_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt, which long runs (evaluate, trace-dataset, the
    analyses) catch to keep what they measured; also when started in the background, where a
    shell hands SIGINT over ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from interp_edit.errors import InterpEditError

    enable_ctrl_c()
    try:
        return int(args.func(args) or 0)
    except InterpEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

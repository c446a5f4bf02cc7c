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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


INTERRUPTED = 130  # the shell's exit status for a command stopped by SIGINT


def noise_arg(text: str) -> str | float:
    """``--noise``: ``"sK"`` stays a spec, anything else must be a float std."""
    from interp_edit.errors import InterpEditError

    if text.strip().startswith("s"):
        return text.strip()
    try:
        return float(text)
    except ValueError:
        raise InterpEditError(f"--noise {text!r}: use 'sK' (K x the subject-embedding std, "
                              "e.g. s3) or a float std, e.g. 0.1") from None


def json_arg(text: str | None, option: str) -> dict:
    """A JSON object given on the command line (``--hparams``, ``--config``); {} if None."""
    import json

    from interp_edit.errors import InterpEditError

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise InterpEditError(f"{option} is not valid JSON ({exc}): give an object such as "
                              "'{\"layer\": 4}'") from None
    if not isinstance(value, dict):
        raise InterpEditError(f"{option} must be a JSON object, not {type(value).__name__}")
    return value


def writable(path: str | os.PathLike, *, directory: bool = False):
    """Check, before any work, that an output can be written: ``path`` (a file, or with
    ``directory`` a folder) is created with its parents, or its folder takes a new file.
    Returns it as a Path."""
    import tempfile
    from pathlib import Path

    from interp_edit.errors import InterpEditError

    path = Path(path)
    folder = path if directory else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not directory and path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InterpEditError(f"cannot write {path} ({exc.strerror or exc}): choose another "
                              "output path") from None
    return path


if __name__ == "__main__":
    sys.exit(main())

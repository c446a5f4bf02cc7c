"""The command line every model benchmark shares: ``--threads``, ``--data``, ``--model``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import interp_edit as ie

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the shared options; the benchmark adds its own before parsing."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data directory")
    ap.add_argument("--model", default=None, help="ie.load_model name (default model)")
    return ap


def load(args: argparse.Namespace) -> ie.Model:
    """The model ``--model`` names, after setting torch's threads to ``--threads``."""
    torch.set_num_threads(args.threads)
    return ie.load_model(args.model)

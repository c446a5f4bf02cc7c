"""The executor options shared by the dataset commands (``trace-dataset``, ``evaluate``);
see :mod:`interp_edit.jobs.executors`."""

from __future__ import annotations

from interp_edit.jobs.executors import EXECUTORS


def executor_arguments(p) -> None:
    g = p.add_argument_group("executor (where the units of work run)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="'local': in this process (default); 'ray': on Ray workers, each "
                        "loading the model once")
    g.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per CPU, or per GPU on a GPU cluster)")
    g.add_argument("--address", default=None,
                   help="join this Ray cluster (ray://host:10001 or host:6379; default: "
                        "$RAY_ADDRESS, else start a local one)")


def executor_options(args) -> dict:
    """The keyword arguments for trace_dataset / evaluate."""
    return dict(executor=args.executor, workers=args.workers, address=args.address)

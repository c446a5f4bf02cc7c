"""What this CPU does at best, for the benchmarks' context lines: the speed of one matrix
multiply of a given size and the time to read every weight once. Both benchmarks print them
next to their own timings, so a ratio can be read against what the hardware allows."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def up_proj(model) -> torch.Tensor:
    """Layer 0's MLP up-projection weight: the MLP's matrix shape."""
    return model.hf_model.get_submodule("model.layers.0.mlp.up_proj").weight


@torch.no_grad()
def matmul_rate(weight: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> float:
    """GMAC/s of ``rows`` random rows times ``weight`` (cast to ``dtype``), current threads."""
    w = weight.to(dtype)
    x = torch.randn(rows, w.shape[1], dtype=dtype, device=w.device)
    return rows * w.numel() / median_seconds(lambda: torch.nn.functional.linear(x, w), 20) / 1e9


@torch.no_grad()
def weight_stream(model) -> tuple[float, float]:
    """Milliseconds to multiply one vector by every 2-D weight of the model (blocks and the
    unembedding; a tied embedding once), and the megabytes read: no pass of the model can
    take less on a CPU that must read its weights from memory."""
    mats = list({p.data_ptr(): p for p in model.hf_model.parameters() if p.ndim == 2}.values())
    vecs = {w.shape[1]: w.new_ones(1, w.shape[1]) for w in mats}

    def read_all() -> None:
        for w in mats:
            torch.nn.functional.linear(vecs[w.shape[1]], w)

    mb = sum(w.numel() * w.element_size() for w in mats) / 1e6
    return 1000 * median_seconds(read_all, 5), mb

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
    """A ``[d_mlp, d_model]`` weight: the shape of the MLP's input projections (layer 0's
    output matrix transposed, :meth:`interp_edit.arch.Adapter.mlp_out_matrix`)."""
    from interp_edit.arch import adapter

    return adapter(model).mlp_out_matrix(0).t().contiguous()


@torch.no_grad()
def matmul_rate(weight: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> float:
    """GMAC/s of ``rows`` random rows times ``weight`` (cast to ``dtype``), current threads."""
    w = weight.to(dtype)
    x = torch.randn(rows, w.shape[1], dtype=dtype, device=w.device)
    return rows * w.numel() / median_seconds(lambda: torch.nn.functional.linear(x, w), 20) / 1e9


@torch.no_grad()
def int8_rate(weight: torch.Tensor, rows: int) -> float | None:
    """GMAC/s of an int8 x int8 -> int32 multiply of ``weight``'s shape (``torch._int_mm``),
    current threads; None where this build has none."""
    n, k = weight.shape
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, device=weight.device)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=weight.device)
    try:
        return rows * n * k / median_seconds(lambda: torch._int_mm(x, w), 20) / 1e9
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def dtype_line(weight: torch.Tensor, rows: int) -> str:
    """The multiply's rate in each dtype at one shape, with the dtype of its output: what a
    lower-precision exact engine could hope for (an output rounded to 16 bits cannot give
    fp32 results, and an int8 emulation of fp32 needs about ten slice products)."""
    rates = [f"fp32 {matmul_rate(weight, rows):.0f} (fp32 out)"]
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        out = torch.nn.functional.linear(torch.ones(1, weight.shape[1], dtype=dtype),
                                         weight[:1].to(dtype)).dtype
        rates.append(f"{name} {matmul_rate(weight, rows, dtype):.0f} "
                     f"({str(out).removeprefix('torch.')} out)")
    i8 = int8_rate(weight, rows)
    rates.append("int8: none" if i8 is None else f"int8 {i8:.0f} (int32 out)")
    return f"One multiply of the MLP's shape at {rows} rows, GMAC/s: " + ", ".join(rates) + "."


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

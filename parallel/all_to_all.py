"""Posted all-to-alls (post now, wait later) with their trace, the autograd all-to-all, and the FP8 form of the
dispatch rows (E4M3 values + one scale per 1 x 128 tile, DeepSeek-V3 section 3.3)."""


from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.fp8.numerics import Quantized, quantize
from parallel.network_model import timeline_now

DISPATCH_TILE = 128  # activations sent through the EP dispatch: 1 x 128 tiles, as the blockwise recipe's


# ---- expert-parallel dispatch in FP8 -----------------------------------------------------------------
def quantize_dispatch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations to send through the EP dispatch: (E4M3 values [T, H], fp32 scales [T, ceil(H/128)]),
    1 x 128 tiles as the blockwise recipe's activations. Half the bytes of BF16 plus 4 per 128 values.
    Rows stay rows, so both tensors go through the same all-to-all splits as x would; send the values as
    `values.view(torch.uint8)` (collectives do not all take float8 dtypes) and view them back on arrival."""
    q = quantize(x.reshape(-1, x.shape[-1]), (1, DISPATCH_TILE))
    return q.values, q.scale


def dequantize_dispatch(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The receiving side of `quantize_dispatch`: [T, H] in `dtype`."""
    return Quantized(values, scales, (1, DISPATCH_TILE)).dequantize().to(dtype)


# ---- posted all-to-alls and their trace ------------------------------------------------------------------
@dataclass
class CommInterval:
    """One all-to-all as this rank saw it: posted at `posted`, its wait began at `wait_start` and returned at
    `wait_end` (perf_counter seconds). `wait_end - wait_start` is the exposed part; a synchronous call is all
    exposed. Host clock: exact for gloo (CPU), where the wait returns when the data is there; with NCCL the wait
    only orders the compute stream, so on GPUs these intervals understate the exposure (use a CUDA profiler)."""

    label: str
    posted: float
    wait_start: float
    wait_end: float


class PostedAllToAll:
    """An `all_to_all_single` in flight (no autograd). `wait()` returns the received rows once."""

    def __init__(self, out: torch.Tensor, send: torch.Tensor, work: Any, label: str, trace: list | None) -> None:
        self.out, self._send, self._work, self.label, self._trace = out, send, work, label, trace
        self._posted = timeline_now()

    def wait(self) -> torch.Tensor:
        if self._work is None:
            raise RuntimeError(f"wait() called twice on the posted all-to-all {self.label}")
        start = timeline_now()
        self._work.wait()
        self._work = self._send = None  # the send buffer had to outlive the collective
        if self._trace is not None:
            self._trace.append(CommInterval(self.label, self._posted, start, timeline_now()))
        return self.out


def post_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, label: str = "a2a",
                    trace: list | None = None, fp8: bool = False) -> PostedAllToAll:
    """Post rows of `x` (`in_splits[d]` rows to rank d) and receive `out_splits[s]` rows from rank s. `fp8`: the
    rows travel as E4M3 values with a scale per 1 x 128 tile (DeepSeek-V3's FP8 dispatch) and arrive
    dequantized to x's dtype."""
    if fp8:
        return PostedFP8AllToAll(x, out_splits, in_splits, group, label, trace)
    send = x.contiguous()
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    work = dist.all_to_all_single(out, send, out_splits, in_splits, group=group, async_op=True)
    return PostedAllToAll(out, send, work, label, trace)


class PostedFP8AllToAll:
    """Two posted all-to-alls with the same splits, the E4M3 values (as bytes: collectives do not all take
    float8) and their fp32 tile scales; `wait()` dequantizes into `out` (allocated at post time, so autograd
    can hand it out before the data arrives)."""

    def __init__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, label: str,
                 trace: list | None) -> None:
        from parallel.all_to_all import quantize_dispatch

        with torch.no_grad():
            values, scales = quantize_dispatch(x.detach())
        self.out = x.new_empty(sum(out_splits), *x.shape[1:])
        self._dtype, self._fp8 = x.dtype, values.dtype
        self._values = post_all_to_all(values.view(torch.uint8), out_splits, in_splits, group, label + " fp8", trace)
        self._scales = post_all_to_all(scales, out_splits, in_splits, group, label + " scales", trace)
        self.label = label

    def wait(self) -> torch.Tensor:
        from parallel.all_to_all import dequantize_dispatch

        values, scales = self._values.wait(), self._scales.wait()
        with torch.no_grad():
            self.out.copy_(dequantize_dispatch(values.view(self._fp8), scales, self._dtype).view_as(self.out))
        return self.out


# ---- autograd pieces -------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows out of an all_to_all_single with uneven splits; backward is the transposed all-to-all (splits
    swapped). The forward only posts the collective: the returned buffer is filled once the handle it appends
    to `pending` is waited on. Backward is synchronous (the overlapped pipeline path in
    parallel/ep_overlap.py posts its backward all-to-alls itself)."""

    @staticmethod
    def forward(ctx, x, recv_splits: list[int], send_splits: list[int], group, pending: list, label: str,
                trace: list | None, fp8: bool = False):
        ctx.recv_splits, ctx.send_splits, ctx.group, ctx.label, ctx.trace = (
            recv_splits, send_splits, group, label, trace)
        posted = post_all_to_all(x, recv_splits, send_splits, group, label, trace, fp8=fp8)
        pending.append(posted)
        return posted.out

    @staticmethod
    def backward(ctx, grad):
        back = post_all_to_all(grad, ctx.send_splits, ctx.recv_splits, ctx.group, ctx.label + " grad", ctx.trace)
        return back.wait(), None, None, None, None, None, None, None  # gradients travel in full precision

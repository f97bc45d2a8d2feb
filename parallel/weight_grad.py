"""Zero-bubble backward split: input-gradients now (B), weight-gradients later (W).

`DeferredWeightGradBackend` is a `GemmBackend` (model/gemm.py) whose linear and grouped-expert GEMMs compute
the input-gradient in backward and hand the weight-gradient GEMM to a `WeightGradStore` when one is capturing.
Everything else (norm weights, router, embedding) keeps ordinary autograd: those gradients are cheap and
computed in B. A W instruction pops the oldest captured group and runs it, accumulating into `param.grad`.

With activation checkpointing the block is recomputed inside B; the closures keep the recomputed inputs alive
until W runs, which is the memory a zero-bubble schedule trades for its smaller bubble.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from model.gemm import GemmBackend, grouped_mm, grouped_weight_grad


class WeightGradStore:
    """FIFO of deferred weight-gradient groups; one group per deferred backward call."""

    def __init__(self) -> None:
        self.capturing = False
        self._pending: list[Callable[[], None]] = []
        self._queue: deque[tuple[object, list[Callable[[], None]]]] = deque()

    @contextmanager
    def capture(self, key: object):
        """Inside: weight-gradient work is queued instead of run; it becomes one group named `key`."""
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False
            self._queue.append((key, self._pending))
            self._pending = []

    def defer_or_run(self, fn: Callable[[], None]) -> None:
        if self.capturing:
            self._pending.append(fn)
        else:
            fn()

    def pop(self) -> object:
        """Run the oldest group; returns its key (the schedule checks it is the one it expected)."""
        key, fns = self._queue.popleft()
        for fn in fns:
            fn()
        return key

    def __len__(self) -> int:
        return len(self._queue)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _DeferredLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, store: WeightGradStore) -> torch.Tensor:
        # the weight is kept by reference, not saved: under activation checkpointing a saved tensor comes
        # back as a new alias, and the deferred gradient must land on the parameter itself
        ctx.save_for_backward(x)
        ctx.weight, ctx.store = weight, store
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:

            def weight_grad(g=grad_out, x=x, w=weight) -> None:
                accumulate_grad(w, g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))

            ctx.store.defer_or_run(weight_grad)
        return grad_x, None, None


class _DeferredGroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, store: WeightGradStore):
        ctx.save_for_backward(x, offsets)
        ctx.weight, ctx.store = weight, store
        return grouped_mm(x, weight.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, offsets = ctx.saved_tensors
        weight = ctx.weight
        grad_out = grad_out.contiguous()
        grad_x = grouped_mm(grad_out, weight, offsets) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:

            def weight_grad(g=grad_out, x=x, w=weight, offs=offsets) -> None:
                accumulate_grad(w, grouped_weight_grad(g, x, offs, w.shape[0]))

            ctx.store.defer_or_run(weight_grad)
        return grad_x, None, None, None


class DeferredWeightGradBackend(GemmBackend):
    """Plain GEMMs whose weight-gradients go through `store` (run at once when it is not capturing)."""

    name = "zero-bubble"

    def __init__(self, store: WeightGradStore) -> None:
        self.store = store

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _DeferredLinearFn.apply(x, weight, self.store)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return _DeferredGroupedFn.apply(x, weight, offsets, self.store)

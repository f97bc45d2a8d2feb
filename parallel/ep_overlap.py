"""An expert-parallel MoE block as sub-steps with posted all-to-alls, forward and backward.

A pipeline stage runs a block of an EP model (its MoE dispatcher an `AllToAllDispatcher`) through
`block_substeps`, a generator that yields right after posting each all-to-all and waits for it when resumed.
In DualPipe's overlapped F&B pair the runtime alternates the backward generator of one microbatch with the
forward generator of another, backward first, so each all-to-all travels while the other microbatch runs a
heavy sub-step:

    step  microbatch b (backward, layer j)            microbatch f (forward, layer i)
     1    B3  combine backward; post COMBINE-GRAD(b)
     2                                                F1  attention, norm, route, sort; count exchange;
                                                          post DISPATCH(f)
     3    B2  wait COMBINE-GRAD(b); experts + shared
              backward; post DISPATCH-GRAD(b)
     4                                                F2  shared experts; wait DISPATCH(f); experts;
                                                          post COMBINE(f)
     5    B1  wait DISPATCH-GRAD(b); sort, router,
              attention backward
     6                                                F3  wait COMBINE(f); gate-weighted sum + residual

COMBINE-GRAD hides behind F1 (attention), DISPATCH behind B2 (expert GEMMs), DISPATCH-GRAD behind F2 (expert
GEMMs), COMBINE behind B1 (attention backward): DeepSeek-V3's arrangement. Every piece of a stage is one step
(a block three), so the phase holds across blocks; the small count exchange stays synchronous because the row
buffers' sizes depend on it.

Segments meet at detached tensors (like the pieces of a stage), so each backward segment is one
`torch.autograd.backward` over its segment's outputs with the gradients the later segments left on their
inputs, and the backward all-to-alls are posted and waited by hand instead of inside autograd. The numerics
are the sequential layer's: the same operations on the same rows (tested equal to 1e-6; only the order in
which autograd sums a tensor's gradient contributions differs).

With activation checkpointing the compute of F1 (attention, router, sort) and of F2 (shared experts, routed
experts) is checkpointed piece by piece: the recompute in backward never re-runs an all-to-all.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Generator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from model.block import BlockAux, DecoderBlock
from model.gemm import GroupedLinear, Linear
from model.moe import MoE
from model.transformer import MicroBatch
from parallel.dispatcher import AllToAllDispatcher

BackwardSteps = Generator[None, None, None]


def overlappable(block: Any) -> bool:
    """A decoder block whose FFN is an expert-parallel MoE layer."""
    return (isinstance(block, DecoderBlock) and isinstance(block.mlp, MoE)
            and isinstance(block.mlp.dispatcher, AllToAllDispatcher))


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(t.is_floating_point())


def _maybe_checkpoint(block: DecoderBlock, fn, *args):
    if block.cfg.activation_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _backward(pairs: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
    outputs, grads = [], []
    for out, grad in pairs:
        if out is not None and grad is not None and out.requires_grad:
            outputs.append(out)
            grads.append(grad)
    if outputs:
        torch.autograd.backward(outputs, grads)


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


class HeldWeightGrads:
    """Weight-gradient GEMMs of the routed experts held back during their backward and run after the next
    all-to-all is posted. A `defer_or_run` target (model/gemm.py) chained in front of the store the GEMMs already
    had: outside `holding()`, and on `release()`, work goes to that store (a zero-bubble W group when the pipeline
    defers weight-gradients) or runs at once."""

    def __init__(self) -> None:
        self._held: list = []
        self._holding = False

    @contextlib.contextmanager
    def installed(self, module: torch.nn.Module):
        """Route the weight-gradients of `module`'s GEMMs built inside this context through this object."""
        layers = [m for m in module.modules() if isinstance(m, GroupedLinear | Linear)]
        saved = [m.backend for m in layers]
        for m, backend in zip(layers, saved, strict=True):
            m.backend = backend.with_wgrad_store(_Chained(self, backend.wgrad_store))
        try:
            yield
        finally:
            for m, backend in zip(layers, saved, strict=True):
                m.backend = backend

    @contextlib.contextmanager
    def holding(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def release(self) -> None:
        held, self._held = self._held, []
        for fn, inner in held:
            _run_or_defer(fn, inner)


def _run_or_defer(fn, inner) -> None:
    if inner is None:
        fn()
    else:
        inner.defer_or_run(fn)


class _Chained:
    """The store a GEMM sees: holds while its HeldWeightGrads holds, else passes to the GEMM's own store."""

    def __init__(self, held: HeldWeightGrads, inner) -> None:
        self.held, self.inner = held, inner

    @property
    def active(self) -> bool:
        """As the GEMM's own store says (model/gemm.py GemmBackend.is_plain): the forward path stays the same."""
        return self.inner is not None and getattr(self.inner, "active", True)

    def defer_or_run(self, fn) -> None:
        if self.held._holding:
            self.held._held.append((fn, self.inner))
        else:
            _run_or_defer(fn, self.inner)


def block_substeps(block: DecoderBlock, h: torch.Tensor, mb: MicroBatch,
                   ) -> Generator[None, None, tuple[torch.Tensor, Any]]:
    """Forward of an EP MoE block on the detached, grad-requiring input `h`, yielding after each posted
    all-to-all. Returns (output, backward) where `backward(grad_out, loss_scale)` is the matching generator;
    it leaves the input gradient in `h.grad` and seeds the block's balance loss with `loss_scale`."""
    moe: MoE = block.mlp
    dispatcher: AllToAllDispatcher = moe.dispatcher
    n_experts = moe.cfg.n_routed_experts

    # F1: attention, norm, router, local sort by expert; the count exchange; post the dispatch
    def attend_and_route(h_in: torch.Tensor):
        a = block.attention(h_in, mb.documents)
        x = block.ffn_norm(a)
        routing = moe.route(x)
        local = dispatcher.sort(x.reshape(-1, x.shape[-1]), routing, n_experts)
        return a, x, routing, local

    a, x, routing, local = _maybe_checkpoint(block, attend_and_route, h)
    if block.training:
        moe.gate.step_counts += routing.counts
    mb.record(block.layer_idx, BlockAux(counts=routing.counts, balance_loss=routing.balance_loss))
    layout = dispatcher.exchange_layout(routing.counts)
    dispatch = dispatcher.post(local.x.detach(), layout.recv_splits, layout.send_splits, "dispatch")
    yield

    # F2: shared experts while the dispatch travels; then the routed experts; post the combine
    x_in = _leaf(x)
    shared = _maybe_checkpoint(block, moe.shared_experts, x_in) if moe.shared_experts is not None else None
    recv = _leaf(dispatch.wait())

    held = HeldWeightGrads()

    def experts(rows_in: torch.Tensor) -> torch.Tensor:
        with held.installed(moe.experts):  # also when a checkpoint recomputes this in backward
            y = moe.experts(rows_in.index_select(0, layout.perm), layout.rows)
        return y.index_select(0, layout.inverse)  # back to (source rank, expert) order for the return trip

    y_src = _maybe_checkpoint(block, experts, recv)
    combine = dispatcher.post(y_src.detach(), layout.send_splits, layout.recv_splits, "combine")
    yield

    # F3: the returned rows, gate-weighted, plus the residual and the shared experts
    back, a_in, gates_in, shared_in = _leaf(combine.wait()), _leaf(a), _leaf(local.gates), _leaf(shared)
    routed = dispatcher.combine_rows(back, dataclasses.replace(local, gates=gates_in)).view_as(a_in)
    out = a_in + (routed + shared_in if shared_in is not None else routed)

    def backward(grad_out: torch.Tensor, loss_scale: float) -> BackwardSteps:
        # B3: through the gate-weighted sum; post the combine's transpose
        _backward([(out, grad_out)])
        combine_grad = dispatcher.post(_grad_or_zeros(back), layout.recv_splits, layout.send_splits,
                                       "combine-grad")
        yield
        # B2: the shared experts first (they do not need the combine's gradient, so they cover its transfer),
        # then the routed experts; post the dispatch's transpose
        _backward([(shared, None if shared_in is None else shared_in.grad)])
        with held.holding():  # the routed experts' input-gradients now, their weight-gradients after the post
            _backward([(y_src, combine_grad.wait())])
        dispatch_grad = dispatcher.post(_grad_or_zeros(recv), layout.send_splits, layout.recv_splits,
                                        "dispatch-grad")
        held.release()  # DeepSeek-V3's MLP(W) while the dispatch's gradient travels
        yield
        # B1: through the sort, the router (gates, balance loss) and attention, to the block input
        balance = routing.balance_loss
        _backward([(local.x, dispatch_grad.wait()), (local.gates, gates_in.grad), (x, x_in.grad),
                   (a, a_in.grad),
                   (balance, None if balance is None else torch.full_like(balance, loss_scale))])

    return out, backward

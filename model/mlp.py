"""SwiGLU feed-forward: the dense layers' MLP and the MoE's shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.gemm import Linear


class _SwiGLUFn(torch.autograd.Function):
    """[gate; up] [..., 2I] -> silu(gate) * up [..., I], saving only the input (through `storage`, e.g. in
    E4M3, when given: model.gemm.GemmBackend.activation_storage).

    Autograd's chunk + silu + mul would keep silu(gate) as well and end its backward with a cat of the two
    halves; here both halves of the gradient are written straight into one buffer, and silu is recomputed.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, storage) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.storage, ctx.dtype = storage, gate_up.dtype
        ctx.save_for_backward(*((gate_up,) if storage is None else storage.pack(gate_up)))
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        if ctx.storage is None:
            (gate_up,) = ctx.saved_tensors
        else:
            gate_up = ctx.storage.unpack(*ctx.saved_tensors, ctx.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        # same arithmetic as autograd's silu/mul backward: d_gate = silu'(gate) * (dh * up), d_up = dh * silu(gate).
        # The gradient overwrites the saved gate_up, which nothing else reads: fresh [T, 2I] buffers cost page
        # faults on CPU. The in-place write bumps its version, so a second backward through this graph
        # (retain_graph) fails loudly instead of reading the overwritten values.
        grad_gate_in = grad_h * up
        torch.ops.aten.silu.out(gate, out=up)
        up.mul_(grad_h)
        torch.ops.aten.silu_backward.grad_input(grad_gate_in, gate, grad_input=gate)
        return gate_up, None


def swiglu(gate_up: torch.Tensor, storage: object = None) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate; up] on the last dim; the input kept for backward through `storage`
    (None: as it is)."""
    return _SwiGLUFn.apply(gate_up, storage)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if gate.backend.is_plain and up.backend.is_plain:
            # plain torch GEMMs: one GEMM over [gate; up] (the weight concat is tiny next to the activations);
            # other backends (FP8, deferred weight-grad) see the two projections separately
            h = swiglu(F.linear(x, torch.cat([gate.weight, up.weight])))
        else:
            # one [gate; up] buffer, so the backward keeps one input (in E4M3 where the backend stores so)
            h = swiglu(torch.cat([gate(x), up(x)], dim=-1), gate.backend.activation_storage)
        return self.down_proj(h)

"""DeepSeekMoE: shared experts plus fine-grained routed experts, run as explicit sub-steps.

    route    -> Routing (experts [T, K], gates [T, K], counts [E])
    dispatch -> rows sorted by expert + rows per expert   (a `Dispatcher`; expert parallelism plugs in here)
    experts  -> grouped SwiGLU over contiguous row slices (no token dropping, no dense per-expert masks)
    combine  -> rows back to tokens, gate-weighted sum over the K choices, plus shared experts

`MoE.forward` is those sub-steps back to back; a pipeline schedule can call them one at a time.

Moving rows between token order and expert order is the only non-GEMM work proportional to T*K*hidden, so
the local dispatcher does it with one gather forward and one segment sum backward (and the reverse for
combine) through small custom autograd functions, instead of autograd's index / index_put / cat chain.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.gemm import GroupedLinear
from model.mlp import SwiGLU, swiglu
from model.router import Router, Routing


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_up_proj [E, 2I, hidden] ([gate; up]), down_proj [E, hidden, I].

    x [N, hidden] sorted by expert, `rows` [E] rows each -> [N, hidden]. A shard for expert parallelism holds
    a contiguous range of experts (`first_expert`).
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int, first_expert: int = 0) -> None:
        super().__init__()
        self.n_experts, self.intermediate, self.first_expert = n_experts, intermediate, first_expert
        self.gate_up_proj = GroupedLinear(n_experts, hidden, 2 * intermediate)
        self.down_proj = GroupedLinear(n_experts, intermediate, hidden)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        offsets = rows.cumsum(0, dtype=torch.int32)
        gate_up = self.gate_up_proj(x, offsets)
        return self.down_proj(swiglu(gate_up, self.gate_up_proj.backend.activation_storage), offsets)


@dataclass
class Dispatched:
    """Rows sorted by expert: x [T*K, hidden], rows per (local) expert, and what combine needs to undo it."""

    x: torch.Tensor
    rows: torch.Tensor
    order: torch.Tensor  # position in the flat [T*K] choice list of each sorted row
    gates: torch.Tensor  # [T, K]
    # LocalDispatcher's index maps, computed once per dispatch (None from dispatchers that do not set them)
    token: torch.Tensor | None = None  # [T*K] token of each sorted row (order // K)
    slots: torch.Tensor | None = None  # [T, K] sorted-row positions of each token's K choices, ascending
    slot_choice: torch.Tensor | None = None  # [T, K] which of the K choices sits in each slot


def _sum_slots(src: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * src[slots[t, j]] (weights all one when None); src [N, H] -> [T, H].

    Every token owns exactly K rows, so this is an embedding-bag sum with bags of K: one pass that reads each
    source row once and writes each output row once (no atomics, deterministic, no [T, K, H] temporary).
    """
    if slots.numel() == 0:
        return src.new_zeros(slots.shape[0], src.shape[1])
    w = None if weights is None else weights.to(src.dtype)
    return F.embedding_bag(slots, src.contiguous(), mode="sum", per_sample_weights=w)


def _scaled_rows(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out[r] = scale[r] * src[index[r]]: a gather and a row scaling in one pass (embedding bags of one row)."""
    if index.numel() == 0:
        return src.new_zeros(0, src.shape[1])
    offsets = torch.arange(index.shape[0], device=index.device)
    return F.embedding_bag(index, src.contiguous(), offsets, mode="sum", per_sample_weights=scale.to(src.dtype))


def _slot_dots(a: torch.Tensor, src: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """out[t, j] = <a[t], src[slots[t, j]]>; a [T, H], src [N, H] -> [T, K].

    On CPU (fp32/fp64) a sampled dense-dense product over the [T, N] pattern of the slots: it reads each
    source row once and needs no [T*K, H] temporary. Elsewhere a gather and a batched dot product.
    """
    t, k = slots.shape
    if src.device.type == "cpu" and src.dtype in (torch.float32, torch.float64) and slots.numel() > 0:
        crow = torch.arange(0, t * k + 1, k, dtype=slots.dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": this one product is all we use
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow, slots.reshape(-1), torch.zeros(t * k, dtype=src.dtype), size=(t, src.shape[0]),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, a, src.t(), beta=0.0).values().view(t, k)
    rows = src.index_select(0, slots.reshape(-1)).view(t, k, src.shape[1])
    return torch.bmm(rows, a.unsqueeze(2)).view(t, k)


class _GatherRows(torch.autograd.Function):
    """x [T, H] -> x[token] [T*K, H]; backward sums each token's K row gradients (a segment sum, no scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slots)
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slots,) = ctx.saved_tensors
        return _sum_slots(grad, slots, None), None, None


class _CombineRows(torch.autograd.Function):
    """y [T*K, H] sorted by expert, gates [T, K] -> out[t] = sum_k gates[t, k] * y[row of (t, k)].

    Backward: d_y[r] = gate_r * d_out[token_r] (one gather-and-scale pass) and
    d_gates[t, k] = <d_out[t], y[row of (t, k)]> (row dot products).
    """

    @staticmethod
    def forward(
        ctx,
        y: torch.Tensor,
        gates: torch.Tensor,
        token: torch.Tensor,
        slots: torch.Tensor,
        slot_choice: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(y, gates, token, slots, slot_choice, order)
        return _sum_slots(y, slots, gates.gather(1, slot_choice))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, gates, token, slots, slot_choice, order = ctx.saved_tensors
        grad_gates = grad_y = None
        if ctx.needs_input_grad[1]:
            dots = _slot_dots(grad_out.contiguous(), y, slots)
            grad_gates = torch.empty_like(dots).scatter_(1, slot_choice, dots)
        if ctx.needs_input_grad[0]:
            grad_y = _scaled_rows(grad_out, token, gates.reshape(-1).index_select(0, order))
        return grad_y, grad_gates, None, None, None, None


class LocalDispatcher:
    """All experts on this rank: a stable sort of the T*K choices by expert id, and its inverse."""

    def dispatch(self, x: torch.Tensor, routing: Routing, n_experts: int) -> Dispatched:
        t, k = routing.experts.shape
        with torch.no_grad():
            order = torch.argsort(routing.experts.reshape(-1), stable=True)
            token = order // k
            # inverse permutation: sorted-row position of every (token, choice), as [T, K] with ascending rows
            position = torch.empty_like(order).index_copy_(0, order, torch.arange(t * k, device=order.device))
            slots, slot_choice = position.view(t, k).sort(dim=1)
        x_sorted = _GatherRows.apply(x, token, slots)
        return Dispatched(
            x=x_sorted, rows=routing.counts, order=order, gates=routing.gates, token=token, slots=slots,
            slot_choice=slot_choice,
        )

    def combine(self, y: torch.Tensor, d: Dispatched) -> torch.Tensor:
        if d.token is None or d.slots is None or d.slot_choice is None:
            t, k = d.gates.shape
            unsorted = torch.empty_like(y).index_copy_(0, d.order, y).view(t, k, -1)
            return torch.bmm(d.gates.to(y.dtype).unsqueeze(1), unsorted).squeeze(1)
        return _CombineRows.apply(y, d.gates.to(y.dtype), d.token, d.slots, d.slot_choice, d.order)


class MoE(nn.Module):
    """x [B, S, hidden] -> (y [B, S, hidden], Routing). HF names: gate, experts, shared_experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.dispatcher = LocalDispatcher()

    # ---- sub-steps ---------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        return self.gate(x)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        return self.dispatcher.dispatch(x.reshape(-1, x.shape[-1]), routing, self.cfg.n_routed_experts)

    def compute_experts(self, d: Dispatched) -> torch.Tensor:
        return self.experts(d.x, d.rows)

    def combine(self, y: torch.Tensor, d: Dispatched, x: torch.Tensor) -> torch.Tensor:
        out = self.dispatcher.combine(y, d).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        routing = self.route(x)
        d = self.dispatch(x, routing)
        y = self.compute_experts(d)
        return self.combine(y, d, x), routing

"""DeepSeekMoE: shared experts plus fine-grained routed experts, run as explicit sub-steps.

    route    -> Routing (experts [T, K], gates [T, K], counts [E])
    dispatch -> rows sorted by expert + rows per expert   (a `Dispatcher`; expert parallelism plugs in here)
    experts  -> grouped SwiGLU over contiguous row slices (no token dropping, no dense per-expert masks)
    combine  -> rows back to tokens, gate-weighted sum over the K choices, plus shared experts

`MoE.forward` is those sub-steps back to back; a pipeline schedule can call them one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.gemm import GroupedLinear
from model.mlp import SwiGLU
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
        offsets = rows.cumsum(0).to(torch.int32)
        gate, up = self.gate_up_proj(x, offsets).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, offsets)


@dataclass
class Dispatched:
    """Rows sorted by expert: x [T*K, hidden], rows per (local) expert, and what combine needs to undo it."""

    x: torch.Tensor
    rows: torch.Tensor
    order: torch.Tensor  # position in the flat [T*K] choice list of each sorted row
    gates: torch.Tensor  # [T, K]


class LocalDispatcher:
    """All experts on this rank: a stable sort of the T*K choices by expert id, and its inverse."""

    def dispatch(self, x: torch.Tensor, routing: Routing, n_experts: int) -> Dispatched:
        k = routing.experts.shape[1]
        flat = routing.experts.flatten()
        order = torch.argsort(flat, stable=True)
        return Dispatched(x=x[order // k], rows=routing.counts, order=order, gates=routing.gates)

    def combine(self, y: torch.Tensor, d: Dispatched) -> torch.Tensor:
        t, k = d.gates.shape
        unsorted = torch.empty_like(y).index_copy_(0, d.order, y).view(t, k, -1)
        # gate-weighted sum over the K choices of each token, as one batched GEMV
        return torch.bmm(d.gates.to(y.dtype).unsqueeze(1), unsorted).squeeze(1)


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

"""SwiGLU feed-forward: the dense layers' MLP and the MoE's shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.gemm import Linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

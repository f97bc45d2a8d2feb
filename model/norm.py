"""RMSNorm with fp32 statistics, cast back to the input dtype before the weight (as DeepSeek and HF do)."""

from __future__ import annotations

import torch
from torch import nn

from model.compiled import regional


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), the statistics in fp32; x [..., dim]."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)); x [..., dim] -> [..., dim]. `compile`: through torch.compile
    (`model.compile_regions`, model/compiled.py)."""

    def __init__(self, dim: int, eps: float = 1e-6, compile: bool = False) -> None:
        super().__init__()
        self.eps, self.compile = eps, compile
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return regional(rms_norm, self.compile, x.device)(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", compiled" if self.compile else "")

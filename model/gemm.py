"""The GEMMs of the network behind one small interface.

`Linear` (a bias-free projection) and `GroupedLinear` (one weight per routed expert, applied to contiguous
row slices) route their matrix products through a `GemmBackend`. The default backend is plain fp32/bf16
torch; an FP8 backend (emulated or Transformer Engine) or a backend that defers weight gradients for the
zero-bubble pipeline swaps in with `set_gemm_backend(model, backend)` without touching the layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_available() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(4, 4)
        b = torch.ones(2, 4, 4)
        offs = torch.tensor([1, 4], dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs)
        return True
    except (RuntimeError, NotImplementedError):
        return False


GROUPED_MM = _grouped_mm_available()
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm needs one dtype, rows to multiply, and every non-unit stride 16-byte aligned."""
    dtype = tensors[0].dtype
    if not GROUPED_MM or dtype not in _GROUPED_MM_DTYPES or any(t.dtype != dtype for t in tensors):
        return False
    if tensors[0].shape[0] == 0:
        return False
    for t in tensors:
        align = 16 // t.element_size()
        if any(s % align for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1):
            return False
    return True


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e]; x [T, K], w [E, K, N], offsets = cumsum(rows) int32."""
    if _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


def grouped_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, n_groups: int) -> torch.Tensor:
    """dW[e] = grad_out[rows e]^T @ x[rows e]; grad_out [T, N], x [T, K] -> [E, N, K] (zero for empty groups)."""
    if _grouped_mm_ok(grad_out.t(), x):
        return torch._grouped_mm(grad_out.t(), x, offs=offsets)
    out = x.new_zeros(n_groups, grad_out.shape[1], x.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(grad_out[start:end].t(), x[start:end], out=out[e])
        start = end
    return out


class _GroupedLinearFn(torch.autograd.Function):
    """y = grouped x @ W^T with W [E, N, K]; backward gives dX by a grouped GEMM with W, dW by grouped x^T dY."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, offsets)
        return grouped_mm(x, weight.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad_out, weight, offsets)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_weight_grad(grad_out, x, offsets, weight.shape[0])
        return grad_x, grad_w, None


class GemmBackend:
    """Plain torch GEMMs. Subclasses override `linear` / `grouped_linear` (FP8, deferred weight-grad)."""

    name = "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return _GroupedLinearFn.apply(x, weight, offsets)


DEFAULT_BACKEND = GemmBackend()


class Linear(nn.Module):
    """Bias-free projection y = x W^T, W [out, in], through the module's GEMM backend."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.backend: GemmBackend = DEFAULT_BACKEND
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend.name}"


class GroupedLinear(nn.Module):
    """One [out, in] weight per group (expert); rows of x arrive sorted by group, `counts` rows each."""

    def __init__(self, num_groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_groups, self.in_features, self.out_features = num_groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_groups, out_features, in_features))
        self.backend: GemmBackend = DEFAULT_BACKEND
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.backend.grouped_linear(x, self.weight, offsets)

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, in={self.in_features}, out={self.out_features}, backend={self.backend.name}"


def set_gemm_backend(module: nn.Module, backend: GemmBackend) -> None:
    """Route every Linear / GroupedLinear under `module` through `backend`."""
    for m in module.modules():
        if isinstance(m, Linear | GroupedLinear):
            m.backend = backend

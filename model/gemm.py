"""The GEMMs of the network behind one small interface.

`Linear` (a bias-free projection) and `GroupedLinear` (one weight per routed expert, applied to contiguous
row slices) route their matrix products through a `GemmBackend`, which owns two independent choices:
- the numerics of the three GEMMs of a linear layer (plain torch, or FP8: `set_gemm_backend`);
- when the weight-gradient GEMM runs (in backward, or deferred by the zero-bubble pipeline into a store that
  a later W step drains: `defer_weight_grads`).
So FP8 and the zero-bubble split compose without either knowing the other, and without touching the layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

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


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (the deferred weight-gradient path writes gradients itself)."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class WeightGradWork:
    """One deferred weight-gradient GEMM: calling it adds `compute()` to `weight.grad`. The weight it writes is
    named, so a schedule can tell when a parameter's gradient is final (its gradient reduction may start)."""

    __slots__ = ("weight", "compute")

    def __init__(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        self.weight, self.compute = weight, compute

    def __call__(self) -> None:
        accumulate_grad(self.weight, self.compute())


class _LinearFn(torch.autograd.Function):
    """y = x W^T through a backend's three GEMMs. The weight is held by reference, not saved: under activation
    checkpointing a saved tensor comes back as a new alias, and a deferred gradient must land on the parameter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: GemmBackend) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        out = backend.fprop(x2d, weight).view(*x.shape[:-1], weight.shape[0])
        saved, ctx.x_meta = backend.pack_input(x2d)
        ctx.save_for_backward(*saved)
        ctx.weight, ctx.backend, ctx.x_shape = weight, backend, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        backend, weight = ctx.backend, ctx.weight
        x2d = backend.unpack_input(ctx.saved_tensors, ctx.x_meta)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = backend.dgrad(g2d, weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if backend.wgrad_store is None:
                grad_w = backend.wgrad(g2d, x2d)
            else:
                backend.wgrad_store.defer_or_run(WeightGradWork(weight, lambda: backend.wgrad(g2d, x2d)))
        return grad_x, grad_w, None


class _GroupedLinearFn(torch.autograd.Function):
    """Grouped y = x W[e]^T with W [E, N, K] over contiguous row groups, through a backend's grouped GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, backend: GemmBackend):
        out = backend.grouped_fprop(x, weight, offsets)
        saved, ctx.x_meta = backend.pack_grouped_input(x, offsets)
        ctx.save_for_backward(offsets, *saved)
        ctx.weight, ctx.backend = weight, backend
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        offsets, *saved = ctx.saved_tensors
        backend, weight = ctx.backend, ctx.weight
        x = backend.unpack_grouped_input(tuple(saved), ctx.x_meta, offsets)
        grad_out = grad_out.contiguous()
        grad_x = backend.grouped_dgrad(grad_out, weight, offsets) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            def wgrad() -> torch.Tensor:
                return backend.grouped_wgrad(grad_out, x, offsets, weight.shape[0])

            if backend.wgrad_store is None:
                grad_w = wgrad()
            else:
                backend.wgrad_store.defer_or_run(WeightGradWork(weight, wgrad))
        return grad_x, grad_w, None, None


class GemmBackend:
    """How a linear layer's three GEMMs compute: forward y = x W^T, input-gradient dX = dY W, weight-gradient
    dW = dY^T X (and their grouped forms for experts). Plain torch here; an FP8 backend overrides the
    primitives. `wgrad_store` (anything with `defer_or_run(fn)`, e.g. the zero-bubble pipeline's
    WeightGradStore) makes the weight-gradient GEMM run later; None runs it in backward, through autograd.
    """

    name = "torch"
    wgrad_store = None

    # ---- numerics: 2-D operands, contraction over the last dim of both ------------------------------
    def fprop(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w.t()

    def dgrad(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return g @ w

    def wgrad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return g.t() @ x

    def grouped_fprop(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_mm(x, w.transpose(1, 2), offsets)

    def grouped_dgrad(self, g: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_mm(g, w, offsets)

    def grouped_wgrad(self, g: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
        return grouped_weight_grad(g, x, offsets, n)

    # ---- what the forward keeps for the weight-gradient GEMM ----------------------------------------------
    # An FP8 backend keeps the GEMM's own E4M3 operand (1 byte a value and its scales) instead of the input:
    # the weight-gradient GEMM reads the same values either way. `pack_*` returns (tensors to save, metadata);
    # `unpack_*` gives back what `wgrad` / `grouped_wgrad` then receive as `x`.
    def pack_input(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        return (x,), None

    def unpack_input(self, saved: tuple[torch.Tensor, ...], meta: object) -> object:
        return saved[0]

    def pack_grouped_input(self, x: torch.Tensor, offsets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        return (x,), None

    def unpack_grouped_input(self, saved: tuple[torch.Tensor, ...], meta: object, offsets: torch.Tensor) -> object:
        return saved[0]

    # SwiGLU's input, which its backward reads: None keeps it as it is; an FP8 backend may return a codec
    # (model.fp8.numerics.FP8Storage) that stores it in E4M3, as the DeepSeek-V3 report does for the experts
    activation_storage: object = None

    # ---- what the layers call ---------------------------------------------------------------------------
    @property
    def is_plain(self) -> bool:
        """Plain torch numerics, weight-gradients in backward: layers may take fused fast paths. A store that
        says it is not `active` (no deferral expected for this forward) counts as none."""
        store = self.wgrad_store
        return type(self).fprop is GemmBackend.fprop and (store is None or not getattr(store, "active", True))

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_plain:
            return F.linear(x, weight)
        return _LinearFn.apply(x, weight, self)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return _GroupedLinearFn.apply(x, weight, offsets, self)

    def with_wgrad_store(self, store: object | None) -> GemmBackend:
        """A copy of this backend whose weight-gradients go through `store`."""
        clone = copy.copy(self)
        clone.wgrad_store = store
        return clone


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


def defer_weight_grads(module: nn.Module, store: object | None) -> None:
    """Keep every layer's GEMM numerics, but send its weight-gradients through `store` (None: back to
    computing them in backward)."""
    for m in module.modules():
        if isinstance(m, Linear | GroupedLinear):
            m.backend = m.backend.with_wgrad_store(store)

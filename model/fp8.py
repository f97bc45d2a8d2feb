"""FP8 numerics, emulated: quantize GEMM operands to E4M3 exactly as a recipe would, compute in fp32.

A recipe fixes, for each operand of each of a linear layer's three GEMMs, the granularity of its scale:
forward y = x W^T, input-gradient dX = dY W, weight-gradient dW = dY^T X. Scales come from the current
amax of each tile (or, for `delayed`, from an amax history), values are rounded to float8_e4m3fn (saturating
at 448) and multiplied back by their scale, and the GEMM then runs in fp32 on those exactly-representable
values. So the rounding error matches the hardware's; only the accumulation differs (fp32 throughout, which
is what DeepSeek's promotion of partial sums every 128 elements approximates).

Tiles are given as (rows, cols) of the operand as it enters the GEMM, contraction dimension last:
- blockwise (DeepSeek-V3): activations and output-gradients 1 x 128 along the contraction dimension (for the
  weight-gradient GEMM that is 128 x 1 along tokens), weights 128 x 128 blocks;
- current: one scale per tensor, from its current amax;
- delayed: one scale per tensor, from the max of the last `history` amaxes of that operand (stateful);
- mxfp8: 1 x 32 blocks along the contraction dimension with power-of-two (E8M0) scales.

This module also holds what else the report keeps in low precision around the GEMMs: the 1 x 128 FP8 form of
activations sent through the expert-parallel dispatch (`quantize_dispatch`), the selection of the layers
that run in FP8 (`apply_fp8`), and AdamW with BF16 moments (`BF16MomentsAdamW`). docs/fp8.md has the tables.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.gemm import GemmBackend, GroupedLinear, Linear, grouped_mm, grouped_weight_grad

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
RECIPES = ("blockwise", "current", "delayed", "mxfp8")
FP8_BACKENDS = ("te", "emulated", "torch")  # Transformer Engine | this module's emulation | model/fp8_native.py
DISPATCH_TILE = 128  # activations sent through the EP dispatch: 1 x 128 tiles, as the blockwise recipe's


# ---- quantization ------------------------------------------------------------------------------------
def _tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """View of the last two dims as [..., R/rows, rows, C/cols, cols], edge tiles padded with zeros."""
    r, c = x.shape[-2:]
    pr, pc = -r % rows, -c % cols
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.view(*x.shape[:-2], (r + pr) // rows, rows, (c + pc) // cols, cols)


def _untile(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_tiles`: back to [..., R, C] with the padding cut off."""
    full = t.reshape(*t.shape[:-4], t.shape[-4] * t.shape[-3], t.shape[-2] * t.shape[-1])
    return full[..., : shape[-2], : shape[-1]]


def _tile_amax(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """amax over (rows x cols) tiles of the last two dims (edge tiles padded with zeros): [..., R/rows, C/cols]."""
    return _tiles(t.abs(), rows, cols).amax(dim=(-3, -1))


def _scale(amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """Dequantization multiplier (DeepSeek's `scale_inv`): amax maps to 448; all-zero tiles keep scale 1."""
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if power_of_two:  # E8M0: the next power of two up, so nothing saturates
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


@dataclass
class Quantized:
    """E4M3 values and their scales: `values * scale` (per tile) is the number the GEMM sees.
    `scale` is a 0-d tensor (tile None) or one value per tile [..., ceil(R/rows), ceil(C/cols)]."""

    values: torch.Tensor  # float8_e4m3fn, shape of the source
    scale: torch.Tensor  # fp32
    tile: tuple[int, int] | None

    def dequantize(self) -> torch.Tensor:
        if self.tile is None:
            return self.values.float() * self.scale
        tiled = _tiles(self.values.float(), *self.tile) * self.scale[..., :, None, :, None]
        return _untile(tiled, self.values.shape)

    def t(self) -> Quantized:
        """The transpose of a 2-D operand, scales transposed with it (tiles swap their sides)."""
        tile = None if self.tile is None else (self.tile[1], self.tile[0])
        return Quantized(self.values.t(), self.scale if self.tile is None else self.scale.t(), tile)


def quantize(
    t: torch.Tensor, tile: tuple[int, int] | None, power_of_two: bool = False, amax: torch.Tensor | None = None
) -> Quantized:
    """E4M3 values with one scale per tile of the last two dims (tile None: per tensor). `amax` overrides the
    tensor's own (delayed scaling); values beyond it saturate at 448."""
    x = t.float()
    if tile is None:
        a = x.abs().amax() if amax is None else amax.float()
        scale = _scale(a, power_of_two)
        return Quantized((x / scale).to(torch.float8_e4m3fn), scale, None)
    tiled = _tiles(x, *tile)
    scale = _scale(tiled.abs().amax(dim=(-3, -1), keepdim=True), power_of_two)
    values = _untile((tiled / scale).to(torch.float8_e4m3fn), x.shape)
    return Quantized(values, scale[..., :, 0, :, 0], tile)


def quantize_dequantize(
    t: torch.Tensor, tile: tuple[int, int] | None, power_of_two: bool = False, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """E4M3 values times their scales, in fp32. tile None: one scale for the whole tensor; `amax` overrides
    the tensor's own amax (delayed scaling). Equal to quantize(...).dequantize(), in one pass."""
    x = t.float()
    if tile is None:
        a = x.abs().amax() if amax is None else amax.float()
        scale = _scale(a, power_of_two)
        return (x / scale).to(torch.float8_e4m3fn).float() * scale
    tiled = _tiles(x, *tile)
    scale = _scale(tiled.abs().amax(dim=(-3, -1), keepdim=True), power_of_two)
    return _untile((tiled / scale).to(torch.float8_e4m3fn).float() * scale, x.shape)


@dataclass(frozen=True)
class OperandScaling:
    tile: tuple[int, int] | None
    power_of_two: bool = False


def recipe_scaling(recipe: str, role: str) -> OperandScaling:
    """Scaling of one operand role: 'act' (x, or dY in dgrad: contraction dim last), 'weight' (W, or W^T in
    dgrad: contraction dim last), 'act_t' (an operand of the weight-gradient GEMM, contraction along its
    rows = tokens)."""
    if recipe == "blockwise":
        return OperandScaling({"act": (1, 128), "weight": (128, 128), "act_t": (128, 1)}[role])
    if recipe == "mxfp8":
        # MX blocks run along the contraction dimension of the GEMM at hand; the caller passes W^T for dgrad
        return OperandScaling({"act": (1, 32), "weight": (1, 32), "act_t": (32, 1)}[role], power_of_two=True)
    if recipe in ("current", "delayed"):
        return OperandScaling(None)
    raise ValueError(f"precision.fp8.recipe: unknown recipe {recipe!r}; choose one of {RECIPES}")


class AmaxHistory:
    """Delayed scaling state of one operand: the scale comes from past amaxes, not the current one."""

    def __init__(self, length: int = 16) -> None:
        self.values: deque[torch.Tensor] = deque(maxlen=length)

    def scale_amax(self, t: torch.Tensor) -> torch.Tensor:
        """The amax to scale `t` with (the history's max; `t`'s own when empty), then record `t`'s."""
        current = t.detach().abs().amax().float()
        amax = torch.stack(list(self.values)).amax() if self.values else current
        self.values.append(current)
        return amax

    def peek(self, t: torch.Tensor) -> torch.Tensor:
        """The history's max without recording (`t`'s own amax when empty)."""
        return torch.stack(list(self.values)).amax() if self.values else t.detach().abs().amax().float()


def fp8_error(t: torch.Tensor, recipe: str, role: str = "act") -> float:
    """Relative Frobenius error of quantize-dequantize under a recipe (a diagnostic for tests and docs)."""
    s = recipe_scaling(recipe, role)
    q = quantize_dequantize(t, s.tile, s.power_of_two)
    return float((q - t.float()).norm() / t.float().norm().clamp(min=1e-30))


# ---- the emulated backend ----------------------------------------------------------------------------
def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward seen now is an activation-checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1


def _scaled_mm_usable(device: torch.device) -> bool:
    """torch._scaled_mm is fast only on FP8 tensor cores (SM89+); on CPU it is a reference kernel
    (~30 MFLOP/s here), so the dequantized fp32 GEMM is the default there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class EmulatedFP8Backend(GemmBackend):
    """The three GEMMs of a linear layer with their operands quantized as `recipe` would, computed in fp32.

    fprop  y  = x W^T:   x 'act',   W 'weight'
    dgrad  dX = dY W:    dY 'act',  W^T 'weight' (contraction over W's rows: 128x128 blocks serve transposed
                         as they are; MX blocks of 32 run along W's rows, i.e. along that GEMM's contraction)
    wgrad  dW = dY^T X:  dY, X 'act_t' (contraction over tokens)
    Grouped forms quantize each expert's rows on their own (per-tensor scales per expert, token tiles aligned
    to the expert's first row, as a grouped FP8 GEMM over padded splits does) and each expert's weight alone.

    `delayed` keeps an AmaxHistory per operand (x, W, dY; per expert for grouped layers), so a backend
    instance belongs to one layer: `apply_fp8` calls `for_layer` for each. A forward seen during backward
    (activation-checkpoint recompute) does not record into the histories. The weight-gradient GEMM reuses
    the forward's x and the dgrad's dY histories without recording again.

    `scaled_mm`: compute per-tensor recipes with torch._scaled_mm on the FP8 values (None: on SM89+ GPUs);
    a test checks it against the dequantize-then-matmul path.
    """

    def __init__(self, recipe: str, history: int = 16, scaled_mm: bool | None = None) -> None:
        recipe_scaling(recipe, "act")  # validates the name
        self.recipe, self.history, self.scaled_mm = recipe, history, scaled_mm
        self.name = f"fp8-emulated-{recipe}"
        self.histories: dict[tuple, AmaxHistory] = {}

    def for_layer(self, name: str, layer: nn.Module) -> EmulatedFP8Backend:
        """A fresh instance (own amax histories) for one layer."""
        return EmulatedFP8Backend(self.recipe, self.history, self.scaled_mm)

    # ---- operands --------------------------------------------------------------------------------------
    def _amax(self, t: torch.Tensor, key: tuple, record: bool) -> torch.Tensor | None:
        """delayed: the amax from the operand's history (recorded unless told not to, or in a recompute)."""
        if self.recipe != "delayed":
            return None
        hist = self.histories.setdefault(key, AmaxHistory(self.history))
        return hist.scale_amax(t) if record and not _in_backward() else hist.peek(t)

    def _q(self, t: torch.Tensor, role: str, key: tuple, record: bool = True) -> Quantized:
        s = recipe_scaling(self.recipe, role)
        return quantize(t, s.tile, s.power_of_two, self._amax(t, key, record))

    def _dq(self, t: torch.Tensor, role: str, key: tuple, record: bool = True) -> torch.Tensor:
        s = recipe_scaling(self.recipe, role)
        return quantize_dequantize(t, s.tile, s.power_of_two, self._amax(t, key, record))

    def _gemm(self, a: tuple, b: tuple) -> torch.Tensor:
        """A @ B^T in fp32 for operands given as (tensor, role, key, record), both contraction-last."""
        per_tensor = recipe_scaling(self.recipe, "act").tile is None
        use = self.scaled_mm if self.scaled_mm is not None else _scaled_mm_usable(a[0].device)
        if use and per_tensor:
            qa, qb = self._q(*a), self._q(*b)
            return torch._scaled_mm(qa.values.contiguous(), qb.values.contiguous().t(), scale_a=qa.scale,
                                    scale_b=qb.scale, out_dtype=torch.float32)
        return self._dq(*a) @ self._dq(*b).t()

    def _qrows(self, t: torch.Tensor, role: str, key: str, offsets: torch.Tensor, record: bool = True) -> torch.Tensor:
        """Dequantized rows of a grouped operand, each expert's rows quantized on their own."""
        s = recipe_scaling(self.recipe, role)
        if s.tile is not None and s.tile[0] == 1:  # row tiles never straddle experts: one call does all
            return quantize_dequantize(t, s.tile, s.power_of_two)
        out, start = [], 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                out.append(self._dq(t[start:end], role, (key, e), record))
            start = end
        return torch.cat(out) if out else t.float()

    # ---- the GEMMs -------------------------------------------------------------------------------------
    def fprop(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._gemm((x, "act", ("x",), True), (w, "weight", ("w",), True)).to(x.dtype)

    def dgrad(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # W^T is the contraction-last operand here; the delayed recipe reuses the forward's weight history
        return self._gemm((g, "act", ("g",), True), (w.t(), "weight", ("w",), False)).to(g.dtype)

    def wgrad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # token tiles of the original [T, .] operands, then the contraction-last transposes
        s = recipe_scaling(self.recipe, "act_t")
        if s.tile is None:
            return self._gemm((g.t(), "act_t", ("g",), False), (x.t(), "act_t", ("x",), False)).to(g.dtype)
        return (self._dq(g, "act_t", ("g",), False).t() @ self._dq(x, "act_t", ("x",), False)).to(g.dtype)

    def _weights(self, w: torch.Tensor, transpose: bool) -> torch.Tensor:
        """Each expert's weight (or its transpose, contraction-last) quantized alone, dequantized."""
        s = recipe_scaling(self.recipe, "weight")
        src = w.transpose(1, 2) if transpose else w
        if s.tile is not None:  # tiles of the last two dims never straddle experts
            return quantize_dequantize(src, s.tile, s.power_of_two)
        return torch.stack([self._dq(src[e], "weight", ("w", e), not transpose) for e in range(w.shape[0])])

    def grouped_fprop(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        xq = self._qrows(x, "act", "x", offsets)
        return grouped_mm(xq, self._weights(w, False).transpose(1, 2), offsets).to(x.dtype)

    def grouped_dgrad(self, g: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gq = self._qrows(g, "act", "g", offsets)
        return grouped_mm(gq, self._weights(w, True).transpose(1, 2), offsets).to(g.dtype)

    def grouped_wgrad(self, g: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
        gq = self._qrows(g, "act_t", "g", offsets, record=False)
        xq = self._qrows(x, "act_t", "x", offsets, record=False)
        return grouped_weight_grad(gq, xq, offsets, n).to(g.dtype)


def make_fp8_backend(fp8: Any, amax_group: object = None) -> GemmBackend | None:
    """The GEMM backend `precision.fp8` asks for (a trainer.config.FP8Config, or anything with its fields
    enabled / backend / recipe / amax_history); None when FP8 is off. TE amaxes reduce over `amax_group`.
    `emulated`: EmulatedFP8Backend (any device); `torch`: model.fp8_native.ScaledMMFP8Backend (real FP8 GEMMs
    through torch._scaled_mm, SM89+); `te`: model.te_backend.TEBackend (Transformer Engine)."""
    if not fp8.enabled:
        return None
    if fp8.backend == "emulated":
        return EmulatedFP8Backend(fp8.recipe, history=fp8.amax_history)
    if fp8.backend == "torch":
        from model.fp8_native import ScaledMMFP8Backend

        return ScaledMMFP8Backend(fp8.recipe)
    if fp8.backend == "te":
        from model.te_backend import TEBackend

        return TEBackend(fp8.recipe, amax_group)
    raise ValueError(f"precision.fp8.backend: unknown backend {fp8.backend!r}; choose one of {FP8_BACKENDS}")


# ---- which layers run in FP8 -------------------------------------------------------------------------
# The report keeps the embedding, the output head, the router, norms and the attention core in high
# precision; the released checkpoints also keep the MTP projection (eh_proj) in BF16. The router, norms,
# embedding and attention core are not Linear modules here; these two are.
HIGH_PRECISION_LAYERS = ("head.lm_head", "eh_proj")


def is_fp8_layer(name: str) -> bool:
    return not any(name == p or name.endswith("." + p) for p in HIGH_PRECISION_LAYERS)


def fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear / GroupedLinear layers of attention, dense MLPs, shared and routed experts, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear | GroupedLinear) and is_fp8_layer(n)}


def apply_fp8(model: nn.Module, backend: GemmBackend) -> list[str]:
    """Route the FP8 layers of `model` through `backend` (through `backend.for_layer(name, layer)` when it
    has one: stateful backends get an instance per layer). Call before `defer_weight_grads`, which keeps
    each layer's numerics. Returns the names of the layers switched."""
    names = []
    for name, layer in fp8_layers(model).items():
        make = getattr(backend, "for_layer", None)
        layer.backend = make(name, layer) if make is not None else backend
        names.append(name)
    return names


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


# ---- low-precision optimizer states ------------------------------------------------------------------
class BF16MomentsAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) that stores exp_avg and exp_avg_sq in BF16, as the
    DeepSeek-V3 report does; the update itself is computed in fp32 on the fp32 master weights. Halves the
    optimizer-state memory. torch's AdamW and DeepSpeed's FusedAdam keep moments in the parameter dtype."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                update = (m / (1 - b1**t)).div_(denom)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer states (a check for the BF16-moments switch)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
RECIPES = ("blockwise", "current", "delayed", "mxfp8")


def _tile_amax(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """amax over (rows x cols) tiles of a 2-D tensor (edge tiles padded with zeros): [R/rows, C/cols]."""
    r, c = t.shape
    pr, pc = -r % rows, -c % cols
    padded = torch.nn.functional.pad(t.abs(), (0, pc, 0, pr)) if (pr or pc) else t.abs()
    return padded.view((r + pr) // rows, rows, (c + pc) // cols, cols).amax(dim=(1, 3))


def _expand(s: torch.Tensor, rows: int, cols: int, shape: torch.Size) -> torch.Tensor:
    return s.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: shape[0], : shape[1]]


def quantize_dequantize(
    t: torch.Tensor, tile: tuple[int, int] | None, power_of_two: bool = False, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """E4M3 values times their scales, in fp32. tile None: one scale for the whole tensor; `amax` overrides
    the tensor's own amax (delayed scaling)."""
    x = t.float()
    if tile is None:
        a = x.abs().amax() if amax is None else amax.float()
        scale = torch.where(a > 0, a / E4M3_MAX, torch.ones_like(a))
        if power_of_two:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        return (x / scale).to(torch.float8_e4m3fn).float() * scale
    rows, cols = tile
    a = _tile_amax(x, rows, cols)
    scale = torch.where(a > 0, a / E4M3_MAX, torch.ones_like(a))
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    full = _expand(scale, rows, cols, x.shape)
    return (x / full).to(torch.float8_e4m3fn).float() * full


@dataclass(frozen=True)
class OperandScaling:
    tile: tuple[int, int] | None
    power_of_two: bool = False


def recipe_scaling(recipe: str, role: str) -> OperandScaling:
    """Scaling of one operand role: 'act' (x, or dY in dgrad: contraction dim last), 'weight' (W),
    'act_t' (an operand of the weight-gradient GEMM, contraction along its rows = tokens)."""
    if recipe == "blockwise":
        return OperandScaling({"act": (1, 128), "weight": (128, 128), "act_t": (128, 1)}[role])
    if recipe == "mxfp8":
        # MX blocks run along the contraction dimension; for W in y = x W^T that is W's last dim
        return OperandScaling({"act": (1, 32), "weight": (1, 32), "act_t": (32, 1)}[role], power_of_two=True)
    if recipe in ("current", "delayed"):
        return OperandScaling(None)
    raise ValueError(f"precision.fp8.recipe: unknown recipe {recipe!r}; choose one of {RECIPES}")


class AmaxHistory:
    """Delayed scaling state of one operand: the scale comes from past amaxes, not the current one."""

    def __init__(self, length: int = 16) -> None:
        self.values: deque[torch.Tensor] = deque(maxlen=length)

    def scale_amax(self, t: torch.Tensor) -> torch.Tensor:
        current = t.detach().abs().amax().float()
        amax = torch.stack(list(self.values)).amax() if self.values else current
        self.values.append(current)
        return amax


def fp8_error(t: torch.Tensor, recipe: str, role: str = "act") -> float:
    """Relative Frobenius error of quantize-dequantize under a recipe (a diagnostic for tests and docs)."""
    s = recipe_scaling(recipe, role)
    q = quantize_dequantize(t, s.tile, s.power_of_two)
    return float((q - t.float()).norm() / t.float().norm().clamp(min=1e-30))


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
from dataclasses import dataclass

import torch

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
RECIPES = ("blockwise", "current", "delayed", "mxfp8")


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
    if values.shape != tiled.shape[:-4] + (tiled.shape[-4] * tiled.shape[-3], tiled.shape[-2] * tiled.shape[-1]):
        values = values.clone()  # edge tiles were padded: a copy without the padding (values may be kept)
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


def quantize_groups(
    x: torch.Tensor, offsets: torch.Tensor, tile: tuple[int, int] | None, power_of_two: bool = False,
    amaxes: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's rows of x [N, C] (groups end at `offsets`, cumulative) quantized on their own, tiles aligned
    to the group's first row: (E4M3 values [N, C], the groups' scales concatenated: per-tile scales stacked
    along rows, or one per group for tile None). `amaxes[e]` overrides group e's amax (delayed scaling)."""
    values, scales, start = torch.empty_like(x, dtype=torch.float8_e4m3fn), [], 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            q = quantize(x[start:end], tile, power_of_two, None if amaxes is None else amaxes[e])
            values[start:end] = q.values
            scales.append(q.scale.reshape(1) if tile is None else q.scale)
        start = end
    if not scales:
        return values, x.new_empty(0, dtype=torch.float32)
    return values, torch.cat(scales)


def dequantize_groups(
    values: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, tile: tuple[int, int] | None
) -> torch.Tensor:
    """Inverse of `quantize_groups`: fp32 [N, C], each group's values times its own scales (group by group,
    the same arithmetic as quantize_dequantize of that group alone). All groups empty: fp32 zeros [0, C]."""
    out, start, at = [], 0, 0
    for end in offsets.tolist():
        if end > start:
            n = 1 if tile is None else -(-(end - start) // tile[0])
            scale = scales[at] if tile is None else scales[at:at + n]
            out.append(Quantized(values[start:end], scale, tile).dequantize())
            at += n
        start = end
    return torch.cat(out) if out else values.float()


class FP8Storage:
    """Keeps an activation for the backward in E4M3 with 1 x 128 tiles along its last dimension (the report's
    fine-grained quantization; its SwiGLU inputs are stored this way): `pack` -> tensors to save,
    `unpack` -> the values the backward computes with, in the activation's dtype. Lossy, unlike the linear
    layers' cached GEMM operands."""

    tile = (1, 128)

    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = quantize(t.reshape(-1, t.shape[-1]), self.tile)
        return q.values.view(t.shape), q.scale

    def unpack(self, values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = values.reshape(-1, values.shape[-1])
        return Quantized(flat, scale, self.tile).dequantize().to(dtype).view(values.shape)


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

"""The emulated FP8 backend: GEMM operands quantized as a recipe would (model/fp8/numerics.py),
the GEMM computed in fp32 on the exactly-representable values (or through torch._scaled_mm on FP8 GPUs)."""


from __future__ import annotations

import torch
from torch import nn

from model.fp8.numerics import (
    AmaxHistory,
    FP8Storage,
    Quantized,
    dequantize_groups,
    quantize,
    quantize_dequantize,
    quantize_groups,
    recipe_scaling,
)
from model.gemm import GemmBackend, grouped_mm, grouped_weight_grad


# ---- the emulated backend ----------------------------------------------------------------------------
def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward seen now is an activation-checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1


def _scaled_mm_usable(device: torch.device) -> bool:
    """torch._scaled_mm is fast only on FP8 tensor cores (SM89+); on CPU it is a reference kernel
    (~30 MFLOP/s here), so the dequantized fp32 GEMM is the default there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _GroupedOperand:
    """A grouped weight-gradient GEMM's X as kept: E4M3 values and per-group scales, dequantized (to fp32) only
    when the GEMM runs, so a deferred W holds 1 byte a value until then."""

    __slots__ = ("values", "scales", "offsets", "tile")

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 tile: tuple[int, int] | None) -> None:
        self.values, self.scales, self.offsets, self.tile = values, scales, offsets, tile

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.values, self.scales, self.offsets, self.tile)


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

    What the forward keeps for the weight-gradient GEMM is that GEMM's E4M3 operand, quantized in the forward
    (X with its token tiles): the values it reads are the ones it would have quantized in backward, so
    this costs no accuracy. Under `delayed` its scale is the history's max as the forward leaves it, as
    Transformer Engine's cached FP8 input has (before, the backward's history was read).
    `fp8_swiglu_inputs`: SwiGLU inputs stored in E4M3 for the backward (the report's; lossy).
    """

    def __init__(self, recipe: str, history: int = 16, scaled_mm: bool | None = None,
                 fp8_swiglu_inputs: bool = True) -> None:
        recipe_scaling(recipe, "act")  # validates the name
        self.recipe, self.history, self.scaled_mm = recipe, history, scaled_mm
        self.fp8_swiglu_inputs = fp8_swiglu_inputs
        self.activation_storage = FP8Storage() if fp8_swiglu_inputs else None
        self.name = f"fp8-emulated-{recipe}"
        self.histories: dict[tuple, AmaxHistory] = {}

    def for_layer(self, name: str, layer: nn.Module) -> EmulatedFP8Backend:
        """A fresh instance (own amax histories) for one layer."""
        return EmulatedFP8Backend(self.recipe, self.history, self.scaled_mm, self.fp8_swiglu_inputs)

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

    def _gemm(self, a: tuple, b: tuple | Quantized) -> torch.Tensor:
        """A @ B^T in fp32 for operands given as (tensor, role, key, record), both contraction-last; B may
        come already quantized (the forward's cached operand)."""
        per_tensor = recipe_scaling(self.recipe, "act").tile is None
        use = self.scaled_mm if self.scaled_mm is not None else _scaled_mm_usable(a[0].device)
        if use and per_tensor:
            qa, qb = self._q(*a), b if isinstance(b, Quantized) else self._q(*b)
            return torch._scaled_mm(qa.values.contiguous(), qb.values.contiguous().t(), scale_a=qa.scale,
                                    scale_b=qb.scale, out_dtype=torch.float32)
        return self._dq(*a) @ (b.dequantize() if isinstance(b, Quantized) else self._dq(*b)).t()

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

    def wgrad(self, g: torch.Tensor, x: torch.Tensor | Quantized) -> torch.Tensor:
        # token tiles of the original [T, .] operands, then the contraction-last transposes
        s = recipe_scaling(self.recipe, "act_t")
        if s.tile is None:
            xt = x.t() if isinstance(x, Quantized) else (x.t(), "act_t", ("x",), False)
            return self._gemm((g.t(), "act_t", ("g",), False), xt).to(g.dtype)
        xd = x.dequantize() if isinstance(x, Quantized) else self._dq(x, "act_t", ("x",), False)
        return (self._dq(g, "act_t", ("g",), False).t() @ xd).to(g.dtype)

    # ---- the weight-gradient GEMM's X, quantized in the forward and kept in E4M3 -----------------------
    def pack_input(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        s = recipe_scaling(self.recipe, "act_t")
        q = quantize(x, s.tile, s.power_of_two, self._amax(x, ("x",), record=False))
        return (q.values, q.scale), q.tile

    def unpack_input(self, saved: tuple[torch.Tensor, ...], meta: object) -> Quantized:
        values, scale = saved
        return Quantized(values, scale, meta)

    def pack_grouped_input(self, x: torch.Tensor, offsets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        s = recipe_scaling(self.recipe, "act_t")
        amaxes = None
        if self.recipe == "delayed":  # each expert's history as wgrad's _qrows reads it (its own rows' amax if empty)
            ends = offsets.tolist()
            amaxes = [self._amax(x[s:e], ("x", i), record=False) if e > s else None
                      for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends))]
        values, scales = quantize_groups(x, offsets, s.tile, s.power_of_two, amaxes)
        return (values, scales), s.tile

    def unpack_grouped_input(self, saved: tuple[torch.Tensor, ...], meta: object,
                             offsets: torch.Tensor) -> _GroupedOperand:
        values, scales = saved
        return _GroupedOperand(values, scales, offsets, meta)

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

    def grouped_wgrad(self, g: torch.Tensor, x: torch.Tensor | _GroupedOperand, offsets: torch.Tensor,
                      n: int) -> torch.Tensor:
        gq = self._qrows(g, "act_t", "g", offsets, record=False)
        xq = x.dequantize() if isinstance(x, _GroupedOperand) else self._qrows(x, "act_t", "x", offsets, record=False)
        return grouped_weight_grad(gq, xq, offsets, n).to(g.dtype)

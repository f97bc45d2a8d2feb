"""Real FP8 GEMMs on torch alone: the three GEMMs of every FP8 layer as FP8 tensor-core GEMMs through
`torch._scaled_mm` / `torch.nn.functional.scaled_mm`, no Transformer Engine needed (`precision.fp8.backend=torch`).

Every operand of fprop (y = x W^T), dgrad (dX = dY W) and wgrad (dW = dY^T X) is E4M3, quantized with the
emulation's arithmetic (model/fp8/numerics.py: scale = amax / 448 of the tile, values rounded to float8_e4m3fn), so
the values the GEMM sees are bit-for-bit the emulation's; only the accumulation differs (the GEMM kernel's).
Scaling, per `recipe`:
- `current`: one scale per tensor (per expert for routed experts) from its current amax; tensor-wise
  `torch._scaled_mm` (SM89+).
- `blockwise` (DeepSeek-V3): activations and output-gradients 1 x 128 along the contraction, weights
  128 x 128 blocks (dgrad uses the forward's blocks, transposed), the weight-gradient GEMM 1 x 128 along
  tokens on both operands; torch's blockwise-scaled GEMM (`ScalingType.BlockWise1x128` / `BlockWise128x128`,
  cuBLAS: SM90 and a CUDA >= 12.9 torch). Where that kernel does not run (CPU, Ada, Blackwell, an older
  torch) it falls back to **row-wise** scaling: one scale per row of the left operand and per column of the
  right one, each over the whole contraction dimension (per token / per output channel in fprop). That is
  coarser than 1 x 128 tiles (an outlier spoils its whole row), and `describe()` says which one runs.
`torch._scaled_mm` wants the second operand column-major and dimensions that are multiples of 16 (blockwise:
128): operands are padded with zeros (which change no amax and no product) and the output cut back.
Routed experts loop over experts with one scaled GEMM each (empty experts skipped).

The fp8 weight quantized by fprop is kept for the same layer's dgrad (identity, version and storage of the
weight must match; fprop always quantizes afresh, so an optimizer writing through `param.data` cannot leave
a stale copy behind), and the output-gradient quantized by dgrad for wgrad under `current`. Weight-gradient
deferral (the zero-bubble W pass) and activation-checkpoint recompute work through `model.gemm` as for every
backend; the backend keeps no numerical state (same inputs, same outputs). What the forward keeps for the
weight-gradient GEMM is that GEMM's E4M3 X^T (quantized along the tokens, 1 byte a value) instead of the
bf16 input, and SwiGLU inputs are kept in E4M3 1 x 128 tiles (`fp8_swiglu_inputs`): the report's FP8
activation caching.

`compile=True` runs the quantizers through `torch.compile` (one fused pass instead of about five elementwise
kernels: on a GPU the unfused quantization costs about as much as the FP8 GEMM saves); if compiling fails
the eager quantizers are used and `COMPILE_ERROR` says why. On CPU the compile is keyed on the vector ISA
(`model.compiled.inductor_options`: inductor's FX graph cache would otherwise serve one ISA's kernels to another).

On CPU `torch._scaled_mm` runs (torch >= 2.13: tensor-wise and row-wise, a reference kernel); the trainer
still asks for a GPU (validation), the tests use it to check the numerics.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.compiled import inductor_options
from model.fp8.numerics import E4M3_MAX, FP8Storage, Quantized
from model.gemm import GemmBackend

NATIVE_RECIPES = ("blockwise", "current")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper, Blackwell
FIX = "use precision.fp8.backend=emulated"
BLOCK = 128
FP8 = torch.float8_e4m3fn
FUSED_FIX = ("install the kernels extra (pip install -e '.[kernels]') on a CUDA machine, "
             "or set precision.fp8.quantizer=eager")
BLOCKWISE_ENV = "FP8_TORCH_BLOCKWISE"  # "0": never use torch's blockwise kernel (the row-wise fallback runs)

# operand kinds: (tile rows, tile cols) of the operand as it enters the GEMM, contraction last; 0 = whole dim
TILES = {"tensor": (0, 0), "row": (1, 0), "1x128": (1, BLOCK), "128x128": (BLOCK, BLOCK)}
# the same scales taken along the tokens of a [T, C] operand whose transpose enters the GEMM (wgrad)
TILES_T = {"tensor": (0, 0), "row": (0, 1), "1x128": (BLOCK, 1)}
# mode -> (activation kind, weight kind, padding multiple of every GEMM dimension)
MODES = {"tensor": ("tensor", "tensor", 16), "rowwise": ("row", "row", 16), "blockwise": ("1x128", "128x128", BLOCK)}


class NativeFP8Unavailable(RuntimeError):
    """The torch FP8 backend cannot run here: one line, `<problem>; <fix>`."""

    def __init__(self, problem: str, fix: str = FIX, key: str = "precision.fp8.backend") -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix, self.key = problem, fix, key


def check_native(recipe: str, device: str = "cuda") -> None:
    """Fail with one line unless the torch backend can run `recipe` on `device` ('cuda' or 'cpu')."""
    if recipe not in NATIVE_RECIPES:
        raise NativeFP8Unavailable(
            f"recipe {recipe} is not implemented by the torch backend",
            f"use precision.fp8.recipe=blockwise or current, or {FIX}",
            "precision.fp8.recipe",
        )
    if not hasattr(torch, "_scaled_mm"):
        raise NativeFP8Unavailable(
            f"torch {torch.__version__} has no torch._scaled_mm", f"install torch >= 2.5, or {FIX}"
        )
    if device != "cuda" or not torch.cuda.is_available():
        raise NativeFP8Unavailable(
            "the torch FP8 backend needs a CUDA GPU with FP8 tensor cores (SM89+) and none is visible"
        )
    _check_capability(torch.device("cuda", torch.cuda.current_device()))


def check_fused(recipe: str, device: str = "cuda") -> None:
    """Fail with one line unless the Triton quantizer can run `recipe` on `device` (after check_native). No
    GEMM runs here (validation happens before each rank picks its GPU): the blockwise kernel's probe is left
    to the first GEMM, which fails in one line the same way."""
    from model.fp8 import triton_quant

    ScaledMMFP8Backend(recipe, fused=True)  # the recipe rule
    why = triton_quant.problem(device)
    if why is not None:
        raise NativeFP8Unavailable(why, FUSED_FIX, "precision.fp8.quantizer")
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        major, minor = torch.cuda.get_device_capability()
        raise NativeFP8Unavailable(f"the Triton quantizer feeds the blockwise FP8 GEMM, which needs SM90; "
                                   f"{torch.cuda.get_device_name()} is SM{major}{minor}",
                                   "set precision.fp8.quantizer=eager (row-wise scaling)", "precision.fp8.quantizer")


def _check_capability(device: torch.device) -> None:
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise NativeFP8Unavailable(
            f"the torch FP8 backend needs FP8 tensor cores (SM89+: Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(device)} is SM{cap[0]}{cap[1]}"
        )


@functools.cache
def _device_ok(device: str) -> None:
    """Raise NativeFP8Unavailable unless torch._scaled_mm runs on `device` (checked once per device)."""
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        raise NativeFP8Unavailable(
            f"torch {torch.__version__} has no torch._scaled_mm", f"install torch >= 2.5, or {FIX}"
        )
    if dev.type == "cuda":
        _check_capability(dev)
        return
    try:
        one = torch.ones((), device=dev)
        a = torch.zeros(16, 16, device=dev).to(FP8)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problem = f"torch {torch.__version__} cannot run torch._scaled_mm on {dev.type} ({msg[:120]})"
        raise NativeFP8Unavailable(problem) from None


# ---- quantization --------------------------------------------------------------------------------------
def quantize_tiles(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., R, C] (R a multiple of `rows`, C of `cols`; 0 = the whole dimension) -> (E4M3 values [..., R, C],
    fp32 dequantization scales [..., R/rows, C/cols]). The emulation's arithmetic (model.fp8.quantize), in
    fewer passes: the amax is taken on x's own dtype (max and negation are exact), x / scale in fp32."""
    r, c = x.shape[-2:]
    rows, cols = rows or r, cols or c
    t = x.reshape(*x.shape[:-2], r // rows, rows, c // cols, cols)
    hi = t.amax(dim=(-3, -1), keepdim=True)
    lo = t.amin(dim=(-3, -1), keepdim=True)
    amax = torch.maximum(hi, -lo).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    values = (t / scale).to(FP8).reshape(x.shape)  # bf16 / fp32 (same ndim) divides in fp32, no fp32 copy of x
    return values, scale[..., :, 0, :, 0]


COMPILE_ERROR: str | None = None  # why torch.compile of the quantizers failed (None: not tried or fine)
_compiled: dict[tuple[int, int, str], object] = {}


def _quantize(x: torch.Tensor, rows: int, cols: int, compile: bool) -> tuple[torch.Tensor, torch.Tensor]:
    global COMPILE_ERROR
    if compile and COMPILE_ERROR is None:
        try:
            key = (rows, cols, x.device.type)
            fn = _compiled.get(key)
            if fn is None:

                def tiles(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    return quantize_tiles(t, rows, cols)

                fn = _compiled[key] = torch.compile(tiles, dynamic=True, options=inductor_options(x.device))
            return fn(x)
        except Exception as e:  # no triton / no C compiler / an inductor bug: the eager quantizers still work
            COMPILE_ERROR = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return quantize_tiles(x, rows, cols)


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims up to multiples of rows / cols."""
    pr, pc = -t.shape[-2] % rows, -t.shape[-1] % cols
    return F.pad(t, (0, pc, 0, pr)) if pr or pc else t


@dataclass
class Operand:
    """A GEMM operand, contraction dimension last, padded: E4M3 `values` [R', K'] (contiguous; [E, R', K'] for
    stacked expert weights) and `scale` per `kind`: 'tensor' [1, 1], 'row' [R', 1], '1x128' [R', K'/128],
    '128x128' [R'/128, K'/128]. `rows` x `cols` is the size before padding."""

    values: torch.Tensor
    scale: torch.Tensor
    kind: str
    rows: int
    cols: int

    def expert(self, e: int) -> Operand:
        return Operand(self.values[e], self.scale[e], self.kind, self.rows, self.cols)

    def transposed(self) -> Operand:
        """The transpose (W -> W^T): tensor scales stay, 128 x 128 blocks serve transposed as they are."""
        assert self.kind in ("tensor", "128x128"), self.kind
        return Operand(self.values.t().contiguous(), self.scale.t(), self.kind, self.cols, self.rows)

    def dequantize(self) -> torch.Tensor:
        """fp32 values times scales, padding cut off (for tests and the kernel probe)."""
        r, c = self.values.shape[-2:]
        tile = TILES[self.kind]
        q = Quantized(self.values, self.scale, (tile[0] or r, tile[1] or c))
        return q.dequantize()[..., : self.rows, : self.cols]


def make_operand(t: torch.Tensor, kind: str, align: int, compile: bool = False) -> Operand:
    """`t` [..., R, K] (contraction last) quantized as `kind`, padded to multiples of `align`."""
    values, scale = _quantize(_pad(t, align, align), *TILES[kind], compile)
    # a transposed input (W^T in dgrad) can come back in its own strides: the kernel wants row-major
    return Operand(values.contiguous(), scale, kind, t.shape[-2], t.shape[-1])


def make_operand_t(t: torch.Tensor, kind: str, align: int, compile: bool = False) -> Operand:
    """The operand t^T [C, T] of a GEMM contracting over t's rows (tokens), scaled along the tokens: 1 x 128
    tiles of t^T are 128 x 1 tiles of t (aligned to t's first row), row scales of t^T are column scales of t.
    Quantized in t's layout, then the E4M3 values are transposed (1 byte per value)."""
    values, scale = _quantize(_pad(t, align, align), *TILES_T[kind], compile)
    return Operand(values.t().contiguous(), scale.t(), kind, t.shape[1], t.shape[0])


# ---- the scaled GEMMs ----------------------------------------------------------------------------------
def _blockwise_call(
    api: str, a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, b_kind: str, out_dtype: torch.dtype
) -> torch.Tensor:
    if api == "v2":
        st = F.ScalingType
        recipe_b = st.BlockWise128x128 if b_kind == "128x128" else st.BlockWise1x128
        return F.scaled_mm(a, b, sa, st.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def scaled_mm(a: Operand, b: Operand, out_dtype: torch.dtype, blockwise_api: str | None = None) -> torch.Tensor:
    """A @ B^T [a.rows, b.rows] for contraction-last operands of matching padded K, one FP8 GEMM."""
    mat_b = b.values.t()  # column-major [K', N'], as torch._scaled_mm wants its second operand
    cuda = a.values.device.type == "cuda"
    if a.kind == "tensor" and cuda:
        # cuBLASLt's tensor-wise FP8 path refused some shapes on an H200 (torch 2.11, CUDA 13:
        # CUBLAS_STATUS_NOT_SUPPORTED for 80 x 512 x 512 and 2096 x 4096 x 2816); the row-wise kernel with the one
        # scale broadcast over the rows / columns is the same product
        dtype = torch.bfloat16 if out_dtype == torch.float32 else out_dtype
        out = torch._scaled_mm(
            a.values,
            mat_b,
            scale_a=a.scale.reshape(1, 1).expand(a.values.shape[0], 1).contiguous(),
            scale_b=b.scale.reshape(1, 1).expand(1, mat_b.shape[1]).contiguous(),
            out_dtype=dtype,
        ).to(out_dtype)
    elif a.kind == "tensor":
        out = torch._scaled_mm(
            a.values, mat_b, scale_a=a.scale.reshape(()), scale_b=b.scale.reshape(()), out_dtype=out_dtype
        )
    elif a.kind == "row":
        # CUDA's row-wise kernels write bf16 (fp32 only through cuBLAS on SM90)
        dtype = torch.bfloat16 if cuda and out_dtype == torch.float32 else out_dtype
        out = torch._scaled_mm(
            a.values,
            mat_b,
            scale_a=a.scale.flatten().contiguous().view(-1, 1),
            scale_b=b.scale.flatten().contiguous().view(1, -1),
            out_dtype=dtype,
        ).to(out_dtype)
    else:
        if blockwise_api is None:
            raise NativeFP8Unavailable("no blockwise-scaled FP8 GEMM on this device", "use recipe=current")
        sa = a.scale.t().contiguous().t()  # [M', K'/128], outer-dimension-major
        if b.kind == "128x128":  # cuBLAS: [ceil(K/128) padded to 4, N'/128], K-major
            sb = _pad(b.scale, 1, 4).contiguous().t()
        else:
            sb = b.scale.t().contiguous().t()
        out = _blockwise_call(blockwise_api, a.values, mat_b, sa, sb, b.kind, out_dtype)
    if out.shape != (a.rows, b.rows):
        out = out[: a.rows, : b.rows].contiguous()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


@functools.cache
def blockwise_support(device: str) -> tuple[str | None, str]:
    """(the API that runs blockwise-scaled FP8 GEMMs on `device`: 'v2' = torch.nn.functional.scaled_mm,
    'v1' = torch._scaled_mm with blockwise scale shapes, None = neither; how that was found). Probed once
    per device with a small GEMM checked against the dequantized product (1x128 x 128x128 and 1x128 x 1x128)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None, f"blockwise-scaled FP8 GEMMs run on CUDA only (SM90, CUDA >= 12.9), not on {dev.type}"
    if os.environ.get(BLOCKWISE_ENV, "1") == "0":
        return None, f"disabled by {BLOCKWISE_ENV}=0"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(256, 384, device=dev, generator=g)
    w = torch.randn(256, 384, device=dev, generator=g) * 0.02
    xa, wb, wa = make_operand(x, "1x128", BLOCK), make_operand(w, "128x128", BLOCK), make_operand(w, "1x128", BLOCK)
    refs = [(wb, xa.dequantize() @ wb.dequantize().t()), (wa, xa.dequantize() @ wa.dequantize().t())]
    tried = []
    apis = (["v2"] if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") else []) + ["v1"]
    for api in apis:
        try:
            errs = [_rel(scaled_mm(xa, b, torch.bfloat16, api), ref) for b, ref in refs]
        except Exception as e:  # noqa: BLE001 - any failure means: not this API
            tried.append(f"{api}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}")
            continue
        if max(errs) < 1e-2:
            name = "torch.nn.functional.scaled_mm" if api == "v2" else "torch._scaled_mm"
            return api, f"{name} with BlockWise1x128 / BlockWise128x128 scales"
        tried.append(f"{api}: wrong result (relative error {max(errs):.3g})")
    return None, "; ".join(tried) or "no API"


_OPTIMIZER_STEPS = [0]  # bumped after every torch optimizer step: the fused backend's weight blocks go stale
# fused: each weight's blocks for the current step, by id(weight): (weakref to it, key, Operand); an entry goes
# with its weight (a WeakKeyDictionary would compare tensors with ==, which is elementwise)
_STEP_BLOCKS: dict[int, tuple] = {}
_HOOKED: list[bool] = []


def _count_optimizer_steps() -> None:
    if not _HOOKED:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: new_weights())
        _HOOKED.append(True)


def new_weights() -> None:
    """Tell the fused backends that weights changed (called after every torch optimizer step; call it yourself
    after writing weights through `param.data` outside an optimizer, which bumps no version counter)."""
    _OPTIMIZER_STEPS[0] += 1


def _fused_pair(t: torch.Tensor, kind: str, align: int) -> tuple[Operand, Operand]:
    """(t's 1 x 128 operand, t^T's operand with 128 x 1 token tiles) from one pass of the Triton kernel."""
    from model.fp8 import triton_quant

    v, s, v_t, s_t = triton_quant.activation_operands(t, align)
    rows, cols = t.shape
    return Operand(v, s, kind, rows, cols), Operand(v_t, s_t.t(), kind, cols, rows)


@dataclass
class _ExpertOperands:
    """A grouped layer's input as its weight-gradient GEMMs read it: one transposed E4M3 operand per non-empty
    expert; `width` = the input's columns (the gradient's shape when every expert is empty)."""

    width: int
    operands: dict[int, Operand]


# ---- the backend ----------------------------------------------------------------------------------------
class ScaledMMFP8Backend(GemmBackend):
    """A layer's three GEMMs as genuine FP8 GEMMs (torch._scaled_mm), operands E4M3 quantized as `recipe` says
    (see the module docstring for the scaling and the row-wise fallback of `blockwise`).

    blockwise: True requires torch's blockwise kernel (error where it does not run), False forces the row-wise
    scaling, None (default) uses the kernel where the probe finds it and row-wise elsewhere.
    compile: quantize through torch.compile (falls back to eager if that fails).
    fused: quantize with the Triton kernels of model/fp8/triton_quant.py (blockwise only): one pass per
    activation writes its forward operand and its weight-gradient operand (kept for wgrad), one pass per
    output-gradient its dgrad and wgrad operands, and weights are quantized once per optimizer step (every
    microbatch of the step reuses the blocks; see `new_weights`).
    """

    def __init__(self, recipe: str = "blockwise", blockwise: bool | None = None, compile: bool = False,
                 fp8_swiglu_inputs: bool = True, fused: bool = False) -> None:
        if recipe not in NATIVE_RECIPES:
            raise NativeFP8Unavailable(
                f"recipe {recipe} is not implemented by the torch backend",
                f"use recipe blockwise or current, or {FIX}",
                "precision.fp8.recipe",
            )
        if fused and recipe != "blockwise":
            raise NativeFP8Unavailable(f"the Triton quantizer implements the blockwise recipe, not {recipe}",
                                       "use precision.fp8.recipe=blockwise or precision.fp8.quantizer=eager",
                                       "precision.fp8.quantizer")
        if fused:
            _count_optimizer_steps()
        self.fused = fused
        self.recipe, self.blockwise, self.compile = recipe, blockwise, compile
        self.fp8_swiglu_inputs = fp8_swiglu_inputs
        self.activation_storage = FP8Storage() if fp8_swiglu_inputs else None
        self.name = f"fp8-torch-{recipe}" + ("-triton" if fused else "")
        self._w: tuple | None = None  # (weakref to weight, version, data_ptr, Operand): fprop writes, dgrad reads
        self._g: tuple | None = None  # (weakref to dY, version, Operand): dgrad writes, wgrad reads (current)
        # fused: (weakref to X or dY, version, its wgrad operand, or {expert: operand}) from fprop / dgrad
        self._t: tuple | None = None

    def for_layer(self, name: str, layer: nn.Module) -> ScaledMMFP8Backend:
        """A fresh instance for one layer (its own fprop -> dgrad weight cache)."""
        return ScaledMMFP8Backend(self.recipe, self.blockwise, self.compile, self.fp8_swiglu_inputs, self.fused)

    # ---- where and how ----------------------------------------------------------------------------------
    def mode(self, device: torch.device | str) -> tuple[str, str | None]:
        """('tensor' | 'blockwise' | 'rowwise', the blockwise API or None) on `device`; raises
        NativeFP8Unavailable where torch._scaled_mm cannot run (or blockwise=True and no blockwise kernel)."""
        dev = str(torch.device(device))
        _device_ok(dev)
        if self.fused:
            from model.fp8 import triton_quant

            why = triton_quant.problem(dev)
            if why is not None:
                raise NativeFP8Unavailable(why, FUSED_FIX, "precision.fp8.quantizer")
        if self.recipe == "current":
            return "tensor", None
        if self.blockwise is False:
            return "rowwise", None
        api, why = blockwise_support(dev)
        if api is None and self.fused:
            raise NativeFP8Unavailable(f"the Triton quantizer feeds the blockwise FP8 GEMM, which does not run on "
                                       f"{dev} ({why})", "set precision.fp8.quantizer=eager (row-wise scaling)",
                                       "precision.fp8.quantizer")
        if api is None:
            if self.blockwise:
                raise NativeFP8Unavailable(
                    f"no blockwise-scaled FP8 GEMM on {dev} ({why})",
                    "leave blockwise unset for the row-wise fallback, or use recipe=current",
                )
            return "rowwise", None
        return "blockwise", api

    def describe(self, device: torch.device | str | None = None) -> str:
        """One line: what runs on `device` (default: the current CUDA device, else CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            mode, api = self.mode(device)
        except NativeFP8Unavailable as e:
            return f"torch FP8 backend unavailable on {device}: {e}"
        quant = "compiled quantizers" if self.compile and COMPILE_ERROR is None else "eager quantizers"
        if self.fused:
            quant = "fused Triton quantizers (weights once per optimizer step)"
        if self.compile and COMPILE_ERROR is not None:
            quant += f" (torch.compile failed: {COMPILE_ERROR})"
        if mode == "tensor":
            return f"FP8 E4M3, per-tensor current scaling, torch._scaled_mm, {quant}"
        if mode == "blockwise":
            return (
                f"FP8 E4M3, DeepSeek blockwise scaling (1x128 activations, 128x128 weights), "
                f"{blockwise_support(str(torch.device(device)))[1]}, {quant}"
            )
        why = "forced" if self.blockwise is False else blockwise_support(str(torch.device(device)))[1]
        return (
            f"FP8 E4M3, ROW-WISE scaling instead of blockwise (per row of the left operand, per column of the "
            f"right, over the whole contraction; blockwise kernel unavailable: {why}), torch._scaled_mm, {quant}"
        )

    def _kinds(self, device: torch.device) -> tuple[str, str, int, str | None]:
        mode, api = self.mode(device)
        act, weight, align = MODES[mode]
        return act, weight, align, api

    # ---- caches: fprop -> dgrad (weight), dgrad -> wgrad (output-gradient, per-tensor scaling) -------------
    def _weight(self, w: torch.Tensor, kind: str, align: int) -> Operand:
        if self.fused and kind == "128x128":  # dgrad reads the step's blocks too (`_cached_weight`)
            return self._step_weight(w, kind, align)
        q = make_operand(w, kind, align, self.compile)
        self._w = (weakref.ref(w), w._version, w.data_ptr(), q)
        return q

    def _step_weight(self, w: torch.Tensor, kind: str, align: int) -> Operand:
        """The weight's 128 x 128 blocks, quantized once per optimizer step (and again if its storage or version
        changes): the step's microbatches, their dgrads and every copy of this backend read the same blocks."""
        key = (w.data_ptr(), w._version, _OPTIMIZER_STEPS[0], align)
        held = _STEP_BLOCKS.get(id(w))
        if held is not None and held[0]() is w and held[1] == key:
            return held[2]
        from model.fp8 import triton_quant

        values, scale = triton_quant.weight_operand(w.detach(), align)
        q = Operand(values, scale, kind, w.shape[-2], w.shape[-1])
        if held is None or held[0]() is not w:
            weakref.finalize(w, _STEP_BLOCKS.pop, id(w), None)
        _STEP_BLOCKS[id(w)] = (weakref.ref(w), key, q)
        return q

    # ---- fused activation quantization: the wgrad operand comes with the fprop / dgrad one -----------------
    def _act(self, t: torch.Tensor, kind: str, align: int) -> Operand:
        """t's operand for fprop / dgrad. Fused: one kernel also writes t's weight-gradient operand, kept until
        wgrad (or pack_input) asks for it."""
        if not (self.fused and kind == "1x128"):
            return make_operand(t, kind, align, self.compile)
        q, q_t = _fused_pair(t, kind, align)
        self._t = (weakref.ref(t), t._version, q_t)
        return q

    def _act_t(self, t: torch.Tensor, kind: str, align: int) -> Operand:
        """t's weight-gradient operand: the one fprop / dgrad just made, else quantized now."""
        if self._t is not None:
            ref, version, q = self._t
            if ref() is t and t._version == version and isinstance(q, Operand):
                self._t = None
                return q
        if self.fused and kind == "1x128":
            return _fused_pair(t, kind, align)[1]
        return make_operand_t(t, kind, align, self.compile)

    def _grouped_act(self, t: torch.Tensor, offsets: torch.Tensor, kind: str, align: int) -> dict[int, Operand]:
        """Each non-empty expert's fprop / dgrad operand; fused: their wgrad operands kept, as `_act` does."""
        ops, ops_t = {}, {}
        for e, s, end in self._ranges(offsets):
            if self.fused and kind == "1x128":
                ops[e], ops_t[e] = _fused_pair(t[s:end], kind, align)
            else:
                ops[e] = make_operand(t[s:end], kind, align, self.compile)
        self._t = (weakref.ref(t), t._version, ops_t) if ops_t else None
        return ops

    def _grouped_act_t(self, t: torch.Tensor, offsets: torch.Tensor, kind: str, align: int) -> dict[int, Operand]:
        if self._t is not None:
            ref, version, ops = self._t
            if ref() is t and t._version == version and isinstance(ops, dict):
                self._t = None
                return ops
        return {e: self._act_t(t[s:end], kind, align) for e, s, end in self._ranges(offsets)}

    def _cached_weight(self, w: torch.Tensor, kind: str, align: int) -> Operand:
        if self.fused and kind == "128x128":
            return self._step_weight(w, kind, align)
        if self._w is not None:
            ref, version, ptr, q = self._w
            self._w = None
            if ref() is w and w._version == version and w.data_ptr() == ptr and q.kind == kind:
                return q
        return make_operand(w, kind, align, self.compile)

    def _cached_grad(self, g: torch.Tensor) -> Operand | None:
        if self._g is not None:
            ref, version, q = self._g
            self._g = None
            if ref() is g and g._version == version:
                return q
        return None

    # ---- the GEMMs ------------------------------------------------------------------------------------
    def fprop(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        act, weight, align, api = self._kinds(x.device)
        wq = self._weight(w, weight, align)
        return scaled_mm(self._act(x, act, align), wq, x.dtype, api)

    def dgrad(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        act, weight, align, api = self._kinds(g.device)
        if weight == "row":  # W^T scaled per input channel (along W's rows): a quantization of its own
            wt = make_operand(w.t(), "row", align, self.compile)
        else:
            wt = self._cached_weight(w, weight, align).transposed()
        gq = self._act(g, act, align)
        if act == "tensor":
            self._g = (weakref.ref(g), g._version, gq)
        return scaled_mm(gq, wt, g.dtype, api)

    def wgrad(self, g: torch.Tensor, x: torch.Tensor | Operand) -> torch.Tensor:
        act, _, align, api = self._kinds(g.device)
        gq = self._cached_grad(g) if act == "tensor" else None
        a = gq.transposed() if gq is not None else self._act_t(g, act, align)
        xq = x if isinstance(x, Operand) else self._act_t(x, act, align)
        return scaled_mm(a, xq, g.dtype, api)

    # ---- the weight-gradient GEMM's X^T, quantized in the forward and kept in E4M3 ---------------------
    def pack_input(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        act, _, align, _ = self._kinds(x.device)
        q = self._act_t(x, act, align)
        return (q.values, q.scale), (q.kind, q.rows, q.cols)

    def unpack_input(self, saved: tuple[torch.Tensor, ...], meta: object) -> Operand:
        return Operand(*saved, *meta)

    def pack_grouped_input(self, x: torch.Tensor, offsets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        act, _, align, _ = self._kinds(x.device)
        tensors, experts = [], []
        for e, q in self._grouped_act_t(x, offsets, act, align).items():
            tensors += [q.values, q.scale]
            experts.append((e, q.kind, q.rows, q.cols))
        return tuple(tensors), (x.shape[1], experts)

    def unpack_grouped_input(self, saved: tuple[torch.Tensor, ...], meta: object,
                             offsets: torch.Tensor) -> _ExpertOperands:
        width, experts = meta
        ops = {e: Operand(saved[2 * i], saved[2 * i + 1], kind, rows, cols)
               for i, (e, kind, rows, cols) in enumerate(experts)}
        return _ExpertOperands(width, ops)

    @staticmethod
    def _ranges(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
        """(expert, first row, end row) of every non-empty expert."""
        out, start = [], 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                out.append((e, start, end))
            start = end
        return out

    def grouped_fprop(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        act, weight, align, api = self._kinds(x.device)
        wq = self._weight(w, weight, align)  # every expert at once: per-expert tensor scales, blocks, rows
        out = x.new_zeros(x.shape[0], w.shape[1])
        xq = self._grouped_act(x, offsets, act, align)
        for e, s, end in self._ranges(offsets):
            out[s:end] = scaled_mm(xq[e], wq.expert(e), x.dtype, api)
        return out

    def grouped_dgrad(self, g: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        act, weight, align, api = self._kinds(g.device)
        if weight == "row":
            wt_all = make_operand(w.transpose(1, 2), "row", align, self.compile)
        else:
            wq = self._cached_weight(w, weight, align)
        out = g.new_zeros(g.shape[0], w.shape[2])
        gq = self._grouped_act(g, offsets, act, align)
        for e, s, end in self._ranges(offsets):
            wt = wt_all.expert(e) if weight == "row" else wq.expert(e).transposed()
            out[s:end] = scaled_mm(gq[e], wt, g.dtype, api)
        return out

    def grouped_wgrad(self, g: torch.Tensor, x: torch.Tensor | _ExpertOperands, offsets: torch.Tensor,
                      n: int) -> torch.Tensor:
        """x: the input rows, or the per-expert operands `pack_grouped_input` kept."""
        act, _, align, api = self._kinds(g.device)
        out = g.new_zeros(n, g.shape[1], x.width if isinstance(x, _ExpertOperands) else x.shape[1])
        gq = self._grouped_act_t(g, offsets, act, align)
        xq_all = x.operands if isinstance(x, _ExpertOperands) else None
        for e, s, end in self._ranges(offsets):
            a = gq[e]
            xq = xq_all[e] if xq_all is not None else make_operand_t(x[s:end], act, align, self.compile)
            out[e] = scaled_mm(a, xq, g.dtype, api)
        return out

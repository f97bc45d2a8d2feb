"""Fused FP8 quantization in Triton for the blockwise recipe (DeepSeek-V3): one pass over an activation writes
both E4M3 operands its GEMMs need, and one pass over a weight writes its 128 x 128 blocks.

`activation_operands(x, align)` reads x [T, K] (bf16 or fp32) once and writes
- the forward GEMM's operand: E4M3 values [T', K'] with one scale per 1 x 128 tile along K, [T', K'/128];
- the weight-gradient GEMM's operand: x re-quantized with 128 x 1 tiles along the tokens (its own scales, not a
  transpose of the first tiles), written transposed, contraction last: values [K', T'], scales [T'/128, K'];
padded with zeros to multiples of `align` (scale 1 for all-zero tiles). The eager path needs two
quantizations (each an amax pass, a divide and a cast) and a transpose for the same result.
`weight_operand(w, align)` writes 128 x 128 blocks of w [N, K] or stacked [E, N, K].

Scaling and rounding are the emulation's (`model.fp8.numerics.quantize`): scale = amax / 448 in fp32 (1 where
the tile is all zeros), values = x / scale rounded to nearest even. The E4M3 bits are computed with integer
arithmetic (`_e4m3_bits`): Triton's interpreter (TRITON_INTERPRET=1, how CI runs these kernels on CPU) casts
fp32 to float8 without carrying a mantissa round-up into the exponent, and the same code must give the same bits
on both. Divisions are `div_rn` (correctly rounded) because a GPU's default fp32 division is approximate.

Runs on a CUDA GPU, or on CPU with TRITON_INTERPRET=1 set before this module is imported (the tests).
`problem(device)` says in one line why the kernels cannot run; the backend turns that into its error.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BLOCK = 128


def problem(device: torch.device | str) -> str | None:
    """None if the kernels run on `device`; else why not (one line, without the fix)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    dev = torch.device(device)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dev.type == "cpu" and not interpreting:
        return "Triton kernels run on a CUDA GPU, not on the CPU (TRITON_INTERPRET=1 interprets them, slowly)"
    if dev.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {dev.type}"
    return None


try:
    import triton
    import triton.language as tl
except ImportError:  # the functions below are only called after `problem` said None
    triton = tl = None

if triton is not None:

    @triton.jit
    def _scale(x, axis: tl.constexpr):
        """Dequantization scales of x's tiles along `axis`: amax / 448, and 1 for an all-zero tile or one holding
        a NaN (the eager path's amax is NaN there, which fails its `amax > 0`). The NaN test is a separate
        integer max: a float max's NaN handling differs between backends (and a NaN-propagating reduce runs
        ~50x slower in the interpreter)."""
        amax = tl.max(tl.abs(x), axis=axis)
        nan = tl.max((x != x).to(tl.int32), axis=axis)
        return tl.where((amax > 0) & (nan == 0), tl.math.div_rn(amax, 448.0), 1.0)

    @triton.jit
    def _e4m3_bits(v):
        """fp32 v -> float8_e4m3fn bits (uint8) as torch's cast: round to nearest even, |v| >= 448 saturates to
        448 (E4M3FN has no infinity), NaN stays NaN; in integers."""
        bits = v.to(tl.uint32, bitcast=True)
        sign = (bits >> 31) << 7
        mag = bits & 0x7FFFFFFF
        # normals (|v| >= 2^-6): drop 20 of fp32's 23 mantissa bits, nearest even; a carry bumps the exponent
        rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
        normal = (rounded >> 20) - ((127 - 7) << 3)
        # subnormals: multiples of 2^-9; adding 2^23 in fp32 rounds |v| * 2^9 to the nearest even integer
        scaled = mag.to(tl.float32, bitcast=True) * 512.0
        sub = ((scaled + 8388608.0) - 8388608.0).to(tl.uint32)
        code = tl.where(mag >= 0x3C800000, normal, sub)  # 0x3C800000 = 2^-6, E4M3's smallest normal
        code = tl.where(mag >= 0x43E00000, 0x7E, code)  # 448 and beyond (infinity included): 448
        code = tl.where(mag > 0x7F800000, 0x7F, code)  # NaN
        return (code | sign).to(tl.uint8)

    @triton.jit
    def _activation_kernel(x_ptr, row_v_ptr, row_s_ptr, col_v_ptr, col_s_ptr, rows, cols, stride_x,
                           padded_rows, padded_cols, BLOCK: tl.constexpr):
        pid_t = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors past 2^31 elements
        pid_k = tl.program_id(1).to(tl.int64)
        t = pid_t * BLOCK + tl.arange(0, BLOCK)
        k = pid_k * BLOCK + tl.arange(0, BLOCK)
        inside = (t[:, None] < rows) & (k[None, :] < cols)
        x = tl.load(x_ptr + t[:, None] * stride_x + k[None, :], mask=inside, other=0.0).to(tl.float32)
        out = (t[:, None] < padded_rows) & (k[None, :] < padded_cols)
        # 1 x 128 along K: a scale per token of this block
        s_r = _scale(x, 1)
        v_r = _e4m3_bits(tl.math.div_rn(x, s_r[:, None]))
        tl.store(row_v_ptr + t[:, None] * padded_cols + k[None, :], v_r, mask=out)
        tl.store(row_s_ptr + t * tl.cdiv(padded_cols, BLOCK) + pid_k, s_r, mask=t < padded_rows)
        # 128 x 1 along the tokens: a scale per column of this block; values stored transposed [K', T']
        s_c = _scale(x, 0)
        v_c = _e4m3_bits(tl.math.div_rn(x, s_c[None, :]))
        tl.store(col_v_ptr + k[None, :] * padded_rows + t[:, None], v_c, mask=out)
        tl.store(col_s_ptr + pid_t * padded_cols + k, s_c, mask=k < padded_cols)

    @triton.jit
    def _weight_kernel(w_ptr, v_ptr, s_ptr, rows, cols, stride_e, stride_r, padded_rows, padded_cols,
                       BLOCK: tl.constexpr):
        e = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1).to(tl.int64)
        pid_c = tl.program_id(2).to(tl.int64)
        r = pid_r * BLOCK + tl.arange(0, BLOCK)
        c = pid_c * BLOCK + tl.arange(0, BLOCK)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        w = tl.load(w_ptr + e * stride_e + r[:, None] * stride_r + c[None, :], mask=inside, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
        nan = tl.max(tl.max((w != w).to(tl.int32), axis=1), axis=0)
        s = tl.where((amax > 0) & (nan == 0), tl.math.div_rn(amax, 448.0), 1.0)
        v = _e4m3_bits(tl.math.div_rn(w, s))
        out = (r[:, None] < padded_rows) & (c[None, :] < padded_cols)
        tl.store(v_ptr + e * padded_rows * padded_cols + r[:, None] * padded_cols + c[None, :], v, mask=out)
        n_c = tl.cdiv(padded_cols, BLOCK)
        tl.store(s_ptr + (e * tl.cdiv(padded_rows, BLOCK) + pid_r) * n_c + pid_c, s)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def activation_operands(x: torch.Tensor, align: int = BLOCK) -> tuple[torch.Tensor, ...]:
    """x [T, K] -> (values [T', K'], scales [T', K'/128], values_t [K', T'], scales_t [T'/128, K']); E4M3 values,
    fp32 scales, T' and K' = T and K rounded up to `align` (a multiple of 128)."""
    assert x.dim() == 2 and align % BLOCK == 0, (x.shape, align)
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    pr, pc = _round_up(max(rows, 1), align), _round_up(max(cols, 1), align)
    row_v = torch.empty(pr, pc, dtype=torch.uint8, device=x.device)
    row_s = torch.empty(pr, pc // BLOCK, dtype=torch.float32, device=x.device)
    col_v = torch.empty(pc, pr, dtype=torch.uint8, device=x.device)
    col_s = torch.empty(pr // BLOCK, pc, dtype=torch.float32, device=x.device)
    grid = (pr // BLOCK, pc // BLOCK)
    _activation_kernel[grid](x, row_v, row_s, col_v, col_s, rows, cols, x.stride(0), pr, pc, BLOCK=BLOCK)
    fp8 = torch.float8_e4m3fn
    return row_v.view(fp8), row_s, col_v.view(fp8), col_s


def weight_operand(w: torch.Tensor, align: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] or [E, N, K] -> (E4M3 values [..., N', K'], fp32 scales [..., N'/128, K'/128]), 128 x 128 blocks."""
    stacked = w.dim() == 3
    w3 = w if stacked else w.unsqueeze(0)
    if w3.stride(2) != 1:
        w3 = w3.contiguous()
    e, rows, cols = w3.shape
    pr, pc = _round_up(max(rows, 1), align), _round_up(max(cols, 1), align)
    values = torch.empty(e, pr, pc, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e, pr // BLOCK, pc // BLOCK, dtype=torch.float32, device=w.device)
    _weight_kernel[(e, pr // BLOCK, pc // BLOCK)](w3, values, scales, rows, cols, w3.stride(0), w3.stride(1),
                                                  pr, pc, BLOCK=BLOCK)
    values = values.view(torch.float8_e4m3fn)
    return (values, scales) if stacked else (values[0], scales[0])

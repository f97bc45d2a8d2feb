"""Regional `torch.compile` (`model.compile_regions`): the elementwise chains between the GEMMs, compiled one by one.

In a bf16 step the GEMMs are fast and the chains of elementwise passes around them decide the time: RMSNorm
(an fp32 copy, a square, a mean, an rsqrt, two products and a cast, each a pass over the activation, and more
in backward), RoPE's split-rotate-concatenate, the fp32 cast and log-softmax of the vocabulary-wide
cross-entropy. Inductor fuses each chain, forward and backward, into a loop or two. Only those functions are
compiled: the expert GEMMs (`torch._grouped_mm`, whose meta kernel takes only bf16 in torch 2.13, so fp32 models
do not trace through it), the custom autograd functions, the collectives and the pipeline's split backward stay
eager, so every schedule and backend runs the code it runs without this option.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_compiled: dict[tuple[Callable, str], Callable] = {}


def inductor_options(device: torch.device) -> dict:
    """Inductor options for compiling on `device`. On CPU: `cpp.simdlen` = the width of the vector ISA inductor
    picks here. Inductor's FX graph cache key (torch 2.13) omits that ISA, so a cached graph written under
    AVX-512 (e.g. natively, or on another machine sharing TORCHINDUCTOR_CACHE_DIR) was rebuilt under AVX2 with
    half of every vector unprocessed (wrong E4M3 bytes and scales, rows ending in zeros) and under
    ATEN_CPU_CAPABILITY=default failed to compile; the config is part of the key, so the width keys each entry
    to its ISA (repro: scripts/repro_inductor_isa_cache.py, avx512 -> avx2 in one cache dir)."""
    if device.type != "cpu":
        return {}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"cpp.simdlen": pick_vec_isa().bit_width()}  # the same ISA pick_vec_isa() returns (0: scalar code)


def compiled(fn: Callable, device: torch.device) -> Callable:
    """`fn` through torch.compile for tensors on `device`, built once per (function, device type). Shapes are
    specialised on the first call and made dynamic on the first recompile (torch.compile's default), so other
    sequence lengths and widths cost one more compile, not one per shape."""
    key = (fn, device.type)
    f = _compiled.get(key)
    if f is None:
        f = _compiled[key] = torch.compile(fn, options=inductor_options(device))
    return f


def compile_problem(device: str) -> str | None:
    """Why regional compilation cannot run on `device` ("cpu" | "cuda"), or None: inductor writes C++ on CPU and
    Triton on CUDA, and finds out only at the first step, in a long traceback."""
    if device == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton on CUDA and it is not importable"
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()  # $CXX, then g++ (inductor's search)
    except Exception as e:  # its own error type, raised when the search finds nothing
        return f"torch.compile needs a C++ compiler on CPU and found none ({type(e).__name__})"
    return None

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

import os
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

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


def regional(fn: Callable, enabled: bool, device: torch.device) -> Callable:
    """`fn` through torch.compile when `enabled` and autograd is recording, else `fn` itself. Training only:
    evaluation and generation (one token at a time, other lengths) run eager, so their shapes never spend Dynamo's
    recompile budget (8 variants per function, then eager without a word). The compiled form is built once per
    (function, device type); its first graph is specialised to the first shapes (static kernels: in an fp32 step
    of the `tiny` model, graphs dynamic from the start made the step 5-7 % slower than eager) and the first
    recompile makes them dynamic (torch.compile's default), so other widths and lengths reuse that one."""
    if not (enabled and torch.is_grad_enabled()):
        return fn
    key = (fn, device.type)
    f = _compiled.get(key)
    if f is None:
        f = _compiled[key] = torch.compile(fn, options=inductor_options(device))
    return f


def compile_problem(device: str) -> str | None:
    """Why regional compilation cannot run on `device` ("cpu" | "cuda"), or None. Inductor builds C++ against
    Python's headers on CPU and Triton kernels (whose launcher a C compiler builds) on CUDA, and finds out only at
    the first step, in a long traceback."""
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile needs Triton on CUDA and it is not importable"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")):
            return "Triton needs a C compiler to build its kernel launcher ($CC, gcc or clang) and none is on PATH"
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()  # $CXX, then g++ (inductor's search)
    except Exception as e:  # its own error type, raised when the search finds nothing
        return f"torch.compile needs a C++ compiler on CPU and found none ({type(e).__name__})"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"torch.compile builds against Python's headers and {header} is missing (python3-dev)"
    return None

"""Minimal repro of the inductor FX-graph-cache problem behind the compiled FP8 quantizer's wrong bytes on CPU.

torch 2.13's FX graph cache key (torch/_inductor/codecache.py, FxGraphHashDetails) holds the torch version, the
inductor config and CUDA device info, but not the CPU vector ISA that `pick_vec_isa()` chose (from the CPU, or
from ATEN_CPU_CAPABILITY). A cache entry written under one ISA is therefore served under another: its C++ source
(written for, e.g., 16-lane AVX-512 float vectors) is rebuilt with the other ISA's flags (8-lane AVX2 vectors)
and silently skips half of every vector (wrong values, rows that end in zeros), or, under
ATEN_CPU_CAPABILITY=default, fails to compile (`'at::vec' has not been declared`). The same happens when one
TORCHINDUCTOR_CACHE_DIR is shared by machines with different CPUs. Our workaround (model/fp8/scaled_mm.py):
compile with `options={"cpp.simdlen": pick_vec_isa().bit_width()}`, which is part of the key.

    .venv/bin/python scripts/repro_inductor_isa_cache.py            # avx512 avx2 default, one fresh cache dir
    avx512 -> True / avx2 -> False / default -> BackendCompilerFailed   (an AVX-512 machine, unkeyed)
    .venv/bin/python scripts/repro_inductor_isa_cache.py --keyed    # every line True
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, torch
opts = {}
if sys.argv[1] == "keyed":
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    opts = {"cpp.simdlen": pick_vec_isa().bit_width()}
f = torch.compile(lambda x: (x.float() / 3).to(torch.bfloat16), dynamic=True, options=opts)
x = torch.randn(4, 256, dtype=torch.bfloat16)
try:
    print(torch.equal(f(x), (x.float() / 3).to(torch.bfloat16)))
except Exception as e:
    print(type(e).__name__)
"""


def main() -> int:
    keyed = "--keyed" in sys.argv
    caps = [a for a in sys.argv[1:] if not a.startswith("--")] or ["avx512", "avx2", "default"]
    bad = 0
    with tempfile.TemporaryDirectory() as cache:
        for cap in caps:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, ATEN_CPU_CAPABILITY=cap)
            cmd = [sys.executable, "-c", CHILD, "keyed" if keyed else "plain"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True).stdout.strip()
            print(f"{cap} -> {out}")
            bad += out != "True"
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# FP8 on one GPU with torch alone (no DeepSpeed, Hydra or Transformer Engine needed): the torch FP8 backend's
# tests (its GPU tests run here: real _scaled_mm kernels vs the emulation, blockwise kernel probe, a model
# step), then bench/fp8_te.py (bf16 vs FP8 step time, peak memory, loss gap; GEMM microbenchmark) writing
# $OUT/fp8_te.json. From the repository root:
#   OUT=/path/to/dir bash scripts/gpu/fp8_check.sh        # about 5 minutes on one H100/H200
# PYTHON picks the interpreter (default python3). Every step has a timeout; a failing step does not stop the
# next one (the JSON is what matters). Logs: $OUT/pytest_fp8.txt, $OUT/fp8_te.log.
set -x
OUT=${OUT:-/tmp/fp8_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "no triton: torch.compile of the quantizers will fall back to eager"
timeout 180 "$PY" -m pytest -q -s -rs -p no:cacheprovider tests/fp8/test_fp8_native.py tests/fp8/test_fp8_te_gpu.py \
    2>&1 | tee "$OUT/pytest_fp8.txt" | tail -n 60
timeout 300 "$PY" bench/fp8_te.py --budget 200 --out "$OUT/fp8_te.json" 2>&1 | tee "$OUT/fp8_te.log"
ls -l "$OUT"

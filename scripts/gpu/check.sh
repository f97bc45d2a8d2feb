#!/usr/bin/env bash
# One H100/H200 machine without network, about 8 minutes (10 with the last stage, the compiled gpu_train):
# install what is missing from a wheel directory, run the GPU tests, the trainer on CUDA (bf16, then FP8 with the
# Triton quantizers) and the GPU benchmarks, and write everything into an output directory (summary.json is
# rewritten after every step, so a run cut short still says what ran). From the repository root:
#
#   OUT=/path/to/out WHEELS=build/wheels bash scripts/gpu/check.sh
#
# WHEELS: wheels made on a machine with network by `bash scripts/gpu/wheelhouse.sh build/wheels` (DeepSpeed,
# Hydra, pytest, ...: what the trainer and the tests import beyond torch and Triton, about 40 MB). Without it
# only what the machine already has is used, and steps that need a missing package say so and are skipped.
# PYTHON picks the interpreter (default python3). Every step has its own timeout and a failing step does not
# stop the next: $OUT/summary.json says what ran, how long it took and how it ended.
# Packages go into a venv that sees the system's (--system-site-packages: its CUDA torch and Triton), so a
# system Python that refuses pip (PEP 668) is fine. Outputs: one log per step (install, pytest_gpu, fp8_te,
# gpu_train, data_prep, train_bf16, train_fp8, gpu_train_compiled), fp8_te.json, gpu_train.json,
# gpu_train_compiled.json, runs/{bf16,fp8}/metrics.jsonl, env.txt, summary.json.
set -u
OUT=$(mkdir -p "${OUT:-/tmp/gpu_check}" && cd "${OUT:-/tmp/gpu_check}" && pwd)
WHEELS=${WHEELS:+$(cd "$WHEELS" && pwd)}
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record rc and seconds
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 15 "$OUT/$name.log"
    STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}")
    write_summary  # after every step: a run cut short still says what ran
}

write_summary() { printf '{"steps": [%s]}\n' "$(IFS=,; echo "${STEPS[*]}")" > "$OUT/summary.json"; }

has() { "$PY" -c "import $1" > /dev/null 2>&1; }

{
    nvidia-smi -L
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    "$PY" -c "import triton; print('triton', triton.__version__)" || echo "no triton"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ -n "$WHEELS" && -d "$WHEELS" ]]; then
    "$PY" -m venv --system-site-packages "$OUT/venv" && PY=$OUT/venv/bin/python
    # --no-deps: the wheel directory holds the closure already; never touch the machine's torch or Triton
    step install 120 "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
fi

if has pytest; then
    # the GPU tests (real FP8 kernels, compiled Triton quantizers against the eager ones, TE where installed)
    step pytest_gpu 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/fp8/test_fp8_native.py \
        tests/fp8/test_fp8_triton.py tests/fp8/test_fp8_activation_cache.py tests/fp8/test_fp8_te_gpu.py
else
    echo "pytest missing: GPU tests skipped" | tee "$OUT/pytest_gpu.log"
fi

# the FP8 benchmark: bf16 vs TE / torch FP8 (eager, compiled, Triton quantizers), GEMM microbenchmarks
step fp8_te 240 "$PY" bench/fp8_te.py --budget 200 --no-emulated --out "$OUT/fp8_te.json"

# bf16 training step of a 1.8B MoE at sequence 4096: ours vs torchtitan's DeepSeek-V3 (its wheels: WHEELS)
if has torchtitan; then
    step gpu_train 180 "$PY" bench/gpu_train.py --out "$OUT/gpu_train.json"
else
    echo "torchtitan missing: gpu_train skipped (give WHEELS)" | tee "$OUT/gpu_train.log"
fi

if has deepspeed && has hydra && has tokenizers && has matplotlib; then
    DATA=$OUT/data
    step data_prep 120 "$PY" -m data_prep corpus=python_stdlib out_dir="$DATA" tokenizer.vocab_size=4096
    TRAIN=(NPROC=1 DATA_DIR="$DATA" PYTHON="$PY")
    COMMON=(train.steps=30 optim.warmup_steps=5 train.seq_len=512 logging.wandb.mode=disabled checkpoint.save_final=false
            checkpoint.export_hf=false parallel=dp model=small)
    step train_bf16 150 env "${TRAIN[@]}" bash scripts/train.sh "${COMMON[@]}" name=gpu-bf16 \
        run_dir="$OUT/runs/bf16" precision=bf16
    step train_fp8 150 env "${TRAIN[@]}" bash scripts/train.sh "${COMMON[@]}" name=gpu-fp8 \
        run_dir="$OUT/runs/fp8" precision=fp8 precision.fp8.backend=torch precision.fp8.quantizer=triton
else
    echo "deepspeed / hydra / tokenizers / matplotlib missing: trainer steps skipped (give WHEELS)" \
        | tee "$OUT/train_bf16.log"
fi

# last (lowest priority): the same race with both sides compiled as their trainers compile them
if has torchtitan; then
    step gpu_train_compiled 240 "$PY" bench/gpu_train.py --compile --out "$OUT/gpu_train_compiled.json"
else
    echo "torchtitan missing: gpu_train_compiled skipped (give WHEELS)" | tee "$OUT/gpu_train_compiled.log"
fi

write_summary
cat "$OUT/summary.json"
ls -l "$OUT"

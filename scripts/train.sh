#!/usr/bin/env bash
# The default training job (`make train`), or any job: bash scripts/train.sh [hydra overrides ...]
#
#   1. prepares the python_stdlib corpus and its tokenizer into $DATA_DIR if missing (python -m data_prep)
#   2. launches $NPROC ranks (default 2) of `python -m trainer.train` with `python -m trainer.launch`
#      (CPU: DS_ACCELERATOR=cpu, gloo; GPU: one rank per GPU unless NPROC says otherwise). Not DeepSpeed's
#      `deepspeed` runner: SIGTERM to it returns 143 at once and leaves the ranks training. Ours forwards
#      SIGTERM / SIGUSR1 / SIGUSR2 to the ranks, waits for their checkpoint and exits 75 (docs/cluster.md)
#   3. the trainer saves checkpoints, metrics.jsonl, wandb (offline) files and the plots in runs/<name>/,
#      exports Hugging Face format to runs/<name>/hf and prints the final validation loss next to the
#      data's unigram entropy.
#
# Environment: PYTHON (default .venv/bin/python), NPROC, DATA_DIR (default data/python_stdlib), VOCAB (4096),
# MASTER_PORT (default: a free port). Hydra multirun works too: bash scripts/train.sh -m optim.lr=1e-3,3e-3
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=python3
EXTRA=()
if [[ -n "${DATA_DIR:-}" ]]; then EXTRA+=("data.dirs=[$DATA_DIR]"); fi   # else the config's data group decides
DATA_DIR=${DATA_DIR:-data/python_stdlib}
VOCAB=${VOCAB:-4096}

if [[ ! -f "$DATA_DIR/manifest.json" ]]; then
    echo "== preparing $DATA_DIR (python_stdlib corpus, BPE tokenizer of $VOCAB tokens)"
    "$PYTHON" -m data_prep corpus=python_stdlib out_dir="$DATA_DIR" tokenizer.vocab_size="$VOCAB"
fi

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ "$GPUS" == "0" ]]; then
    export DS_ACCELERATOR=cpu
    NPROC=${NPROC:-2}
else
    NPROC=${NPROC:-$GPUS}
fi
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
# One id for every rank of this launch (names the multirun sweep directory and wandb group).
export DSV3_LAUNCH_ID=${DSV3_LAUNCH_ID:-$(date +%Y-%m-%d_%H-%M-%S)}

# A signal to this script (Slurm or a test signals every process of the job) must not end it before the
# launcher, which returns the ranks' exit code (75 after a preemption checkpoint): trap, do not ignore (an
# ignored signal would stay ignored in the ranks).
trap ':' TERM USR1 USR2
echo "== training on $NPROC ranks ($([[ "$GPUS" == "0" ]] && echo CPU/gloo || echo "GPU/nccl")): $PYTHON -m trainer.launch --nproc-per-node $NPROC $*"
start=$(date +%s)
set +e
"$PYTHON" -m trainer.launch --nproc-per-node "$NPROC" --master-port "$MASTER_PORT" \
    checkpoint.export_hf=true "${EXTRA[@]}" "$@"
rc=$?
set -e
case "$rc" in
0) echo "== finished in $(( $(date +%s) - start )) s (logs, plots, checkpoints, hf/: see docs/trainer.md)" ;;
75) echo "== preempted after $(( $(date +%s) - start )) s with a complete checkpoint: run the same command again to resume" ;;
*) echo "== exit code $rc after $(( $(date +%s) - start )) s (docs/cluster.md, Exit codes)" ;;
esac
exit "$rc"

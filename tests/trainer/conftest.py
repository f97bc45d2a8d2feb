"""Trainer test fixtures: a tiny prepared dataset (once per session) and launchers for 1 or 2 ranks.

Runs use an even smaller model than `tiny` (overrides below), seq_len 32 and a few steps, so that a 2-rank
DeepSpeed job takes seconds of compute; most of each run's time is Python start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
# Small stable stdlib modules (about 200 KB of source together).
MODULES = [
    "abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py", "opcode.py",
    "queue.py", "sched.py", "shlex.py", "stat.py", "textwrap.py", "graphlib.py", "glob.py", "genericpath.py",
    "calendar.py", "copy.py", "csv.py", "enum.py",
]  # fmt: skip

MODEL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=2", "model.first_k_dense_replace=1",
    "model.intermediate_size=128", "model.num_attention_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=4",
    "model.moe_intermediate_size=32", "model.num_experts_per_tok=2", "model.n_group=2", "model.topk_group=1",
    "model.max_position_embeddings=64",
]  # fmt: skip
TRAIN = [
    "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_batches=4",
    "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=2", "logging.progress=false",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data_prep directory: a few stdlib modules, a 512-token BPE, train and val splits."""
    from data_prep.config import PrepConfig, TokenizerConfig
    from data_prep.corpus import stdlib_root
    from data_prep.pipeline import prepare

    corpus = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        shutil.copyfile(stdlib_root() / name, corpus / name)
    out = tmp_path_factory.mktemp("data") / "stdlib_tiny"
    prepare(PrepConfig(corpus=str(corpus), out_dir=str(out), val_fraction=0.2, shard_tokens=16384,
                       num_workers=0, progress=False, tokenizer=TokenizerConfig(vocab_size=VOCAB)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["num_tokens"] > 2000, "the fixture needs a usable validation split"
    return out


def base_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*MODEL, *TRAIN, f"data.dirs=[{data}]", f"run_dir={run_dir}", "logging.wandb.mode=disabled", *extra]


# a failed rank's peers get this long to end on their own (most stop at once: their collective fails) before the
# launcher kills them; the launcher's default (300 s) waits for the watchdog's verdict, which no test here needs
FAIL_GRACE_S = 10


def launch(overrides: list[str], nproc: int, env: dict[str, str] | None = None, timeout: float = 240,
           check: bool = True, launcher: str = "trainer") -> subprocess.CompletedProcess:
    """`python -m trainer.train` on 1 rank, or on nproc ranks through `python -m trainer.launch` (the launcher of
    `make train` and the Slurm script; `launcher="trainer"`) or DeepSpeed's (`launcher="deepspeed"`, which starts
    two more Python processes that import torch and deepspeed before any rank: ~5 s a run)."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT), **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer.train", *overrides]
    elif launcher == "trainer":
        cmd = [sys.executable, "-m", "trainer.launch", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "--fail-grace", str(FAIL_GRACE_S), *overrides]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--num_gpus",
               str(nproc), "--master_port", str(free_port()), "--module", "trainer.train", *overrides]
    else:
        raise ValueError(f"launcher: trainer or deepspeed, not {launcher!r}")
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc


def rows(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lm_loss"] for r in rows(run_dir)}


def assert_first_step_matches(run_dir: Path, other: Path) -> None:
    """Two layouts of one job (same samples, same initial weights): the first step's LM loss and grad norm agree
    to the tolerances of tests/parallel/engine_workers.py (identical weights: the same per-microbatch forward,
    averaged in another order; the same gradients summed in another order), the learning rate of every step is
    the same, and both logged every step. Later steps are not compared: after an AdamW step (eps 1e-8, ~lr *
    sign(g)) an entry whose gradient is reassociation noise may move by 2 lr either way, a different entry on
    another CPU. Multi-step training is compared where the update is Lipschitz in the gradient, for every
    schedule the trainer builds (tests/parallel/test_pipeline_engine.py, test_1f1b.py, test_ep_*.py)."""
    from tests.parallel.engine_workers import FWD_RTOL, NORM_RTOL

    a, b = rows(run_dir), rows(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(b) + 1)), (a, b)
    assert [r["train/lr"] for r in a] == [r["train/lr"] for r in b]
    first, second = a[0], b[0]
    assert abs(first["train/lm_loss"] - second["train/lm_loss"]) <= FWD_RTOL * second["train/lm_loss"], (first, second)
    assert abs(first["train/grad_norm"] - second["train/grad_norm"]) <= NORM_RTOL * second["train/grad_norm"], (
        first, second)

"""Cluster tests: the tiny data fixture (shared with tests/trainer) and a launcher for fake Slurm jobs.

`sbatch(...)` runs the real scripts/slurm/train.sbatch on this machine the way Slurm would: SLURM_JOB_NODELIST
names two "nodes" that are both this machine ("localhost,127.0.0.1"), and SRUN is `python -m trainer.slurm
local-srun`, which starts nodes x tasks processes with the environment srun gives its tasks. So the batch
script's mapping (MASTER_ADDR from the node list, MASTER_PORT from the job id) and the trainer's (SLURM_PROCID
-> RANK ...) are exercised as on a cluster, with distinct node ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from parallel.spawn import free_port
from tests.trainer.conftest import ROOT, base_overrides, losses, rows, tiny_data  # noqa: F401

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
FAST = ["train.eval_interval=0", "parallel.timeline_step=0"]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DSV3_FAULT_INJECT",
                "DSV3_LAUNCH_ID"):
        if var not in extra:
            env.pop(var, None)
    for var in [v for v in env if v.startswith("SLURM_")]:  # never inherit a real allocation's variables
        if var not in extra:
            env.pop(var)
    return env


def fake_slurm_env(nodes: int = 2, tasks_per_node: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a Slurm batch script on `nodes` fake nodes of this machine."""
    hosts = ["localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3"][:nodes]
    return cpu_env(SLURM_JOB_NODELIST=",".join(hosts), SLURM_JOB_NUM_NODES=str(nodes),
                   SLURM_JOB_ID=str(free_port()), GPUS_PER_NODE=str(tasks_per_node),
                   SRUN=f"{sys.executable} -m trainer.slurm local-srun", PYTHON=sys.executable, **extra)


def sbatch_cmd(overrides: list[str]) -> list[str]:
    return ["bash", str(SBATCH), *overrides]


def sbatch(overrides: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sbatch_cmd(overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_rows(run_dir: Path) -> list[dict]:
    return rows(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())

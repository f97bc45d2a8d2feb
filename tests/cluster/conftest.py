"""Cluster tests: the tiny data fixture (shared with tests/trainer) and a launcher for fake Slurm jobs.

`sbatch(...)` runs the real scripts/slurm/train.sbatch on this machine the way Slurm would: SLURM_JOB_NODELIST
names two "nodes" that are both this machine ("localhost,127.0.0.1"), and SRUN is `python -m trainer.slurm
local-srun`, which starts nodes x tasks processes with the environment srun gives its tasks. So the batch
script's mapping (MASTER_ADDR from the node list, MASTER_PORT from the job id) and the trainer's (SLURM_PROCID
-> RANK ...) are exercised as on a cluster, with distinct node ranks.

`start_job` / `job_processes` / `left_behind` run a whole job (a script, its launcher, the ranks, the wandb service)
in a session of its own and deliver signals the way a cluster does (every process of the job, or one of them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

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


def start_job(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A job in a session of its own (the test can signal it as a whole), stdout and stderr together."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not [r for r in train_rows(run_dir) if r["step"] >= step]:
        if proc.poll() is not None or time.time() > deadline:
            kill_job(proc)
            raise AssertionError(f"the job ended (or took too long) before step {step}:\n"
                                 f"{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


def job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The job's processes: the one started and every descendant (launchers, ranks, rank 0's wandb service, which
    runs in a session of its own but is still a child of rank 0)."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline()[:4]) or p.name())
        except psutil.Error:
            out.append(f"pid {p.pid} (gone)")
    return out


def left_behind(procs: list[psutil.Process], timeout: float = 30) -> list[str]:
    """Those of `procs` still running `timeout` s after the job ended (zombies count as gone)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive or time.time() > deadline:
            return names(alive)
        time.sleep(0.1)


def kill_job(proc: subprocess.Popen) -> None:
    """Clean up after a failed test: every process of the job, the wandb service (a session of its own) included."""
    try:
        procs = job_processes(proc)
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def finish_job(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            kill_job(proc)


def preemption_checkpoint(run_dir: Path, out: str, how: str = "SIGTERM") -> int:
    """The step the job stopped at, after checking that a complete checkpoint of exactly that step was saved."""
    stopped = max(r["step"] for r in train_rows(run_dir))
    ckpt = run_dir / "checkpoints" / f"step{stopped:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name, out[-3000:]
    assert meta(ckpt)["step"] == stopped
    assert {"rank_00000.safetensors", "rank_00001.safetensors"} <= {p.name for p in (ckpt / "state").iterdir()}
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert f"preempted ({how}): stopped after step {stopped} with a complete checkpoint" in out, out[-3000:]
    return stopped

"""Slurm plumbing without Slurm: hostlists, the SLURM_* -> torch.distributed mapping, hostfiles, the batch
script's dry run, local-srun's task environments, and the hydra/launcher=slurm config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cluster.conftest import ROOT, SBATCH, cpu_env
from trainer.cluster import slurm
from trainer.distributed import prepare_env


def test_expand_hostlist():
    assert slurm.expand_hostlist("gpu[001-003,7],login") == ["gpu001", "gpu002", "gpu003", "gpu7", "login"]
    assert slurm.expand_hostlist("r[1-2]n[09-10]") == ["r1n09", "r1n10", "r2n09", "r2n10"]
    assert slurm.expand_hostlist("node5") == ["node5"]
    assert slurm.expand_hostlist("a-b[1-2],c") == ["a-b1", "a-b2", "c"]
    with pytest.raises(ValueError):
        slurm.expand_hostlist("gpu[1-2")
    assert slurm.expand_tasks_per_node("8(x2),4") == [8, 8, 4]


SRUN_TASK = {  # what srun gives task 11 of a 2-node x 8-task step (node 1, local 3)
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_TASKS_PER_NODE": "8(x2)",
}


def test_slurm_rank_env_maps_an_srun_task():
    env = slurm.slurm_rank_env(SRUN_TASK)
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu017", "MASTER_PORT": str(10000 + 123456 % 20000)}
    # the batch script's choice of master wins; a step on a node subset uses the step's node list
    env = slurm.slurm_rank_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                                "SLURM_STEP_NODELIST": "gpu018", "SLURM_STEP_NUM_TASKS": "8"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["WORLD_SIZE"]) == ("10.0.0.1", "29500", "8")


def test_no_mapping_outside_an_srun_task():
    # the batch script itself (or an salloc shell) has SLURM_PROCID=0 and the allocation's task count: a
    # plain `python` there is one process, not rank 0 of 16 waiting for the others
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    assert slurm.slurm_rank_env(batch) == {}
    assert slurm.slurm_rank_env({**SRUN_TASK, "SLURM_STEP_ID": "4294967294"}) == {}  # the batch step


def test_prepare_env_uses_the_mapping(monkeypatch: pytest.MonkeyPatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        # setenv first so monkeypatch records the variable and removes what prepare_env writes into
        # os.environ (a bare delenv of an absent variable records nothing, and WORLD_SIZE=16 leaked)
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    for k, v in SRUN_TASK.items():
        monkeypatch.setenv(k, v)
    env = prepare_env()
    assert (env.rank, env.local_rank, env.world_size) == (11, 3, 16)
    import os

    assert os.environ["MASTER_ADDR"] == "gpu017" and os.environ["NODE_RANK"] == "1"


def test_hostfile_and_cli():
    assert slurm.hostfile(["a", "b"], 8) == "a slots=8\nb slots=8\n"
    out = subprocess.run([sys.executable, "-m", "trainer.slurm", "hostfile", "--slots", "4", "gpu[1-2]"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out == "gpu1 slots=4\ngpu2 slots=4\n"
    bad = subprocess.run([sys.executable, "-m", "trainer.slurm", "hosts", "gpu[1-"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unbalanced")


def _dry_run(launcher: str) -> str:
    env = cpu_env(SLURM_JOB_NODELIST="gpu[001-002]", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", DRY_RUN="1",
                  LAUNCHER=launcher, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SBATCH), "train.steps=10", "name=x y"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_prints_the_srun_command():
    out = _dry_run("srun")
    assert "master gpu001:14242" in out and "MASTER_ADDR=gpu001" in out and "NCCL_IB_TIMEOUT=22" in out
    cmd = next(line for line in out.splitlines() if line.startswith("+ "))
    assert cmd == (f"+ srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=0 {sys.executable} -u -m trainer.train "
                   "train.steps=10 name=x\\ y")  # shell-quoted: paste-able
    assert out.rstrip().endswith("== dry run: nothing started")


@pytest.mark.parametrize("launcher", ["launch", "deepspeed"])
def test_dry_run_prints_one_launcher_per_node(launcher: str):
    out = _dry_run(launcher)  # LAUNCHER=deepspeed: the same path (DeepSpeed's runner breaks the signal contract)
    cmd = next(line for line in out.splitlines() if line.startswith("+ "))
    assert cmd == (f"+ srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=0 {sys.executable} -u -m trainer.launch "
                   "--nproc-per-node 8 --nnodes 2 --master-addr gpu001 --master-port 14242 train.steps=10 name=x\\ y")


def test_local_srun_gives_each_task_srun_variables(tmp_path):
    code = ("import json, os, sys; from trainer.cluster.slurm import slurm_rank_env; e = slurm_rank_env(os.environ); "
            "open(os.path.join(sys.argv[1], e['RANK']), 'w').write(json.dumps(e))")
    env = cpu_env(SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_JOB_ID="777")
    proc = subprocess.run([sys.executable, "-m", "trainer.slurm", "local-srun", "--nodes=2", "--ntasks-per-node=2",
                           sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tasks = sorted((json.loads(p.read_text()) for p in tmp_path.iterdir()), key=lambda t: int(t["RANK"]))
    assert [(t["RANK"], t["LOCAL_RANK"], t["NODE_RANK"]) for t in tasks] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]
    assert {(t["WORLD_SIZE"], t["LOCAL_WORLD_SIZE"], t["MASTER_ADDR"], t["MASTER_PORT"]) for t in tasks} == {
        ("4", "2", "nodeA", "10777")}


def test_local_srun_exit_code_is_the_worst_task():
    env = cpu_env(SLURM_JOB_NODELIST="n1,n2")
    code = "import os, sys; sys.exit(3 if os.environ['SLURM_PROCID'] == '1' else 0)"
    proc = subprocess.run([sys.executable, "-m", "trainer.slurm", "local-srun", "--nodes", "2", sys.executable, "-c",
                           code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "n2: task 1: Exited with exit code 3" in proc.stderr


def test_hydra_launcher_slurm_config(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs

    monkeypatch.setenv("DSV3_LAUNCH_ID", "sweep-1")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert launcher.signal_delay_s > 0 and launcher.additional_parameters.requeue is True
    assert launcher.submitit_folder == "multirun/default/sweep-1/.submitit/%j"
    assert cfg.hydra.callbacks.sweep_summary._target_ == "trainer.cluster.sweep.SweepSummary"

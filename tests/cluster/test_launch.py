"""`python -m trainer.launch` with stand-in ranks (tests/cluster/launch_toy.py, no torch: seconds each).

The contract (docs/cluster.md): SIGTERM / SIGUSR1 to the launcher reach every rank, the launcher waits for their
checkpoint and exits 75; a rank killed by signal N gives 128+N; a failed rank leaves the others a grace period,
then they are killed and do not count; the ranks never outlive the launcher (PR_SET_PDEATHSIG). The same with
real training ranks: tests/cluster/test_signals.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.conftest import ROOT, cpu_env
from trainer.cluster.exit_codes import EXIT_PREEMPTED
from trainer.cluster.launch import Options, parse_args, rank_envs


def start(tmp_path: Path, mode: str, *opts: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer.launch", "--nproc-per-node", "2", *opts, "--module",
           "tests.cluster.launch_toy", mode, str(tmp_path)]
    return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_ranks(tmp_path: Path, proc: subprocess.Popen, n: int = 2) -> list[int]:
    deadline = time.time() + 60
    while len(pids := sorted(tmp_path.glob("rank*.pid"))) < n:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    time.sleep(0.3)  # the pid file comes before the handler
    return [int(p.read_text()) for p in pids]


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_options_and_rank_environments():
    opts, args = parse_args(["--nproc-per-node", "4", "--nnodes=2", "--master_addr", "gpu001", "--master-port",
                             "14242", "-m", "train.steps=3"])
    assert args == ["-m", "train.steps=3"] and opts.module == "trainer.train"
    envs = rank_envs(opts, {"SLURM_NODEID": "1", "PATH": "/bin"})  # one launcher per node under srun
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("4", "0"), ("5", "1"), ("6", "2"), ("7", "3")]
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["NODE_RANK"], e["MASTER_ADDR"], e["MASTER_PORT"], e["PATH"])
            for e in envs} == {("8", "4", "1", "gpu001", "14242", "/bin")}
    assert parse_args(["--", "--nproc-per-node", "2"])[1] == ["--nproc-per-node", "2"]  # after --: the ranks'
    with pytest.raises(ValueError, match="master-port"):
        rank_envs(Options(nnodes=2), {})
    with pytest.raises(ValueError, match="is not an integer"):
        parse_args(["--nproc-per-node", "two"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_launcher_reaches_every_rank_and_it_exits_75(tmp_path: Path, sig: signal.Signals):
    proc = start(tmp_path, "wait")
    pids = wait_for_ranks(tmp_path, proc)
    proc.send_signal(sig)
    time.sleep(0.1)
    proc.send_signal(sig)  # again, while the ranks checkpoint: forwarded again, absorbed by the ranks
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out
    assert f"launch: {sig.name}: forwarded to the ranks" in out
    for rank in (0, 1):
        name, count = (tmp_path / f"rank{rank}.signal").read_text().split()
        assert name == sig.name and int(count) >= 1
    assert gone(pids)


@pytest.mark.multiprocess
def test_a_rank_killed_by_a_signal_gives_128_plus_n(tmp_path: Path):
    proc = start(tmp_path, "fail:1:kill")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, out  # srun's convention; DeepSpeed's runner gives 247
    assert "launch: rank 1 (pid" in out and "killed by SIGKILL (code 137)" in out


@pytest.mark.multiprocess
def test_ranks_left_after_a_failure_are_killed_after_the_grace_and_do_not_count(tmp_path: Path):
    proc = start(tmp_path, "fail:1:1:hang", "--fail-grace", "1")
    pids = wait_for_ranks(tmp_path, proc)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out  # the failed rank's code, not the SIGKILL the launcher gave rank 0
    assert "ranks 0 still running 1 s after a rank failed: killing them" in out
    assert gone(pids)


@pytest.mark.multiprocess
def test_the_ranks_do_not_outlive_a_killed_launcher(tmp_path: Path):
    proc = start(tmp_path, "wait")
    pids = wait_for_ranks(tmp_path, proc)
    proc.kill()  # SIGKILL: the launcher cannot forward anything
    proc.communicate(timeout=30)
    deadline = time.time() + 30
    while not gone(pids):  # PR_SET_PDEATHSIG: SIGTERM, a preemption: they "checkpoint" and exit
        assert time.time() < deadline, "ranks outlived their launcher"
        time.sleep(0.05)
    assert all((tmp_path / f"rank{r}.signal").read_text().startswith("SIGTERM") for r in (0, 1))


@pytest.mark.multiprocess
def test_a_config_mistake_is_one_line_from_two_ranks(tmp_path: Path):
    # both ranks refuse the same config; rank 0 alone says so (the line used to print once per rank)
    cmd = [sys.executable, "-m", "trainer.launch", "--nproc-per-node", "2", "optim.lr=inf",
           f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: optim.lr: "), proc.stderr
    assert not (tmp_path / "run").exists()

"""One job per run directory (trainer/cluster/run_lock.py): the lock's rules, and the trainer refusing a held run
directory with one line (exit 2) while taking over a stale lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.conftest import ROOT, base_overrides, cpu_env
from trainer.cluster.run_lock import LOCK_NAME, RunDirInUse, RunLock, my_record


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**my_record(), **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record) + "\n")
    return path


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_take_hold_and_release(tmp_path: Path):
    lock = RunLock(tmp_path / "run", heartbeat=0.05).acquire()
    record = json.loads(lock.path.read_text())
    assert {k: record[k] for k in ("host", "pid")} == {"host": socket.gethostname(), "pid": os.getpid()}
    assert {"slurm_job_id", "started", "process_start", "token"} <= set(record) and lock.took_over is None
    os.utime(lock.path, (1, 1))
    time.sleep(0.3)
    assert lock.path.stat().st_mtime > time.time() - 60  # the heartbeat refreshed it
    lock.release()
    assert not lock.path.exists()
    lock.release()  # idempotent


def test_a_live_holder_on_this_host_keeps_it(tmp_path: Path, other_process: subprocess.Popen):
    start = round(psutil.Process(other_process.pid).create_time(), 2)
    path = write_lock(tmp_path, pid=other_process.pid, process_start=start, slurm_job_id="4242")
    os.utime(path, (1, 1))  # an old heartbeat does not matter on the same host: the pid is alive
    with pytest.raises(RunDirInUse) as err:
        RunLock(tmp_path).acquire()
    holder = f"{tmp_path} is in use by Slurm job 4242 (pid {other_process.pid} on {socket.gethostname()}"
    assert holder in str(err.value)
    assert json.loads(path.read_text())["pid"] == other_process.pid  # untouched


def test_stale_locks_are_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cases = {
        "pid": dict(pid=dead_pid()),  # same host, the pid has exited
        "reused": dict(pid=os.getppid(), process_start=1.0),  # same host, the pid is another process now
        "heartbeat": dict(host="elsewhere", pid=1),  # another host, no heartbeat for longer than stale_after
        "requeue": dict(host="elsewhere", pid=1, slurm_job_id="77", slurm_restart_count=0),  # this job, requeued
        "torn": None,  # unreadable (a crash between create and write) and old
    }
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for name, fields in cases.items():
        run_dir = tmp_path / name
        if fields is None:
            run_dir.mkdir()
            (run_dir / LOCK_NAME).write_text("")
        else:
            write_lock(run_dir, **fields)
        if name in ("heartbeat", "torn"):
            os.utime(run_dir / LOCK_NAME, (time.time() - 1000, time.time() - 1000))
        lock = RunLock(run_dir, stale_after=300).acquire()
        assert lock.took_over is not None, name
        assert json.loads(lock.path.read_text())["token"] == lock.record["token"]
        assert not list(run_dir.glob(".*.tmp"))
        lock.release()


def test_a_fresh_heartbeat_from_another_host_holds(tmp_path: Path):
    write_lock(tmp_path, host="gpu001", pid=1, slurm_job_id=None)
    with pytest.raises(RunDirInUse, match=r"in use by another job \(pid 1 on gpu001, since .*, heartbeat \d+ s ago\)"):
        RunLock(tmp_path, stale_after=300).acquire()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path):
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, host="elsewhere", pid=1)  # taken over by another job that thought us gone
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"


def trainer(run_dir: Path, tiny_data: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.launch", "--nproc-per-node", str(nproc),
           *base_overrides(tiny_data, run_dir, "train.steps=2", "train.eval_interval=0", "checkpoint.interval=0",
                           "parallel.timeline_step=0", *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_second_job_on_a_held_run_dir_stops_with_one_line(tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.cluster.run_lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
                               str(run_dir)], cwd=ROOT, env=cpu_env(SLURM_JOB_ID="4242"), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        proc = trainer(run_dir, tiny_data, 2)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"error: run_dir: {run_dir} is in use by Slurm job 4242 (pid "
                                                   f"{holder.pid} on {socket.gethostname()}, since "), proc.stderr
    assert not (run_dir / "config.yaml").exists()  # nothing written


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    pid = dead_pid()
    write_lock(run_dir, pid=pid)
    proc = trainer(run_dir, tiny_data, 2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"note: took over the lock of {run_dir} from pid {pid} on {socket.gethostname()} (pid {pid} has exited)" \
           in proc.stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    assert not (run_dir / LOCK_NAME).exists()  # released at exit

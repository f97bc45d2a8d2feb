"""One job at a time per run directory: `<run_dir>/run.lock`, held by rank 0 (docs/cluster.md).

Two jobs writing one run directory (a requeue that overlaps a job still finishing, a second `make train`, two
sweeps with one name) interleave checkpoints, `latest`, metrics.jsonl and the wandb run. So rank 0 takes the lock
once the config has passed validation, before the run writes anything, and releases it at exit; a second job
stops with one line naming the holder (exit 2):

    error: run_dir: runs/x is in use by Slurm job 4242 (pid 811 on gpu001, since 2026-12-06 06:40:01 UTC, heartbeat
    3 s ago); wait for it to end, or set run_dir to another directory (...)

The lock is a small JSON file (host, pid, the process's start time, SLURM_JOB_ID and SLURM_RESTART_COUNT, the
start time, a random token). No flock: it is unreliable on NFS and Lustre, where run directories live. Instead:

- taking it: `open(O_CREAT | O_EXCL)`, atomic on NFSv3+ and every local filesystem;
- the holder refreshes its mtime every HEARTBEAT_S seconds (a thread of its own), while the lock is still its own;
- a lock is stale when its holder is gone: the same host and its pid has exited (or is another process now: the
  start time differs); the same Slurm job with a lower restart count (a requeue of this job: the earlier run of it
  is over, wherever it ran); or, from another host, its heartbeat is older than STALE_AFTER_S. Heartbeat ages are
  measured on the file server's clock (the mtime of a file just written beside it), never this host's;
- a stale lock is taken over by writing a fresh lock to a temporary file, checking once more that the lock is still
  the stale one, and renaming the fresh one over it (atomic); reading it back says who won a race.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class RunDirInUse(Exception):
    """The run directory is held by another live job: what (`problem`) and what to do (`fix`)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:  # gone, or no psutil
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def my_record() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "token": uuid.uuid4().hex,
    }


@dataclass
class Seen:
    """A lock as read: its record (None when unreadable or torn) and the mtime of its last heartbeat."""

    record: dict[str, Any] | None
    mtime: float
    raw: bytes


def _read(path: Path) -> Seen | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    return Seen(record if isinstance(record, dict) else None, mtime, raw)


class RunLock:
    """`acquire()` (raises RunDirInUse naming the holder), `release()`; a heartbeat thread while held."""

    def __init__(self, run_dir: Path | str, heartbeat: float = HEARTBEAT_S, stale_after: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.record = my_record()
        self.took_over: dict[str, Any] | None = None  # the stale holder replaced, for a note on the console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking it ---------------------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(self.record) + "\n").encode()
        for _ in range(5):  # another job can release or take the lock between our looks: look again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                seen = _read(self.path)
                if seen is None:  # released just now
                    continue
                if self._take_over(seen, data):
                    break
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            break
        else:
            raise self._in_use(_read(self.path))
        self._thread = threading.Thread(target=self._beat, name="dsv3-run-lock", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, seen: Seen, data: bytes) -> bool:
        """True when the stale lock `seen` is now ours; raises RunDirInUse when it is held; False: look again."""
        tmp = self.run_dir / f".{LOCK_NAME}.{self.record['host']}.{self.record['pid']}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            now = os.stat(tmp).st_mtime  # the file server's clock
            why = self.stale_reason(seen, now)
            if why is None:
                raise self._in_use(seen, now)
            again = _read(self.path)  # still the same stale lock, not refreshed or replaced meanwhile?
            if again is None or again.raw != seen.raw or again.mtime != seen.mtime:
                return False
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        time.sleep(0.05)  # a contender that renamed at the same moment: the last rename wins, reading tells
        mine = _read(self.path)
        if mine is None or mine.record is None or mine.record.get("token") != self.record["token"]:
            return False
        self.took_over = {**(seen.record or {}), "why": why}
        return True

    def stale_reason(self, seen: Seen, now: float) -> str | None:
        """Why the lock `seen` no longer holds (its holder is gone), or None while it does. `now`: server clock."""
        age = now - seen.mtime
        rec = seen.record
        if rec is None:
            return f"unreadable, heartbeat {age:.0f} s old" if age > self.stale_after else None
        me = self.record
        job, restart = rec.get("slurm_job_id"), int(rec.get("slurm_restart_count") or 0)
        if job and job == me["slurm_job_id"] and restart < me["slurm_restart_count"]:
            return f"an earlier run of this Slurm job (restart {restart})"
        if rec.get("host") == me["host"]:
            pid = int(rec.get("pid") or 0)
            if pid == me["pid"] and rec.get("process_start") == me["process_start"]:
                return "this process"  # a job of this process that ended without releasing it
            if pid <= 0 or not _pid_alive(pid):
                return f"pid {pid} has exited"
            start = _process_start(pid)
            if rec.get("process_start") is not None and start is not None and start != rec["process_start"]:
                return f"pid {pid} is another process now"
            return None
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _in_use(self, seen: Seen | None, now: float | None = None) -> RunDirInUse:
        if seen is None or seen.record is None:
            return RunDirInUse(f"{self.run_dir} is in use by another job (its lock {self.path} is unreadable)",
                               "wait for it to end, or set run_dir to another directory (the lock is taken over "
                               f"once its heartbeat is {self.stale_after:.0f} s old)")
        rec = seen.record
        who = f"Slurm job {rec['slurm_job_id']}" if rec.get("slurm_job_id") else "another job"
        beat = f", heartbeat {max(0.0, now - seen.mtime):.0f} s ago" if now is not None else ""
        return RunDirInUse(f"{self.run_dir} is in use by {who} (pid {rec.get('pid')} on {rec.get('host')}, since "
                           f"{rec.get('started')}{beat})",
                           "wait for it to end, or set run_dir to another directory (a lock whose holder is gone is "
                           "taken over: same host and the pid has exited, or no heartbeat for "
                           f"{self.stale_after:.0f} s: {self.path})")

    # ---- holding it --------------------------------------------------------------------------------------------
    def _mine(self) -> bool:
        seen = _read(self.path)
        return seen is not None and seen.record is not None and seen.record.get("token") == self.record["token"]

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat):
            try:
                if self._mine():
                    os.utime(self.path)  # times=None: the file server's clock on NFS
                elif not warned:
                    warned = True
                    seen = _read(self.path)
                    print(f"warning: the lock of {self.run_dir} is no longer this job's (now: "
                          f"{seen.record if seen else 'removed'}); another job may be writing the run directory",
                          flush=True)
            except OSError:
                pass  # a filesystem hiccup: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. Idempotent."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=10)
        self._thread = None
        try:
            if self._mine():
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def hold_run_dir(run_dir: Path | str, env: Any) -> Iterator[RunLock | None]:
    """Rank 0 takes the run directory's lock; every rank learns the outcome (one broadcast), so a held directory
    ends every rank with exit 2, rank 0 printing the one line. Released when the block exits, on rank 0."""
    lock: RunLock | None = None
    problem: tuple[str, str] | None = None
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunDirInUse as e:
            problem = (e.problem, e.fix)
        except OSError as e:  # told to every rank, which would otherwise wait for rank 0 in the broadcast
            problem = (f"cannot take the lock {Path(run_dir) / LOCK_NAME} ({e.strerror or e})",
                       "set run_dir to a writable directory, or fix its permissions")
        if lock is not None and lock.took_over is not None:
            old = lock.took_over
            print(f"note: took over the lock of {run_dir} from pid {old.get('pid')} on {old.get('host')} "
                  f"({old['why']})", flush=True)
    if env.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
    if problem is not None:
        if env.is_main:
            from trainer.errors import UserError

            raise UserError("run_dir", *problem)
        raise SystemExit(2)  # rank 0 prints the line
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

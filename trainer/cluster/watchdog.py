"""The watchdog: a rank that dies or hangs makes every other rank exit within a bounded time, naming it.

Why not only collective timeouts: a gloo or NCCL collective whose peer is gone can block far longer than a step
(NCCL until its 10-30 min timeout, a frozen peer forever), the timeout must exceed the slowest legitimate wait
(a checkpoint save, an evaluation), and the error does not say which rank is to blame.

Design: one daemon thread per rank, talking to the rendezvous TCPStore (MASTER_ADDR:MASTER_PORT, hosted by
rank 0) through its own client. Every `interval` seconds it
  1. beats: increments `hb/<rank>` (a counter, so no clocks are compared across hosts);
  2. watches its ring successor (rank+1) % world: if that counter has not moved for `timeout` seconds (local
     monotonic clock) and the successor has not said it is done, it publishes a verdict ("rank N stopped
     responding ...") with compare-and-set, so the first verdict wins;
  3. reads the verdict key: once there is one, prints `error: <verdict>; ...` and ends the process with
     os._exit(3) (EXIT_PEER_FAILED), wherever the main thread is blocked;
  4. with `step_timeout`: if this rank finished no step for that long, it publishes where its main thread is
     (a file:line, and whether that is a communication wait), waits two intervals for the others to do the
     same, and publishes a verdict naming the ranks that are busy outside communication (the hung ones).
Store traffic is O(1) per rank per interval (own beat, one neighbour, the verdict key), so it scales to
thousands of ranks. If the store itself is unreachable for `timeout` seconds, rank 0 (its host) is gone.

A dead process, a frozen one (SIGSTOP, a D-state NFS or driver hang) and a crashed one all stop beating. A
process whose main thread hangs while its interpreter still runs keeps beating: `step_timeout` covers it.
When the main thread's own collective fails first (gloo: "Connection closed by peer"), `explain` waits for
the verdict so that this rank, too, exits 3 with the message rather than a traceback.

A rank that leaves on purpose (end of the job, preemption, an error every rank raised together) calls
`stop(done=True)`, which marks it done so its watcher does not mistake the exit for a failure. `stop` joins
the thread before it returns (every store call in it is bounded by the client's timeout, every wait ends at
once on stop) and then closes the store client: a daemon thread still inside a TCPStore call when Python
finalizes dies in std::terminate ("terminate called without an active exception").
"""

from __future__ import annotations

import datetime
import linecache
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer.cluster.exit_codes import EXIT_PEER_FAILED

_ROOT = str(Path(__file__).resolve().parents[2]) + os.sep
_GENERATION = 0  # a fresh key space per job (a Hydra multirun runs several jobs in one process group)
_COMM_PATHS = ("torch/distributed/", "deepspeed/comm/", "parallel/p2p.py", "parallel/all_to_all.py")
_COMM_CALL = re.compile(r"\.wait\(|barrier\(|all_reduce|all_gather|reduce_scatter|broadcast|all_to_all|recv\(")


def main_thread_location() -> tuple[str, bool]:
    """("file:line in function", whether the main thread is waiting in communication), best effort."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return "unknown", False
    where = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
    waiting = False
    f: Any = frame
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if any(p in path for p in _COMM_PATHS) or _COMM_CALL.search(linecache.getline(path, f.f_lineno)):
            waiting = True
            break
        f = f.f_back
    return where, waiting


def _short(path: str) -> str:
    """A path relative to the repository or to site-packages, for one-line messages."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    return path.removeprefix(_ROOT)


class Watchdog:
    """Heartbeats and peer checks in a daemon thread (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, timeout: float | None, step_timeout: float | None = None,
                 host: str | None = None, port: int | None = None, interval: float | None = None) -> None:
        """`timeout`: seconds of a silent peer (None: peers are not watched); `step_timeout`: see the module."""
        global _GENERATION
        _GENERATION += 1
        self.rank, self.world_size = rank, world_size
        self.watch_peers = timeout is not None and world_size > 1
        self.timeout = float(timeout if timeout is not None else step_timeout or 60.0)  # also bounds store errors
        self.step_timeout = step_timeout
        self.interval = interval if interval is not None else max(0.2, min(self.timeout / 5, 10.0))
        self.host = host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.port = int(port or os.environ["MASTER_PORT"])
        self.prefix = f"dsv3/watchdog/{_GENERATION}/"
        self.successor = (rank + 1) % world_size
        self._step: int | None = None
        self._step_time: float | None = None  # monotonic time of the last finished step (None: not started)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._verdict: str | None = None
        self._exit_lock, self._exiting = threading.Lock(), False

    # ---- main thread API --------------------------------------------------------------------------------------
    def start(self) -> Watchdog:
        self._store = self._connect()
        self._store.add(self._key(f"hb/{self.rank}"), 1)
        self._thread = threading.Thread(target=self._run, name="dsv3-watchdog", daemon=True)
        self._thread.start()
        return self

    def step_done(self, step: int) -> None:
        """The main thread finished a step (or is about to start the first one): progress for step_timeout."""
        self._step, self._step_time = step, time.monotonic()

    def stop(self, done: bool = True) -> None:
        """Leave on purpose: mark this rank done (its watcher will not report it), end the thread."""
        if self._thread is None:
            return
        self._stop.set()
        # one loop pass: a few store calls, each bounded by the client's timeout (interval); then give up
        # (trainer.distributed.end_process ends the process without interpreter teardown if it is still alive)
        self._thread.join(timeout=8 * max(1.0, self.interval) + 5)
        self._thread = None
        if done:
            try:
                self._store.set(self._key(f"done/{self.rank}"), "1")
            except Exception:  # the store may be gone already (rank 0 exited): nothing to tell anyone
                pass
        self._store = None  # close the store client now, in this thread, not during interpreter teardown

    def explain(self, exc: BaseException) -> None:
        """The main thread failed. A failed collective: wait for the verdict on the peer and exit 3 with it.
        Anything else (or no verdict in time): stop the thread, not marked done, and let the error through."""
        if self._thread is None:
            return
        if _looks_like_comm_error(exc):
            # the watcher needs `timeout` of silence; if rank 0 died too, as long again to give up on the store
            deadline = time.monotonic() + 2 * self.timeout + 4 * self.interval
            while time.monotonic() < deadline and self._verdict is None:
                time.sleep(self.interval / 4)
            if self._verdict is not None:
                self._exit(self._verdict)  # the thread usually gets there first; either way, one message
        self.stop(done=False)

    # ---- the thread -------------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self.prefix + name

    def _connect(self) -> Any:
        from torch.distributed import TCPStore

        # a short timeout: the thread must never sit in a call for long (and never at interpreter exit)
        return TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                        timeout=datetime.timedelta(seconds=max(1.0, self.interval)))

    def _run(self) -> None:
        last_value, last_change = -1, time.monotonic()
        store_failing_since: float | None = None
        stuck_published = False
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                store = self._store
                store.add(self._key(f"hb/{self.rank}"), 1)
                if self._step is not None:
                    store.set(self._key(f"step/{self.rank}"), str(self._step))
                store_failing_since = None
                if self.watch_peers:
                    value = store.add(self._key(f"hb/{self.successor}"), 0)
                    if value != last_value:
                        last_value, last_change = value, now
                    elif now - last_change > self.timeout and not store.check([self._key(f"done/{self.successor}")]):
                        self._publish(store, self._dead_message(store, now - last_change))
                if (self.step_timeout and self._step_time is not None and not stuck_published
                        and now - self._step_time > self.step_timeout):
                    self._report_stuck(store)
                    stuck_published = True
                if store.check([self._key("verdict")]):
                    self._verdict = store.get(self._key("verdict")).decode()
                    if not self._stop.is_set():
                        self._exit(self._verdict)
                    return
            except Exception as err:  # the store is unreachable: its host, rank 0, is gone (or the network)
                store_failing_since = store_failing_since or now
                if now - store_failing_since > self.timeout and self.rank != 0:
                    self._verdict = (f"rank 0 stopped responding: the rendezvous store it hosts "
                                     f"({self.host}:{self.port}) has been unreachable for "
                                     f"{now - store_failing_since:.0f} s ({type(err).__name__})")
                    self._exit(self._verdict)
                    return
                try:
                    self._store = self._connect()
                except Exception:
                    pass

    def _dead_message(self, store: Any, silent: float) -> str:
        step = ""
        if store.check([self._key(f"step/{self.successor}")]):
            step = f", last reported after step {store.get(self._key(f'step/{self.successor}')).decode()}"
        return (f"rank {self.successor} stopped responding: no heartbeat for {silent:.1f} s{step} "
                f"(noticed by rank {self.rank}; train.fault_timeout={self.timeout:g})")

    def _report_stuck(self, store: Any) -> None:
        """step_timeout: publish where this rank is, gather the others', name the ranks not in communication."""
        where, waiting = main_thread_location()
        store.set(self._key(f"stuck/{self.rank}"), f"{int(waiting)}|{self._step}|{where}")
        if self._stop.wait(2 * self.interval):  # the other ranks time out at about the same moment; let them
            return  # publish (unless this rank is leaving)
        busy, waits = [], []
        for r in range(self.world_size):
            key = self._key(f"stuck/{r}")
            if store.check([key]):
                w, step, loc = store.get(key).decode().split("|", 2)
                (waits if w == "1" else busy).append(f"rank {r} (after step {step}, at {loc})")
        waiting = f"; waiting for it in communication: {', '.join(waits)}" if waits else ""
        if busy:
            problem = f"{', '.join(busy)} made no progress outside communication{waiting}"
        else:
            problem = f"no rank finished a step and all wait in communication: {', '.join(waits)}"
        self._publish(store, f"{problem} (train.step_timeout={self.step_timeout:g} s)")

    def _publish(self, store: Any, message: str) -> None:
        store.compare_set(self._key("verdict"), "", message)

    def _exit(self, verdict: str) -> None:
        with self._exit_lock:  # the thread and the main thread (explain) may both get here: one message
            first, self._exiting = not self._exiting, True
        if not first:
            while True:  # the other one is ending the process
                time.sleep(1)
        print(f"error: {verdict}; rank {self.rank} exits with code {EXIT_PEER_FAILED} so the job ends instead of "
              "hanging; restart it (train.resume=auto continues from the last checkpoint)", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        try:
            seen = self._store.add(self._key("verdict_seen"), 1)
            if self.rank == 0:  # rank 0 hosts the store: stay until the others have read the verdict from it
                deadline = time.monotonic() + 3 * self.interval + 1
                while seen < self.world_size - 1 and time.monotonic() < deadline:  # all but the failed rank
                    time.sleep(self.interval / 4)
                    seen = self._store.add(self._key("verdict_seen"), 0)
        except Exception:  # the store is gone: nobody is left to wait for
            pass
        os._exit(EXIT_PEER_FAILED)


def _looks_like_comm_error(exc: BaseException) -> bool:
    """A failed collective or p2p (gloo raises plain RuntimeErrors), not a bug in the step's arithmetic."""
    try:
        from torch.distributed import DistError

        if isinstance(exc, DistError):
            return True
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        m in text for m in ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL", "Timed out",
                            "timed out", "connect"))

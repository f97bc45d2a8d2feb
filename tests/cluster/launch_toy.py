"""A stand-in rank for tests/cluster/test_launch.py: `python -m tests.cluster.launch_toy MODE DIR` (no torch).

    wait          write DIR/rank<R>.pid, wait for a preemption signal (the trainer's handler), write
                  DIR/rank<R>.signal (the signal and how many arrived), "checkpoint" for 0.5 s and exit 75
    fail:R:CODE[:hang]  rank R exits with CODE at once (CODE `kill`: SIGKILLs itself); the others exit 3 after
                  0.5 s, as the watchdog makes them, or (`:hang`) never end by themselves
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from trainer.cluster.preemption import PreemptionHandler


def main(mode: str, out: Path) -> int:
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    if mode == "wait":
        count = []
        handler = PreemptionHandler().install()
        for sig in handler.signals:  # count deliveries on top of the trainer's handler
            inner = signal.getsignal(sig)
            signal.signal(sig, lambda s, f, inner=inner: (count.append(s), inner(s, f)))
        while not handler.requested:
            time.sleep(0.02)
        time.sleep(0.5)  # the checkpoint; more signals may arrive meanwhile
        (out / f"rank{rank}.signal").write_text(f"{handler.received.name} {len(count)}")
        handler.chain_previous()
        return 75
    _, who, code, *rest = mode.split(":")
    if rank == int(who):
        if code == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return int(code)
    time.sleep(600 if rest == ["hang"] else 0.5)
    return 3

if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))

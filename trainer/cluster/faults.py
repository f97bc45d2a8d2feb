"""Fault injection for the tests of preemption, the watchdog, non-finite losses and checkpoint failures.

`DSV3_FAULT_INJECT=<spec>` (read once per job; unset in normal runs, where nothing here does anything):

    kill_rank:R:step:K          rank R SIGKILLs itself in the middle of step K (a crashed / OOM-killed rank)
    hang_rank:R:step:K          rank R's main thread sleeps forever in the middle of step K (a hung rank that
                                still heartbeats: train.step_timeout finds it)
    signal:SIG:rank:R:step:K    rank R receives SIG (TERM, USR1, USR2) in the middle of step K (preemption)
    nan:step:K                  every embedding output of step K is multiplied by NaN: the loss and every
                                gradient of step K are NaN (train.on_nonfinite decides what happens)
    checkpoint_write:R:step:K   rank R's state-file write of step K fails with ENOSPC (with checkpoint.async_save:
                                on its background writer; the error surfaces where the save is finished)
    checkpoint_save:K           (trainer/checkpoint.py) SIGKILL inside the save of step K, on every rank, once its
                                files are written and before they are published (with checkpoint.async_save: from
                                the background writer, while training goes on)

"In the middle of step K" is when the step's microbatches are drawn from the data stream: inside
`train_batch`, after the step has started on every rank and before its optimizer step, so the other ranks are
inside the step's communication when it happens. Steps count from 1 (step K is the K-th optimizer step).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainer.checkpoint import FAULT_ENV


@dataclass(frozen=True)
class Fault:
    kind: str  # kill_rank | hang_rank | signal | nan | checkpoint_write | checkpoint_save
    step: int
    rank: int | None = None  # None: every rank
    signal: str | None = None


def parse(spec: str) -> Fault | None:
    """The fault of a DSV3_FAULT_INJECT value; None when empty. Raises ValueError on a malformed spec."""
    if not spec:
        return None
    p = spec.split(":")
    try:
        if p[0] in ("kill_rank", "hang_rank", "checkpoint_write") and len(p) == 4 and p[2] == "step":
            return Fault(p[0], int(p[3]), rank=int(p[1]))
        if p[0] == "signal" and len(p) == 6 and p[2] == "rank" and p[4] == "step":
            return Fault("signal", int(p[5]), rank=int(p[3]), signal=p[1].upper().removeprefix("SIG"))
        if p[0] == "nan" and len(p) == 3 and p[1] == "step":
            return Fault("nan", int(p[2]))
        if p[0] == "checkpoint_save" and len(p) == 2:
            return Fault("checkpoint_save", int(p[1]))
    except ValueError:
        pass
    raise ValueError(f"{FAULT_ENV}={spec!r}: not a fault spec (see trainer/cluster/faults.py)")


class FaultInjector:
    """Wraps the training data stream (and, for `nan`, the embedding) to fire the configured fault."""

    def __init__(self, fault: Fault | None, rank: int, first_step: int, microbatches_per_step: int) -> None:
        self.fault, self.rank = fault, rank
        self.step = first_step  # the step whose microbatches are being drawn (1-based once drawing starts)
        self.per_step = microbatches_per_step
        self._drawn = 0
        self.nan_active = False

    @classmethod
    def from_env(cls, rank: int, first_step: int, microbatches_per_step: int) -> FaultInjector:
        return cls(parse(os.environ.get(FAULT_ENV, "")), rank, first_step, microbatches_per_step)

    def mine(self, kind: str) -> bool:
        f = self.fault
        return f is not None and f.kind == kind and (f.rank is None or f.rank == self.rank)

    def wrap_stream(self, stream: Iterator[Any]) -> Iterator[Any]:
        if self.fault is None or self.fault.kind in ("checkpoint_save", "checkpoint_write"):
            return stream
        return self._stream(stream)

    def _stream(self, stream: Iterator[Any]) -> Iterator[Any]:
        for item in stream:
            if self._drawn % self.per_step == 0:
                self.step += 1
            self._drawn += 1
            middle = self._drawn % self.per_step == self.per_step // 2 or self.per_step == 1
            self.nan_active = self.fault is not None and self.fault.kind == "nan" and self.step == self.fault.step
            if middle and self.fault is not None and self.step == self.fault.step:
                self._fire()
            yield item

    def _fire(self) -> None:
        f = self.fault
        assert f is not None
        if f.rank is not None and f.rank != self.rank:
            return
        note = f"fault-inject: rank {self.rank} {f.kind} at step {f.step} t={time.time():.3f}"
        print(note, file=sys.stderr, flush=True)
        if f.kind == "kill_rank":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.kind == "hang_rank":
            while True:
                time.sleep(3600)
        elif f.kind == "signal":
            os.kill(os.getpid(), getattr(signal, f"SIG{f.signal}"))

    def poison_embedding(self, module: Any) -> None:
        """`nan`: a forward hook on the embedding table that makes step K's activations NaN (training only)."""
        if self.fault is None or self.fault.kind != "nan":
            return
        embed = getattr(getattr(module, "embed", None), "embed_tokens", None)
        if embed is None:
            return

        def hook(mod: Any, _inputs: Any, output: Any) -> Any:
            return output * float("nan") if self.nan_active and mod.training else output

        embed.register_forward_hook(hook)

    def break_checkpoint_write(self, state: Any, step: int) -> None:
        """`checkpoint_write`: this rank's next state-file write (trainer/training_state.py) fails with ENOSPC
        (disk full): the one written now (`write`), or that of the next snapshot (`snapshot`, an asynchronous
        save, whose write runs on the background thread)."""
        if not self.mine("checkpoint_write") or self.fault is None or self.fault.step != step:
            return
        original_write, original_snapshot = state.write, getattr(state, "snapshot", None)

        def disk_full(tmp: Any, rank: int) -> Any:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "state" / f"rank_{rank:05d}.safetensors"))

        def restore() -> None:
            state.write = original_write
            if original_snapshot is not None:
                state.snapshot = original_snapshot

        def failing_write(tmp: Any, rank: int) -> Any:
            restore()
            disk_full(tmp, rank)

        def failing_snapshot(rank: int, *args: Any, **kwargs: Any) -> Any:
            restore()
            snap = original_snapshot(rank, *args, **kwargs)
            snap.write = lambda tmp: disk_full(tmp, rank)
            return snap

        state.write = failing_write
        if original_snapshot is not None:
            state.snapshot = failing_snapshot

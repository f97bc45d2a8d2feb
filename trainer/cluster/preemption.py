"""Preemption: SIGTERM / SIGUSR1 / SIGUSR2 ask the run to checkpoint at the next step boundary and exit 75.

What clusters send before a kill: Slurm sends SIGTERM to every task when a job is preempted or cancelled and
SIGKILL `KillWait` seconds later (default 30); `#SBATCH --signal=USR1@180` adds SIGUSR1 three minutes before the
time limit (scripts/slurm/train.sbatch); submitit (hydra/launcher=slurm) uses SIGUSR2. Our launcher (`python -m
trainer.launch`) forwards these signals to its ranks and waits for them; DeepSpeed's launch.py terminates them
and kills them 30 s later (docs/cluster.md has the table).

The handler only sets a flag (a signal can arrive in the middle of a collective; nothing else is safe there).
At the end of each step the training loop sums the flag over all ranks together with its other stop
conditions (one all-reduce it does anyway), so a signal that reached only some ranks still stops all of them
at the same step. They save a complete checkpoint of that step, skip evaluation, and exit with
EXIT_PREEMPTED (75). The same command then resumes exactly (train.resume=auto).

A handler that was installed before ours (submitit's requeue handler) is called after the checkpoint, so a
submitit job is still requeued the way submitit does it.

The same signal can arrive several times and from several senders (Slurm signals every process of the job step,
and a launcher forwards what it got; srun forwards its own): the handler is idempotent (the first signal is the
one reported), and once the run leaves after a preemption checkpoint, repeats are absorbed until the process
exits instead of killing it on its way out (end_process's barrier, destroying the process group).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionHandler:
    """Installs flag-setting handlers for SIGNALS (main thread only); `restore()` puts the previous ones back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def chain_previous(self) -> None:
        """After the preemption checkpoint: call the handler that was installed before ours for the received signal,
        if it is a Python one (submitit's: it requeues the job and exits); SIG_DFL / SIG_IGN are not called.
        Python handlers are put back; where the previous one was SIG_DFL / SIG_IGN ours stays, so that a repeat of
        the signal (another sender, a launcher forwarding it) cannot kill the process while it leaves."""
        previous: Callable[..., Any] | int | None = self._previous.get(self.received) if self.received else None
        for sig, handler in self._previous.items():
            if callable(handler):
                signal.signal(sig, handler)
        self._previous.clear()
        if callable(previous):
            previous(int(self.received), None)

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

"""Non-finite losses: `train.on_nonfinite=skip|stop` (docs/cluster.md).

The decision must be taken before the optimizer applies the step, on every rank alike. DeepSpeed's ZeRO
stage 1/2 optimizer already does exactly that in its `step()`: it computes the global gradient norm (reduced
over the data- and pipeline-parallel groups), and when it is inf or NaN it zeroes the gradients, leaves
weights, optimizer moments and the LR schedule untouched, and counts `engine.skipped_steps` (for bf16 when
`bf16.check_grad_overflow` is on, DeepSpeed's default; for fp32 always). A NaN loss makes every gradient NaN,
so the ZeRO optimizer skips its step on all ranks together. This module
  - checks at start-up that the engine's optimizer is such a ZeRO optimizer when `skip` is asked for (ZeRO-0
    would apply a NaN update: that is a config error, exit 2);
  - after each step reads whether DeepSpeed skipped it and whether the data-parallel mean loss is finite, and
    decides: `skip` continues (the step's data is consumed, its update and router-bias update are not applied,
    `train/skipped_steps` counts it; after `train.max_consecutive_skips` skipped steps in a row the run stops),
    `stop` raises NonFiniteLoss: no checkpoint is written, so the last good one stays `latest`, exit 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError

POLICIES = ("skip", "stop")


class NonFiniteLoss(Exception):
    """The run stops on a non-finite loss or gradient (exit code 4, see trainer/cluster/exit_codes.py)."""


@dataclass(frozen=True)
class NonFiniteStep:
    skipped: bool  # True: the update was dropped and training goes on; False: the run must stop
    message: str


def optimizer_skips_nonfinite(engine: Any) -> bool:
    """Whether the engine's optimizer refuses a step whose gradient norm is not finite (DeepSpeed ZeRO 1/2)."""
    opt = getattr(engine, "optimizer", None)
    if opt is None or not hasattr(opt, "overflow") or not getattr(opt, "compute_grad_norm", False):
        return False
    import torch

    # DeepSpeed's rule: fp32/fp16 always check; bf16 only with bf16.check_grad_overflow (on by default)
    return getattr(opt, "dtype", None) != torch.bfloat16 or bool(getattr(opt, "check_grad_overflow", False))


class NonFiniteGuard:
    """Per-step bookkeeping of non-finite steps for one run."""

    def __init__(self, engine: Any, policy: str, max_consecutive_skips: int, last_checkpoint: Any = None,
                 say: Callable[[str], None] = print) -> None:
        if policy not in POLICIES:
            raise UserError("train.on_nonfinite", f"unknown policy {policy!r}", "use skip or stop")
        if policy == "skip" and not optimizer_skips_nonfinite(engine):
            raise UserError("train.on_nonfinite", "skip needs an optimizer that drops a step with a non-finite "
                            "gradient norm before applying it (DeepSpeed's ZeRO optimizer), and this engine's does "
                            "not", "set parallel.zero_stage=1 (and keep deepspeed.bf16.check_grad_overflow on), or "
                            "train.on_nonfinite=stop")
        self.engine, self.policy, self.max_skips = engine, policy, max_consecutive_skips
        self.last_checkpoint = last_checkpoint  # callable -> path: the newest complete checkpoint, for messages
        self.say = say  # rank 0's console
        self._seen = int(getattr(engine, "skipped_steps", 0))
        self.skipped_total = 0
        self.consecutive = 0

    def optimizer_skipped(self) -> bool:
        """Whether DeepSpeed dropped the step that just ran (the same answer on every rank)."""
        now = int(getattr(self.engine, "skipped_steps", 0))
        skipped, self._seen = now > self._seen, now
        return skipped

    def check(self, step: int, loss: float, optimizer_skipped: bool) -> NonFiniteStep | None:
        """After step `step`: None if it was a normal step; else what to do (`skip`: continue, else stop)."""
        if math.isfinite(loss) and not optimizer_skipped:
            self.consecutive = 0
            return None
        what = (f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite gradient norm") + \
            f" at step {step}"
        where = f"; the last good checkpoint is {self._last()}" if self.last_checkpoint else ""
        if self.policy == "stop" or not optimizer_skipped:
            why = "" if optimizer_skipped else " and the optimizer applied the step"
            return NonFiniteStep(False, f"train.on_nonfinite: {what}{why}{where}; lower optim.lr or inspect the "
                                 "data of that step, resume with train.resume=auto, or set train.on_nonfinite=skip")
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive > self.max_skips:
            return NonFiniteStep(False, f"train.max_consecutive_skips: {self.consecutive} steps in a row were "
                                 f"non-finite (last: {what}){where}; the run is diverging: lower optim.lr and resume")
        self.say(f"warning: {what}: the optimizer step was skipped (train.on_nonfinite=skip; {self.skipped_total} "
                 "skipped so far)")
        return NonFiniteStep(True, what)

    def _last(self) -> str:
        found = self.last_checkpoint() if callable(self.last_checkpoint) else self.last_checkpoint
        return str(found) if found else "none (no checkpoint was saved yet)"

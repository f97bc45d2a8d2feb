"""What a checkpoint holds of a running schedule, and how it goes back into any layout.

`TrainingState` is the content side of a checkpoint (trainer/checkpoint.py does the atomic files, the manifest,
`latest`): the layout-free tensors of trainer/elastic_state.py (weights, fp32 masters, Adam moments, router
buffers) plus the engine's counters and the LR schedule's position in the index. Loading fills a freshly built
schedule of any layout (dp, pp, ep, schedule) from the slices it owns, then sets the counters and the LR.
RNG states are per rank (trainer/checkpoint.py) and come back only when the world size is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.elastic_state import (
    KINDS,
    ElasticStateError,
    RankSnapshot,
    StateReader,
    read_rank_state,
    snapshot_rank_state,
    write_index,
    write_rank_file,
)
from trainer.errors import UserError


class TrainingState:
    """The checkpointed state of `schedule` (a `StepSchedule`) on this rank."""

    def __init__(self, schedule: Any, dp_rank: int) -> None:
        self.schedule, self.dp_rank = schedule, dp_rank
        self._staging: dict[str, Any] | None = None  # the last snapshot's host copies, reused by the next one

    @property
    def engine(self) -> Any:
        return self.schedule.engine

    def snapshot(self, rank: int, copy: bool = True) -> StateSnapshot:
        """This rank's part of a checkpoint as it is now: its pieces (host copies with `copy`, for a write on
        another thread while training goes on; else views, to be written before the next step) and the
        engine's counters. The host copies live on as the next snapshot's buffers (one copy of the rank's
        state in host memory from the first asynchronous save on): take the next one only once this one is
        written (`Checkpointer` finishes a pending save before it starts another)."""
        holder = self.dp_rank == 0 and self.schedule.primary_copy  # one rank writes each layer's buffers
        rank_state = snapshot_rank_state(rank, self.schedule.rank_model, self.engine.optimizer, self.dp_rank,
                                         holder, copy=copy, reuse=self._staging)
        if copy:
            self._staging = rank_state.tensors
        return StateSnapshot(rank_state, self._counters())

    def write(self, tmp: Path, rank: int) -> tuple[dict[Path, dict[str, Any]], dict[str, Any]]:
        """This rank's pieces, written now -> ({the file written: its manifest entry}, its index entries)."""
        return self.snapshot(rank, copy=False).write(tmp)

    def publish(self, tmp: Path, everyone: list[dict[str, Any]]) -> list[Path]:
        """Rank 0: the index of every rank's pieces, with the engine's counters."""
        return StateSnapshot(None, self._counters()).publish(tmp, everyone)

    def _counters(self) -> dict[str, int]:
        engine = self.engine
        return {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                "skipped_steps": int(getattr(engine, "skipped_steps", 0))}

    def load(self, path: Path, step: int, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
        """Fill this rank's model and optimizer from `path` (any layout); returns the index's extras.
        `kinds` without the optimizer's (`param` only): the weights alone, the optimizer starts fresh."""
        try:
            # Adam's step count is the updates applied: DeepSpeed skips the optimizer (and the LR scheduler) on a
            # non-finite step but counts it in global_steps
            skipped = int(StateReader(path).index.get("engine", {}).get("skipped_steps", 0))
            reader = read_rank_state(path, self.schedule.rank_model, self.engine.optimizer, step - skipped,
                                     kinds=kinds)
        except ElasticStateError as e:
            where, _, why = str(e).partition(": ")
            raise UserError(where, why, "restore the checkpoint's files, or resume from another checkpoint") from None
        return {k: v for k, v in reader.index.items() if k not in ("tensors", "buffers")}

    def restore_counters(self, extras: dict[str, Any], step: int) -> None:
        """The engine's step counters and the LR schedule at `step` (a LambdaLR: its value depends on the step
        alone, so it is recomputed, whatever the number of parameter groups of the new layout)."""
        engine = self.engine
        counters = extras.get("engine", {})
        engine.global_steps = int(counters.get("global_steps", step))
        engine.global_samples = int(counters.get("global_samples", step * engine.train_batch_size()))
        engine.skipped_steps = int(counters.get("skipped_steps", 0))
        scheduler = engine.lr_scheduler
        if scheduler is not None:
            scheduler.last_epoch = step - engine.skipped_steps  # the scheduler does not step on a skipped step
            lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR: the value at a step is a closed form
            if lambdas is not None:
                lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, lambdas)]
                for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                    group["lr"] = lr
                scheduler._last_lr = list(lrs)


class StateSnapshot:
    """One rank's checkpoint content frozen at a step: `write` (any thread) puts its file under a checkpoint
    directory, `publish` (rank 0, after every rank's write) adds the index with the counters of that step."""

    def __init__(self, rank_state: RankSnapshot | None, counters: dict[str, int]) -> None:
        self.rank_state, self.counters = rank_state, counters

    def write(self, tmp: Path) -> tuple[dict[Path, dict[str, Any]], dict[str, Any]]:
        """-> ({the file written (fsynced): its manifest entry}, this rank's index entries)."""
        assert self.rank_state is not None
        path, entry = write_rank_file(tmp, self.rank_state)
        return {path: entry}, self.rank_state.entries

    def publish(self, tmp: Path, everyone: list[dict[str, Any]]) -> list[Path]:
        return [write_index(tmp, everyone, {"engine": self.counters})]

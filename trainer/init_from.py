"""Starting a new run from a checkpoint, as distinct from resuming it (`train.init_from`).

A resume continues the same trajectory and must refuse what would change it (trainer/job.py). A new run from
a checkpoint (fine-tuning, the long-context extension phases after pre-training) takes the weights and router
biases, and with `train.init_optimizer=true` the fp32 masters and Adam moments, while everything a resume would
keep starts fresh: step count, data position, learning-rate schedule, RNG. It may change sequence length,
batch, YaRN and the schedule; not the model's shape. Megatron's `--finetune` / `--no-load-optim` and
torchtitan's `initial_load_path` do the same. A checkpoint of the run itself takes precedence, so a requeued
fine-tuning job resumes where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import JobConfig
from trainer.errors import UserError


def init_point(job: JobConfig) -> Path | None:
    """The checkpoint `train.init_from` names, verified (collective: every rank calls it), or None."""
    if job.train.init_from is None:
        return None
    from trainer.checkpoint import is_layout_free, model_shape_changes, resolve_intact

    try:
        path = resolve_intact(job.train.init_from)
    except FileNotFoundError as e:
        raise UserError("train.init_from", str(e), "pass a checkpoint, checkpoints or run directory") from None
    if not is_layout_free(path):
        raise UserError("train.init_from", f"{path} is an older checkpoint (DeepSpeed's per-layout files)",
                        "resume its run once (its next checkpoint is layout-free), then start from that one")
    changes = model_shape_changes(path, job.model.to_dict())
    if changes:
        saved = ", ".join(f"model.{k}={old}" for k, old, _ in changes)
        raise UserError("train.init_from", f"{path} holds a model with {saved}, this run's differs",
                        f"set {saved}, or start from another checkpoint")
    return path


def initialise(path: Path, state: Any, with_optimizer: bool) -> str:
    """Load the weights (and optimizer state) of `path` into this rank's fresh schedule; the line to log."""
    from trainer.checkpoint import read_meta
    from trainer.elastic_state import KINDS

    step = int(read_meta(path)["step"])
    state.load(path, step, KINDS if with_optimizer else ("param",))
    carried = "weights, router biases" + (", fp32 masters and Adam moments" if with_optimizer else "")
    reset = "step count, data position, learning-rate schedule, RNG" + ("" if with_optimizer else ", optimizer")
    return f"initialised from {path} (step {step}): carried over {carried}; reset {reset}"

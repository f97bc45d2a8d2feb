"""How one training step runs: the `parallel.schedule` switch.

    none       the plain DeepSpeedEngine: every rank holds the whole model; data parallel with ZeRO-1;
               gradient accumulation over the step's microbatches (`build_schedule`).
    1f1b       DeepSpeed's own PipelineEngine, one stage per pipe rank (parallel/deepspeed_1f1b.py)
    dualpipe   bidirectional DualPipe: two stage copies per rank (parallel/dualpipe_engine.py)
    dualpipev  DualPipeV: stages r and 2pp-1-r on rank r (parallel/dualpipe_engine.py)

The pipeline schedules are built by `build_pipeline_schedule`. Every schedule offers the same small
interface (`StepSchedule`):
`engine` (the DeepSpeed engine: checkpoints, learning rate, grad norm), `module` (this rank's model) and
`train_batch(batches)`, which runs one global step (all microbatches, backward, optimizer step) and returns
this rank's mean losses. The trainer does the rest (router bias update, metrics, evaluation, checkpoints)
identically for every schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

SCHEDULES = ("none", "1f1b", "dualpipe", "dualpipev")
PIPELINES = ("1f1b", "dualpipe", "dualpipev")


@dataclass
class StepLosses:
    """This rank's losses for one step, each the mean over its microbatches (detached scalars, on the model's
    device: reading them is the caller's choice of synchronisation point)."""

    loss: torch.Tensor  # what backward ran on: lm + weighted mtp + balance
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]
    balance_loss: torch.Tensor
    microbatches: int


class StepSchedule(Protocol):
    engine: Any  # the DeepSpeed engine (save/load checkpoints, lr, grad norm, global_steps)

    @property
    def module(self) -> nn.Module: ...

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses: ...


def _mean_losses(outputs: list[Any]) -> StepLosses:
    """Average ModelOutput losses over microbatches (detached, on the model's device)."""
    n = len(outputs)
    device = outputs[0].loss.device

    def mean(values: list[torch.Tensor | None]) -> torch.Tensor:
        vals = [v.detach().float() for v in values if v is not None]
        return torch.stack(vals).sum() / n if vals else torch.zeros((), device=device)

    depth = len(outputs[0].mtp_losses)
    return StepLosses(
        loss=mean([o.loss for o in outputs]),
        lm_loss=mean([o.lm_loss for o in outputs]),
        mtp_losses=[mean([o.mtp_losses[k] for o in outputs]) for k in range(depth)],
        balance_loss=mean([o.balance_loss for o in outputs]),
        microbatches=n,
    )


class DataParallelSchedule:
    """`none`: forward/backward of each microbatch through the DeepSpeedEngine, which accumulates gradients,
    reduces them over data-parallel ranks (ZeRO-1) and steps the optimizer at the last microbatch."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.device = next(engine.module.parameters()).device

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        engine = self.engine
        engine.train()
        outputs = []
        for _ in range(engine.gradient_accumulation_steps()):
            mb = next(batches)
            out = engine(mb["tokens"].to(self.device), mb["loss_mask"].to(self.device))
            engine.backward(out.loss)
            engine.step()  # an optimizer step only at the gradient-accumulation boundary
            outputs.append(out)
        return _mean_losses(outputs)


def build_schedule(
    name: str,
    model: nn.Module,
    ds_config: dict[str, Any],
    param_groups: list[dict[str, Any]],
    lr_lambda: Callable[[int], float],
    optimizer: Any = None,
) -> StepSchedule:
    """The engine and step runner for `parallel.schedule=name` (validated beforehand by the trainer).
    `optimizer`: a client optimizer (or a callable of the parameter groups) instead of the config's."""
    import deepspeed

    if name == "none":
        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe

        # expert parallelism (a model sharded by parallel.expert_shard.shard_experts, expert params marked): the ZeRO
        # optimizer gets DeepSpeed's expert groups; a full model initializes exactly as before
        with deepspeed_moe_support(model):
            engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=param_groups, config=ds_config, lr_scheduler=scheduler,
                optimizer=optimizer,
            )
        if getattr(engine, "has_moe_layers", False):
            finish_deepspeed_moe(engine)
        return DataParallelSchedule(engine)
    if name in PIPELINES:
        raise ValueError(f"parallel.schedule={name} is a pipeline: build it with build_pipeline_schedule")
    raise ValueError(f"unknown parallel.schedule {name!r}; one of {SCHEDULES}")


def build_pipeline_schedule(
    name: str,
    model_cfg: Any,
    topo: Any,
    microbatches: int,
    micro_batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    ds_config: dict[str, Any],
    param_groups_fn: Callable[[nn.Module], list[dict[str, Any]]],
    lr_lambda: Callable[[int], float],
    record_timeline: bool = False,
    defer_w: bool = True,
    gemm_backend_fn: Callable[[nn.Module], object] | None = None,
    precision_context: Callable[[int, int], Any] | None = None,
    optimizer: Any = None,
) -> StepSchedule:
    """The engine and step runner of a pipeline schedule; `topo` is a built `PipelineTopology`. The rank builds
    only its own stages (per-parameter seeding gives the single-process weights). `gemm_backend_fn(model)`
    sets the GEMM numerics of the stage model (FP8), `precision_context(chunk, mb)` wraps every forward
    piece (FP8 autocast), `optimizer` replaces the config's (dualpipe / dualpipev only)."""
    args = (model_cfg, topo, microbatches, micro_batch_size, seq_len, device, dtype, ds_config, param_groups_fn,
            lr_lambda)
    if name == "1f1b":
        from parallel.deepspeed_1f1b import build_1f1b_schedule

        if gemm_backend_fn is not None or precision_context is not None or optimizer is not None:
            raise ValueError("parallel.schedule=1f1b takes no GEMM backend, precision context or client optimizer")
        return build_1f1b_schedule(*args, record_timeline=record_timeline)
    if name in ("dualpipe", "dualpipev"):
        from parallel.dualpipe_engine import PipelineSchedule
        from parallel.runtime import _no_context

        return PipelineSchedule(name, *args, record_timeline=record_timeline, defer_w=defer_w,
                                precision_context=precision_context or _no_context,
                                gemm_backend_fn=gemm_backend_fn, optimizer=optimizer)
    raise ValueError(f"parallel.schedule={name} is not a pipeline schedule; one of {PIPELINES}")

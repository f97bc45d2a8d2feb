"""How one training step runs: the interface every `parallel.schedule` implements, and the record it is built from.

    none       the plain DeepSpeedEngine: every rank holds the whole model (or its expert shard); data parallel
               with ZeRO-1, gradient accumulation over the step's microbatches (parallel/data_parallel.py)
    1f1b       DeepSpeed's own PipelineEngine, one stage per pipe rank (parallel/deepspeed_1f1b.py)
    dualpipe   bidirectional DualPipe: two stage copies per rank (parallel/dualpipe_engine.py)
    dualpipev  DualPipeV: stages r and 2pp-1-r on rank r (parallel/dualpipe_engine.py)

`SCHEDULES` is the one list of what the trainer can run (the instruction generators of parallel/schedules.py
also know `zb1p`, which only the simulator uses). A schedule is built from this rank's model, already cut,
sharded and given its numerics (parallel/rank_model.py), and one `PipelineSpec`; parallel/registry.py maps
names to classes. The trainer then drives every schedule through `StepSchedule` alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from model.transformer import MicroBatch
from parallel.network_model import timeline_now
from parallel.runtime import PrecisionContext, TimelineEvent, no_context
from parallel.topology import PipelineTopology

SCHEDULES = ("none", "1f1b", "dualpipe", "dualpipev")
PIPELINES = ("1f1b", "dualpipe", "dualpipev")  # the schedules that cut the model into stages
DUALPIPES = ("dualpipe", "dualpipev")  # ours: split backward, overlapped F&B pairs, EP sub-steps, FP8


@dataclass
class PipelineSpec:
    """Everything a step schedule needs besides the model, as plain values.

    `param_groups` are the optimizer groups of this rank's model (decay / no decay / expert groups); `optimizer`
    is a client optimizer factory (groups -> Optimizer) or None for the DeepSpeed config's own;
    `precision_context(chunk, microbatch)` wraps every forward piece (Transformer Engine's autocast per stage
    per microbatch)."""

    name: str
    topo: PipelineTopology
    microbatches: int  # per step and pipeline replica (gradient accumulation steps under `none`)
    micro_batch_size: int
    seq_len: int
    ds_config: dict[str, Any]
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    lr_lambda: Callable[[int], float] | None = None
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    defer_w: bool = True  # dualpipe / dualpipev: weight-gradients deferred to fill bubbles
    overlap_ep: bool = True  # dualpipe / dualpipev: EP blocks as overlapped sub-steps (False: the plain layers)
    ep_two_hop_ranks_per_node: int | None = None  # two-hop expert dispatch over nodes of this many EP ranks
    record_timeline: bool = False
    precision_context: PrecisionContext = no_context

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"parallel.schedule: unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")

    def lr_scheduler(self) -> Callable[[torch.optim.Optimizer], Any] | None:
        """What `deepspeed.initialize(lr_scheduler=...)` takes: a LambdaLR factory, or None."""
        if self.lr_lambda is None:
            return None
        lr_lambda = self.lr_lambda
        return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


@dataclass
class StepLosses:
    """This rank's losses for one step, each the mean over its microbatches (detached scalars, on the model's
    device: reading them is the caller's choice of synchronisation point)."""

    loss: torch.Tensor  # what backward ran on: lm + weighted mtp + balance
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]
    balance_loss: torch.Tensor
    microbatches: int


OnLastStage = Callable[[int, MicroBatch], None]


class StepSchedule(ABC):
    """What the trainer's loop, evaluation and checkpoints use of a schedule, and nothing else.

    `engine` is the DeepSpeed engine (checkpoints, learning rate, grad norm, global steps); `module` this rank's
    `DeepseekV3` (single-process parameter names; only this rank's stages and experts are materialised)."""

    engine: Any
    topo: PipelineTopology
    spec: PipelineSpec

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def rank_model(self) -> nn.Module:
        """This rank's `DeepseekV3` with single-process names (under 1F1B the pipeline module wraps it)."""
        return self.engine.module

    @property
    def primary_copy(self) -> bool:
        """Whether this rank's stages are the copy a checkpoint takes (False on DualPipe's mirror ranks, which
        hold the same two stages as pipe rank pp-1-p)."""
        return True

    @abstractmethod
    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        """One global step: this rank's microbatches, backward, gradient reduction, optimizer step."""

    @abstractmethod
    def forward_only(self, batches: list[dict[str, torch.Tensor]], on_last_stage: OnLastStage) -> None:
        """Evaluation: every microbatch forward (no gradients, routers not counting); `on_last_stage(i, mb)`
        sees microbatch i with its logits (`mb.logits`) on the rank that computes its loss."""

    def eval_microbatches(self, n: int) -> int:
        """How many microbatches `forward_only` takes for n real ones (the caller pads with masked copies)."""
        return n

    @abstractmethod
    def record_next_step(self) -> None:
        """Time the next `train_batch` (see `take_timeline`)."""

    @abstractmethod
    def take_timeline(self) -> list[TimelineEvent]:
        """The recorded events of this rank, sorted by start; recording off again."""

    @property
    def counts_group(self) -> Any:
        """The ranks holding the same routers: their step counts are summed before the bias update."""
        return self.topo.groups["copies"]

    @property
    def pipe_group(self) -> Any:
        """The ranks of one pipeline replica (None without a pipeline): per-layer counts are gathered there."""
        return self.topo.groups["pipe"] if self.topo.pp > 1 else None


def mean_losses(outputs: list[Any]) -> StepLosses:
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


class EventClock:
    """Host-clock timing of named compute intervals while recording (schedules without a runtime timeline)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.recording, self.events = rank, False, []

    def time(self, label: str, kind: str, chunk: int, fn: Callable[[], Any]) -> Any:
        if not self.recording:
            return fn()
        start = timeline_now()
        out = fn()
        self.events.append(TimelineEvent(self.rank, start, timeline_now(), label, kind, chunk))
        return out

    def start(self) -> None:
        self.events, self.recording = [], True

    def take(self) -> list[TimelineEvent]:
        self.recording = False
        events, self.events = self.events, []
        return sorted(events, key=lambda e: e.start)

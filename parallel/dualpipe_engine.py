"""DualPipe / DualPipeV as a DeepSpeed engine.

Design (see docs/pipeline.md): we subclass nothing. `deepspeed.initialize` builds a plain DeepSpeedEngine
around this rank's part of the model (a `DeepseekV3` pruned to the rank's stages, so parameter names stay the
single-process names); our runtime executes the schedule's instructions (forward, input-gradient, weight-
gradient, overlapped pairs, point-to-point), and the engine then does what it is good at: ZeRO-1 gradient
reduction over the data-parallel group, fp32 master weights, clipping, the LR schedule, the optimizer step
and checkpoints. DeepSpeed's `PipelineEngine` is not extended because its instruction set has no weight-
gradient pass and its module partitioning cannot express two stages per rank in both directions.

DualPipe keeps two copies of every stage (pipe ranks p and pp-1-p): after the runtime, their gradients are
summed over the mirror pair, so both copies take the identical optimizer step; the copies on the second half
of the pipeline are marked `ds_pipe_replicated`, so DeepSpeed's global grad norm counts each stage once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.gemm import defer_weight_grads
from model.transformer import DeepseekV3
from parallel.instructions import Placement
from parallel.p2p import P2P
from parallel.runtime import PipelineRuntime, PrecisionContext, StepResult, TimelineEvent, _no_context
from parallel.schedules import build_schedule as build_instructions
from parallel.stages import Stage, check_divisible, stage_pieces
from parallel.step_schedule import StepLosses
from parallel.topology import PipelineMpu, PipelineTopology
from parallel.weight_grad import WeightGradStore


class _Absent(nn.Module):
    """Stands in for a decoder block another pipeline rank holds."""


def build_stage_model(cfg: ModelConfig, stage_ids: list[int], num_stages: int, device: torch.device) -> DeepseekV3:
    """The model with only `stage_ids` materialised: built on the meta device, pruned, then initialised.

    Per-parameter seeding (DeepseekV3.reset_parameters) gives exactly the single-process weights.
    """
    check_divisible(cfg, num_stages)
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    per = cfg.num_hidden_layers // num_stages
    held_layers = {i for s in stage_ids for i in range(s * per, (s + 1) * per)}
    for i in range(cfg.num_hidden_layers):
        if i not in held_layers:
            model.layers[i] = _Absent()
    if 0 not in stage_ids:
        model.embed = _Absent()
    if num_stages - 1 not in stage_ids:
        model.head = _Absent()
    elif 0 not in stage_ids and cfg.num_nextn_predict_layers:
        raise ValueError("the MTP modules need the embedding on the head's rank (use dualpipe or dualpipev)")
    model.to_empty(device=device)
    model.reset_parameters()
    return model


class PipelineSchedule:
    """The `StepSchedule` of `dualpipe` / `dualpipev` (see parallel/schedule.py for the interface)."""

    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        topo: PipelineTopology,
        microbatches: int,
        micro_batch_size: int,
        seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        ds_config: dict[str, Any],
        param_groups_fn: Callable[[nn.Module], list[dict[str, Any]]],
        lr_lambda: Callable[[int], float] | None = None,
        defer_w: bool = True,
        precision_context: PrecisionContext = _no_context,
        record_timeline: bool = False,
        gemm_backend_fn: Callable[[nn.Module], object] | None = None,
        optimizer: Any = None,
        overlap_ep: bool = True,
    ) -> None:
        import deepspeed

        self.name, self.cfg, self.topo, self.microbatches = name, cfg, topo, microbatches
        self.placement = Placement(name, topo.pp)
        chunks = range(self.placement.chunks_per_rank)
        stage_ids = [self.placement.stage(topo.pipe_rank, c) for c in chunks]
        model = build_stage_model(cfg, stage_ids, self.placement.num_stages, torch.device("cpu"))
        model = model.to(device=device, dtype=dtype)
        model.restore_router_precision()
        if topo.ep > 1:  # this rank keeps its E/ep experts of every MoE layer it holds
            from parallel.expert_groups import mark_expert_params, register_expert_groups
            from parallel.expert_shard import ExpertShardRole, set_expert_shard_role, shard_experts

            ep = register_expert_groups(topo.ep, topo.ep_rank, (topo.groups["ep"], topo.group_ranks["ep"]),
                                        (topo.groups["expert_data"], topo.group_ranks["expert_data"]))
            shard_experts(model, ep.ep_rank, ep.ep_size, ep.ep_group)
            mark_expert_params(model, ep.name)
            # DualPipe's pipe ranks p and pp-1-p hold the same two stages: one file set, under the smaller index
            file_rank = min(topo.pipe_rank, topo.pp - 1 - topo.pipe_rank) if name == "dualpipe" else topo.pipe_rank
            set_expert_shard_role(model, ExpertShardRole(
                pipe_rank=file_rank, writer=topo.dp_rank < topo.ep and file_rank == topo.pipe_rank))
        if gemm_backend_fn is not None:  # e.g. FP8: set each layer's numerics before the W split copies them
            gemm_backend_fn(model)
        self.store = WeightGradStore()
        defer_weight_grads(model, self.store)
        if name == "dualpipe" and topo.pipe_rank >= topo.pp // 2:
            for p in model.parameters():
                p.ds_pipe_replicated = True  # the mirror rank's copy is the one counted in the grad norm

        ds_config = dict(ds_config)
        per_rank = micro_batch_size * microbatches
        ds_config.update(train_batch_size=per_rank * topo.dp, train_micro_batch_size_per_gpu=per_rank,
                         gradient_accumulation_steps=1)
        scheduler = None
        if lr_lambda is not None:
            def scheduler(optimizer):
                return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe

        with deepspeed_moe_support(model):  # expert parameters: ZeRO-1 over the expert-DP groups
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=param_groups_fn(model), config=ds_config, mpu=PipelineMpu(topo),
                lr_scheduler=scheduler, optimizer=optimizer,
            )
        if getattr(self.engine, "has_moe_layers", False):
            finish_deepspeed_moe(self.engine)
        # the gradients are produced outside engine.backward: let ZeRO build its reduction buffers itself
        self.engine.pipeline_parallelism = True
        stages = {c: Stage(stage_pieces(model, s, self.placement.num_stages), s, self.placement.num_stages,
                           overlap_ep=overlap_ep)
                  for c, s in zip(chunks, stage_ids)}
        p2p = P2P(topo.pipe_ranks(), topo.groups["pipe"]) if topo.pp > 1 else None
        self.runtime = PipelineRuntime(
            self.placement, topo.pipe_rank, stages, p2p,
            self.store, activation_shape=(micro_batch_size, seq_len, cfg.hidden_size), dtype=dtype, device=device,
            seq_len=seq_len, precision_context=precision_context, record_timeline=record_timeline,
        )
        self.instructions = build_instructions(name, topo.pp, microbatches, defer_w=defer_w)[topo.pipe_rank]
        self.device = device

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def pipe_group(self):
        return self.topo.groups["pipe"] if self.topo.pp > 1 else None

    @property
    def counts_group(self):
        """Ranks holding the same routers: their step counts are summed before the bias update."""
        return self.topo.groups["copies"]

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        self.engine.train()
        data = [next(batches) for _ in range(self.microbatches)]
        result = self.runtime.run(self.instructions, data, loss_scale=1.0 / self.microbatches)
        if self.name == "dualpipe":
            self._sum_mirror_grads()
        self._hand_grads_to_zero()
        self.engine.allreduce_gradients()
        self.engine.step()
        return self._reduce_losses(result)

    def _hand_grads_to_zero(self) -> None:
        """Under bf16 with an fp32 accumulation dtype ZeRO reads `param.grad_accum`, which its backward hooks
        fill; our backward runs outside the engine, so fill it here."""
        opt = self.engine.optimizer
        if getattr(opt, "use_grad_accum_attribute", False):
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad_accum = p.grad.to(opt.gradient_accumulation_dtype)

    @torch.no_grad()
    def _sum_mirror_grads(self) -> None:
        params = [p for _, p in sorted(self.module.named_parameters()) if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.topo.groups["mirror"])
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _reduce_losses(self, result: StepResult) -> StepLosses:
        """Sum each microbatch's losses over the pipeline ranks (each lands on exactly one of them)."""
        depth = self.cfg.num_nextn_predict_layers
        vec = torch.zeros(3 + depth, dtype=torch.float64)
        for mb, loss in result.loss.items():
            vec[0] += loss
            vec[1] += result.lm_loss[mb]
            for k, v in enumerate(result.mtp_losses[mb]):
                vec[3 + k] += v
        vec[2] = sum(result.balance_loss.values())
        if self.topo.pp > 1:
            dist.all_reduce(vec, group=self.topo.groups["pipe"])
        vec /= self.microbatches
        return StepLosses(
            loss=(vec[0] + vec[2]).float(), lm_loss=vec[1].float(), mtp_losses=[v.float() for v in vec[3:]],
            balance_loss=vec[2].float(), microbatches=self.microbatches,
        )

    @torch.no_grad()
    def forward_only(self, batches: list[dict[str, torch.Tensor]], on_last_stage=None) -> StepResult:
        """Evaluation through the pipeline: the schedule's forward part over len(batches) microbatches (a
        multiple of 2 x pp is padded by the caller). `on_last_stage(mb, MicroBatch)` sees each microbatch's
        logits on the rank that computes its loss."""
        instrs = build_instructions(self.name, self.topo.pp, len(batches), defer_w=False)[self.topo.pipe_rank]
        was_training = self.module.training
        self.module.eval()
        try:
            return self.runtime.run_forward_only(instrs, batches, on_last_stage=on_last_stage)
        finally:
            self.module.train(was_training)

    def record_next_step(self) -> None:
        """Time every compute instruction and every expert all-to-all of the next `train_batch` (see
        `take_timeline`)."""
        self.runtime.timeline.clear()
        self.runtime.record_timeline = True
        self._a2a_trace: list = []
        for dispatcher in self._dispatchers():
            dispatcher.trace = self._a2a_trace

    def take_timeline(self) -> list:
        """The recorded events of this rank (TimelineEvent), and recording off again. Expert all-to-alls are
        events of kind `all_to_all` from post to the end of the wait; `waited` is the exposed (blocked) part."""
        self.runtime.record_timeline = False
        events, self.runtime.timeline = self.runtime.timeline, []
        for dispatcher in self._dispatchers():
            dispatcher.trace = None
        for c in getattr(self, "_a2a_trace", []):
            events.append(TimelineEvent(self.runtime.rank, c.posted, c.wait_end, c.label, "all_to_all", -1,
                                        c.wait_end - c.wait_start))
        self._a2a_trace = []
        return sorted(events, key=lambda e: e.start)

    def _dispatchers(self) -> list:
        from parallel.dispatcher import AllToAllDispatcher

        return [m.dispatcher for m in self.module.modules()
                if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher)]


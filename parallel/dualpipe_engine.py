"""DualPipe / DualPipeV as a DeepSpeed engine.

Design (see docs/pipeline.md): we subclass nothing. `deepspeed.initialize` builds a plain DeepSpeedEngine
around this rank's part of the model (a `DeepseekV3` pruned to the rank's stages, so parameter names stay the
single-process names); our runtime executes the schedule's instructions (forward, input-gradient, weight-
gradient, overlapped pairs, point-to-point), and the engine then does what it is good at: ZeRO-1 gradient
reduction over the data-parallel group, fp32 master weights, clipping, the LR schedule, the optimizer step
and checkpoints. DeepSpeed's `PipelineEngine` is not extended because its instruction set has no weight-
gradient pass and its module partitioning cannot express two stages per rank in both directions.

DualPipe keeps two copies of every stage (pipe ranks p and pp-1-p): their gradients are summed over the mirror
pair, so both copies take the identical optimizer step; the copies on the second half of the pipeline are
marked `ds_pipe_replicated`, so DeepSpeed's global grad norm counts each stage once. That sum and ZeRO-1's
data-parallel reduction run as one, bucket by bucket while the step's tail still computes
(parallel/grad_reduce.py); ZeRO-1 is handed the reduced gradients (parallel/zero_handoff.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from model.gemm import defer_weight_grads
from model.transformer import DeepseekV3
from parallel.dispatcher import AllToAllDispatcher
from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe, is_expert_param
from parallel.grad_reduce import GradientReducer, ReducePlan
from parallel.instructions import Placement
from parallel.network_model import timeline_now
from parallel.p2p import P2P
from parallel.runtime import STEP_TAIL, PipelineRuntime, StepResult, TimelineEvent
from parallel.schedules import build_instructions
from parallel.stages import Stage, stage_pieces, written_parameters
from parallel.step_schedule import OnLastStage, PipelineSpec, StepLosses, StepSchedule
from parallel.topology import PipelineMpu
from parallel.two_hop import TwoHopDispatcher
from parallel.weight_grad import WeightGradStore
from parallel.zero_handoff import gradient_dtype, hand_local_gradients, hand_reduced_gradients, takes_reduced_gradients


class DualPipeSchedule(StepSchedule):
    """The `StepSchedule` of `dualpipe` / `dualpipev`: our runtime executes the instruction lists, a plain
    DeepSpeedEngine around this rank's model reduces, clips and steps."""

    def __init__(self, model: DeepseekV3, spec: PipelineSpec) -> None:
        import deepspeed

        topo, name = spec.topo, spec.name
        self.spec, self.name, self.cfg, self.topo, self.microbatches = spec, name, model.cfg, topo, spec.microbatches
        self.placement = Placement(name, topo.pp)
        chunks = range(self.placement.chunks_per_rank)
        stage_ids = [self.placement.stage(topo.pipe_rank, c) for c in chunks]
        self.store = WeightGradStore()
        defer_weight_grads(model, self.store)  # after the FP8 backend is set: the W split keeps each layer's numerics
        if name == "dualpipe" and topo.pipe_rank >= topo.pp // 2:
            for p in model.parameters():
                p.ds_pipe_replicated = True  # the mirror rank's copy is the one counted in the grad norm

        ds_config = dict(spec.ds_config)
        per_rank = spec.micro_batch_size * spec.microbatches
        ds_config.update(train_batch_size=per_rank * topo.dp, train_micro_batch_size_per_gpu=per_rank,
                         gradient_accumulation_steps=1)
        with deepspeed_moe_support(model):  # expert parameters: ZeRO-1 over the expert-DP groups
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=spec.param_groups, config=ds_config, mpu=PipelineMpu(topo),
                lr_scheduler=spec.lr_scheduler(), optimizer=spec.optimizer,
            )
        if getattr(self.engine, "has_moe_layers", False):
            finish_deepspeed_moe(self.engine)
        # the gradients are produced outside engine.backward: let ZeRO build its reduction buffers itself
        self.engine.pipeline_parallelism = True
        stages = {c: Stage(stage_pieces(model, s, self.placement.num_stages), s, self.placement.num_stages,
                           overlap_ep=spec.overlap_ep)
                  for c, s in zip(chunks, stage_ids)}
        p2p = P2P(topo.pipe_ranks(), topo.groups["pipe"]) if topo.pp > 1 else None
        # ZeRO-1 takes gradients our reduction has averaged over the data ranks (else DeepSpeed reduces them)
        fused = takes_reduced_gradients(self.engine)
        self.reducer = self._gradient_reducer(stages, fused)
        # on one data rank the gradients are their own average: ZeRO-1 skips its bucket copies too
        self.fused_reduction = fused and (self.reducer is not None or topo.dp == 1)
        self.runtime = PipelineRuntime(
            self.placement, topo.pipe_rank, stages, p2p, self.store,
            activation_shape=(spec.micro_batch_size, spec.seq_len // spec.topo.cp, model.cfg.hidden_size),
            dtype=spec.dtype,
            device=spec.device, seq_len=spec.seq_len, precision_context=spec.precision_context,
            record_timeline=spec.record_timeline, gradient_hooks=self.reducer,
        )
        self.instructions = build_instructions(name, topo.pp, spec.microbatches, defer_w=spec.defer_w)[topo.pipe_rank]
        self.last_reduce: dict[str, float] = {}
        self._reduce_events: list[TimelineEvent] = []
        self._tail_events: list[TimelineEvent] = []
        self.device = spec.device
        self._a2a_trace: list = []

    @property
    def primary_copy(self) -> bool:
        return self.name != "dualpipe" or self.topo.pipe_rank < self.topo.pp // 2

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        self.engine.train()
        data = [next(batches) for _ in range(self.microbatches)]
        if self.reducer is not None:
            self.reducer.begin_step()  # nothing left over from a step that raised
        result = self.runtime.run(self.instructions, data, loss_scale=1.0 / self.microbatches)
        tail_start, exposed = timeline_now(), 0.0
        if self.reducer is not None:
            times = self.reducer.finish()
            self.last_reduce, self._reduce_events = times.metrics(), times.timeline(self.runtime.rank)
            exposed = times.exposed_s
        if self.fused_reduction:
            hand_reduced_gradients(self.engine)
        else:
            hand_local_gradients(self.engine)
            self.engine.allreduce_gradients()
        self.engine.step()
        losses = self._reduce_losses(result)
        if self.runtime.record_timeline:  # what follows the pipeline: waiting for the reduction, then compute
            self._tail_events = [TimelineEvent(self.runtime.rank, tail_start, timeline_now(), "step tail", STEP_TAIL,
                                               -1, waited=exposed)]
        return losses

    # ---- gradient reduction in the step's tail (parallel/grad_reduce.py) ----------------------------------
    def _gradient_reducer(self, stages: dict[int, Stage], fused: bool) -> GradientReducer | None:
        """Each chunk's parameters reduced over every rank holding a copy of its stage: with ZeRO-1, the mirror
        pair's copies of all data replicas, averaged (experts: over the replicas holding the same shard); without,
        the mirror sum only (DeepSpeed then reduces over the data ranks). None: nothing for it to do."""
        topo, dualpipe = self.topo, self.name == "dualpipe"
        if not dualpipe and (not fused or topo.dp == 1):
            return None  # DualPipeV on one data rank: nothing to reduce

        chunk_params, shared = self._params_by_chunk(stages)
        plan_chunks = {}
        for chunk, params in chunk_params.items():
            if dualpipe:
                side = "lower" if stages[chunk].stage < topo.pp // 2 else "upper"
                dense = topo.reduce_group(f"grads_{side}" if fused else f"mirror_{side}")
                expert = topo.reduce_group(f"expert_grads_{side}" if fused and topo.ep > 1 else f"mirror_{side}")
            else:
                dense = topo.reduce_group("data")
                expert = topo.reduce_group("expert_data") if topo.ep > 1 else dense
            plan_chunks[chunk] = [(p, expert if is_expert_param(p) else dense) for p in params]
        shared_group = topo.reduce_group(("grads_shared" if fused else "mirror_shared") if dualpipe else "data")
        return GradientReducer(ReducePlan(plan_chunks, [(p, shared_group, chunks) for p, chunks in shared],
                                          divisor=topo.dp if fused else 1,
                                          accum_dtype=gradient_dtype(self.engine) if fused else None))

    def _params_by_chunk(self, stages: dict[int, Stage]) -> tuple[dict[int, list[torch.nn.Parameter]],
                                                                  list[tuple[torch.nn.Parameter, frozenset[int]]]]:
        """Each trainable parameter under the one chunk whose stage holds it, in backward order (the stage's
        last module first; the mirror rank lists the same stage's parameters alike); the parameters several chunks
        write (a tied embedding), with those chunks, in name order."""
        holders: dict[int, set[int]] = {}
        for chunk, stage in stages.items():
            for p in written_parameters(stage):  # the head's chunk writes the embedding's gradient too (MTP)
                holders.setdefault(id(p), set()).add(chunk)
        by_chunk = {c: [p for p in reversed(list(stage.parameters())) if p.requires_grad and holders[id(p)] == {c}]
                    for c, stage in stages.items()}
        rest = [(p, frozenset(holders.get(id(p), ()))) for _, p in sorted(self.module.named_parameters())
                if p.requires_grad and len(holders.get(id(p), ())) != 1]
        return by_chunk, rest

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

    def eval_microbatches(self, n: int) -> int:
        count = max(n, 2 * self.topo.pp)
        return count + count % 2  # dualpipe splits the microbatches between its two directions

    @torch.no_grad()
    def forward_only(self, batches: list[dict[str, torch.Tensor]], on_last_stage: OnLastStage) -> None:
        """Evaluation through the pipeline: the schedule's forward part over len(batches) microbatches."""
        instrs = build_instructions(self.name, self.topo.pp, len(batches), defer_w=False)[self.topo.pipe_rank]
        was_training = self.module.training
        self.module.eval()
        try:
            self.runtime.run_forward_only(instrs, batches, on_last_stage=on_last_stage)
        finally:
            self.module.train(was_training)

    def record_next_step(self) -> None:
        """Time every compute instruction and every expert all-to-all of the next `train_batch` (see
        `take_timeline`)."""
        self.runtime.timeline.clear()
        self.runtime.record_timeline = True
        if self.reducer is not None:
            self.reducer.record = True
        self._a2a_trace = []
        for dispatcher in self._dispatchers():
            dispatcher.trace = self._a2a_trace

    def take_timeline(self) -> list[TimelineEvent]:
        """The recorded events of this rank (TimelineEvent), and recording off again. Expert all-to-alls are
        events of kind `all_to_all` from post to the end of the wait; `waited` is the exposed (blocked) part;
        gradient-reduction buckets are `grad_reduce` events from post to the end of the step's wait for them."""
        self.runtime.record_timeline = False
        if self.reducer is not None:
            self.reducer.record = False
        events, self.runtime.timeline = [*self.runtime.timeline, *self._reduce_events, *self._tail_events], []
        self._reduce_events, self._tail_events = [], []
        for dispatcher in self._dispatchers():
            dispatcher.trace = None
        for c in self._a2a_trace:
            events.append(TimelineEvent(self.runtime.rank, c.posted, c.wait_end, c.label, "all_to_all", -1,
                                        c.wait_end - c.wait_start))
        self._a2a_trace = []
        return sorted(events, key=lambda e: e.start)

    def _dispatchers(self) -> list:
        return [m.dispatcher for m in self.module.modules()
                if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher | TwoHopDispatcher)]


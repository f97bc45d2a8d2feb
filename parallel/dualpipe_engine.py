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

from collections.abc import Iterator

import torch
import torch.distributed as dist

from model.gemm import defer_weight_grads
from model.transformer import DeepseekV3, HeadPiece
from parallel.dispatcher import AllToAllDispatcher
from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe
from parallel.instructions import Placement
from parallel.p2p import P2P
from parallel.runtime import PipelineRuntime, StepResult, TimelineEvent
from parallel.schedules import build_instructions
from parallel.stages import Stage, stage_pieces
from parallel.step_schedule import OnLastStage, PipelineSpec, StepLosses, StepSchedule
from parallel.topology import PipelineMpu
from parallel.two_hop import TwoHopDispatcher
from parallel.weight_grad import WeightGradStore


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
        self.runtime = PipelineRuntime(
            self.placement, topo.pipe_rank, stages, p2p, self.store,
            activation_shape=(spec.micro_batch_size, spec.seq_len // spec.topo.cp, model.cfg.hidden_size),
            dtype=spec.dtype,
            device=spec.device, seq_len=spec.seq_len, precision_context=spec.precision_context,
            record_timeline=spec.record_timeline,
            on_chunk_grads_done=self._reduce_chunk if name == "dualpipe" else None,
        )
        self.instructions = build_instructions(name, topo.pp, spec.microbatches, defer_w=spec.defer_w)[topo.pipe_rank]
        self._chunk_params, self._unowned = self._params_by_chunk(stages)
        self._chunk_groups = {c: topo.groups["mirror_lower" if s < topo.pp // 2 else "mirror_upper"]
                              for c, s in zip(chunks, stage_ids)} if name == "dualpipe" else {}
        self._reductions: list[tuple[list[torch.nn.Parameter], torch.Tensor, object]] = []
        self._posted: set[int] = set()
        self.last_reduce: dict[str, float] = {}
        self.device = spec.device
        self._a2a_trace: list = []

    @property
    def primary_copy(self) -> bool:
        return self.name != "dualpipe" or self.topo.pipe_rank < self.topo.pp // 2

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        self.engine.train()
        data = [next(batches) for _ in range(self.microbatches)]
        self._reductions, self._posted = [], set()  # nothing left over from a step that raised
        result = self.runtime.run(self.instructions, data, loss_scale=1.0 / self.microbatches)
        if self.name == "dualpipe":
            self._finish_mirror_sums()
            self._posted = set()
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

    # ---- DualPipe's mirror gradient sum, overlapped with the step's tail ---------------------------------
    def _params_by_chunk(self, stages: dict[int, Stage]
                         ) -> tuple[dict[int, list[torch.nn.Parameter]], list[torch.nn.Parameter]]:
        """Each trainable parameter under the one chunk whose stage holds it, in name order (the mirror rank
        lists the same stage's parameters alike); a parameter two chunks share (a tied embedding) is left to the
        end of the step, as the two ranks finish their chunks in different orders."""
        holders: dict[int, set[int]] = {}
        for chunk, stage in stages.items():
            # the head's MTP modules read the embedding table through an unregistered reference: the head's chunk
            # writes its gradient too
            shared = [p for m in stage.modules() if isinstance(m, HeadPiece) for p in m.embedding.parameters()]
            for p in [*stage.parameters(), *shared]:
                holders.setdefault(id(p), set()).add(chunk)
        by_chunk: dict[int, list[torch.nn.Parameter]] = {c: [] for c in stages}
        rest: list[torch.nn.Parameter] = []
        for _, p in sorted(self.module.named_parameters()):
            if p.requires_grad:
                chunks = holders.get(id(p), set())
                (by_chunk[next(iter(chunks))] if len(chunks) == 1 else rest).append(p)
        return by_chunk, rest

    @torch.no_grad()
    def _post_sum(self, params: list[torch.nn.Parameter], group) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self._reductions.append((params, flat, dist.all_reduce(flat, group=group, async_op=True)))

    def _reduce_chunk(self, chunk: int) -> None:
        """A chunk's gradients are final: post their sum with the mirror rank's copy of the same stage."""
        if chunk in self._posted:
            raise RuntimeError(f"rank {self.topo.rank}: chunk {chunk}'s mirror sum posted twice in one step")
        self._posted.add(chunk)
        self._post_sum(self._chunk_params[chunk], self._chunk_groups[chunk])

    @torch.no_grad()
    def _finish_mirror_sums(self) -> None:
        """Wait for the chunks' sums (and sum what no chunk owns), then write them back into the gradients.
        `last_reduce`: this step's modelled and exposed seconds of those sums when a network model is installed."""
        if self._posted != set(self._chunk_params):  # every stage copy summed, or the copies would drift apart
            raise RuntimeError(f"rank {self.topo.rank}: mirror sums posted for chunks {sorted(self._posted)}, "
                               f"expected {sorted(self._chunk_params)}")
        self._post_sum(self._unowned, self.topo.groups["mirror"])
        modelled = exposed = 0.0
        for params, flat, work in self._reductions:
            work.wait()
            modelled += getattr(work, "seconds", 0.0)
            exposed += getattr(work, "blocked", 0.0)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        self._reductions = []
        self.last_reduce = {"mirror_reduce_s": modelled, "mirror_reduce_exposed_s": exposed}

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
        self._a2a_trace = []
        for dispatcher in self._dispatchers():
            dispatcher.trace = self._a2a_trace

    def take_timeline(self) -> list[TimelineEvent]:
        """The recorded events of this rank (TimelineEvent), and recording off again. Expert all-to-alls are
        events of kind `all_to_all` from post to the end of the wait; `waited` is the exposed (blocked) part."""
        self.runtime.record_timeline = False
        events, self.runtime.timeline = self.runtime.timeline, []
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


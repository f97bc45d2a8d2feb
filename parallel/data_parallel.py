"""`parallel.schedule=none`: the plain DeepSpeedEngine, every rank holding the whole model (or its expert shard).

Forward and backward of each microbatch go through the engine, which accumulates gradients and steps the
optimizer at the last microbatch. The reduction over the data-parallel ranks (ZeRO-1; expert gradients over the
expert-DP group) overlaps the last microbatch's backward: each parameter's gradient is final once autograd has
accumulated it there (one accumulation per leaf and backward), and the tail reduction (parallel/grad_reduce.py)
posts its bucket as soon as all of the bucket's are; ZeRO-1 is handed the result (parallel/zero_handoff.py).
DeepSpeed's own `overlap_comm` would not overlap here on CPU (the CPU accelerator has no reduction stream). With
bf16 (DeepSpeed's BF16_Optimizer) or one data-parallel rank the engine reduces itself, after the backward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from model.transformer import MicroBatch
from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe, is_expert_param
from parallel.grad_reduce import GradientReducer, ReducePlan
from parallel.runtime import TimelineEvent
from parallel.step_schedule import EventClock, OnLastStage, PipelineSpec, StepLosses, StepSchedule, mean_losses
from parallel.zero_handoff import gradient_dtype, hand_reduced_gradients, takes_reduced_gradients


class DataParallelSchedule(StepSchedule):
    def __init__(self, model: nn.Module, spec: PipelineSpec) -> None:
        import deepspeed

        self.spec, self.topo = spec, spec.topo
        # expert parallelism (a model with marked expert parameters): the ZeRO optimizer gets DeepSpeed's
        # expert groups; a full model initializes exactly as a plain one
        with deepspeed_moe_support(model):
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=spec.param_groups, config=spec.ds_config,
                lr_scheduler=spec.lr_scheduler(), optimizer=spec.optimizer,
            )
        if getattr(self.engine, "has_moe_layers", False):
            finish_deepspeed_moe(self.engine)
        self.module.restore_router_precision()  # DeepSpeed's bf16 cast reaches the router buffers too
        self.device = next(self.module.parameters()).device
        self.clock = EventClock(self.topo.rank)
        self.last_reduce: dict[str, float] = {}
        self._reduce_events: list[TimelineEvent] = []
        self._reducing = False  # inside the step's last backward
        self.reducer = self._gradient_reducer()

    def _gradient_reducer(self) -> GradientReducer | None:
        topo = self.topo
        if topo.dp == 1 or not takes_reduced_gradients(self.engine) or gradient_dtype(self.engine) is not None:
            return None

        dense = topo.reduce_group("data")
        expert = topo.reduce_group("expert_data") if topo.ep > 1 else dense
        params = [p for p in reversed(list(self.module.parameters())) if p.requires_grad]  # roughly backward order
        for p in params:
            p.register_post_accumulate_grad_hook(self._gradient_final)
        self._reduced_params = params
        return GradientReducer(ReducePlan({0: [(p, expert if is_expert_param(p) else dense) for p in params]},
                                          divisor=topo.dp))

    def _gradient_final(self, p: torch.Tensor) -> None:
        if self._reducing:
            self.reducer.weight_final(p)

    def _backward_and_reduce(self, loss: torch.Tensor) -> None:
        """The step's last backward outside the engine (scaled as `engine.backward` scales it), its gradients
        reduced bucket by bucket as autograd finishes them, then handed to ZeRO-1."""
        reducer = self.reducer
        reducer.begin_step()
        reducer.final_pass_begins(0, self._reduced_params)  # none final yet: autograd reports each
        self._reducing = True
        try:
            (loss / self.engine.gradient_accumulation_steps()).backward()
        finally:
            self._reducing = False
        reducer.chunk_done(0)
        times = reducer.finish()
        self.last_reduce, self._reduce_events = times.metrics(), times.timeline(self.topo.rank)
        hand_reduced_gradients(self.engine)

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        engine = self.engine
        engine.train()
        outputs = []
        for mb in range(engine.gradient_accumulation_steps()):
            batch = {k: t.to(self.device) for k, t in next(batches).items()}
            out = self.clock.time(f"F0.{mb}", "F", 0, lambda b=batch: engine(
                b["tokens"], b["loss_mask"], segments=b.get("segments"), positions=b.get("positions")))
            last = mb == engine.gradient_accumulation_steps() - 1
            backward = self._backward_and_reduce if last and self.reducer is not None else engine.backward
            self.clock.time(f"B0.{mb}", "B", 0, lambda o=out, backward=backward: backward(o.loss))
            engine.step()  # an optimizer step only at the gradient-accumulation boundary
            outputs.append(out)
        return mean_losses(outputs)

    @torch.no_grad()
    def forward_only(self, batches: list[dict[str, torch.Tensor]], on_last_stage: OnLastStage) -> None:
        model = self.module
        was_training = model.training
        model.eval()  # also keeps the routers from counting these tokens
        depth = model.cfg.num_nextn_predict_layers
        try:
            for i, batch in enumerate(batches):
                mb = MicroBatch.from_batch(batch, batch["tokens"].shape[1] - 1 - depth, self.device, keep_logits=True)
                model.run_pieces(mb)
                on_last_stage(i, mb)
        finally:
            model.train(was_training)

    def record_next_step(self) -> None:
        self.clock.start()
        if self.reducer is not None:
            self.reducer.record = True

    def take_timeline(self) -> list[TimelineEvent]:
        """The step's compute ops, and the gradient-reduction buckets (`grad_reduce`, post -> end of the wait)."""
        if self.reducer is not None:
            self.reducer.record = False
        events, self._reduce_events = [*self.clock.take(), *self._reduce_events], []
        return sorted(events, key=lambda e: e.start)

    @property
    def counts_group(self) -> None:
        return None  # every rank holds every router: the world

    @property
    def pipe_group(self) -> None:
        return None

"""`parallel.schedule=none`: the plain DeepSpeedEngine, every rank holding the whole model (or its expert shard).

Forward and backward of each microbatch go through the engine, which accumulates gradients, reduces them over
the data-parallel ranks (ZeRO-1; expert gradients over the expert-DP group) and steps the optimizer at the
last microbatch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from model.transformer import MicroBatch
from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe
from parallel.runtime import TimelineEvent
from parallel.step_schedule import EventClock, OnLastStage, PipelineSpec, StepLosses, StepSchedule, mean_losses


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

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        engine = self.engine
        engine.train()
        outputs = []
        for mb in range(engine.gradient_accumulation_steps()):
            batch = {k: t.to(self.device) for k, t in next(batches).items()}
            out = self.clock.time(f"F0.{mb}", "F", 0, lambda b=batch: engine(
                b["tokens"], b["loss_mask"], segments=b.get("segments"), positions=b.get("positions")))
            self.clock.time(f"B0.{mb}", "B", 0, lambda o=out: engine.backward(o.loss))
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

    def take_timeline(self) -> list[TimelineEvent]:
        return self.clock.take()

    @property
    def counts_group(self) -> None:
        return None  # every rank holds every router: the world

    @property
    def pipe_group(self) -> None:
        return None

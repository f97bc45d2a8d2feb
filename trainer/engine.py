"""Build this rank's model and the DeepSpeed engine that trains it (through the `parallel.schedule` switch).

Every rank seeds the same generator before building the model, so all ranks start from the same weights
(DeepSpeed also broadcasts rank 0's parameters). Under bf16 DeepSpeed casts the whole module, buffers
included; the router's bias and its count accumulator are put back to fp32 / fp64 afterwards, because a
bf16 bias cannot absorb the 0.001 updates of the auxiliary-loss-free balancing.
"""

from __future__ import annotations

import logging

import torch

from model.transformer import DeepseekV3
from parallel.step_schedule import PIPELINES, StepSchedule, build_pipeline_schedule, build_schedule
from trainer.config import JobConfig
from trainer.ds_config import build_ds_config, param_groups
from trainer.lr_schedule import make_lr_lambda
from trainer.validate import Layout


def build_model(cfg: JobConfig) -> DeepseekV3:
    torch.manual_seed(cfg.train.seed)
    return DeepseekV3(cfg.model)


def restore_router_buffer_dtypes(model: torch.nn.Module) -> None:
    for router in model.routers():
        router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
        router.step_counts.data = router.step_counts.data.double()


def build_engine(cfg: JobConfig, layout: Layout) -> tuple[StepSchedule, dict]:
    """(step schedule holding the DeepSpeed engine, the DeepSpeed config it was built from)."""
    logging.getLogger("DeepSpeed").setLevel(cfg.logging.deepspeed_log_level.upper())
    if cfg.parallel.schedule in PIPELINES:
        return build_pipeline_engine(cfg, layout)
    model = build_model(cfg)
    if layout.device == "cuda":
        model = model.cuda()
    ds_config = build_ds_config(cfg, layout)
    schedule = build_schedule(
        cfg.parallel.schedule, model, ds_config, param_groups(model, cfg.optim.weight_decay),
        make_lr_lambda(cfg.optim, cfg.train.steps),
    )
    restore_router_buffer_dtypes(schedule.module)
    return schedule, ds_config


def build_pipeline_engine(cfg: JobConfig, layout: Layout) -> tuple[StepSchedule, dict]:
    """A pipeline schedule: this rank builds only its stages (same seed, so the same weights as `build_model`)."""
    import torch.distributed as dist

    from parallel.topology import PipelineTopology

    topo = PipelineTopology(pp=layout.pp, dp=layout.dp, rank=dist.get_rank(),
                            dualpipe=cfg.parallel.schedule == "dualpipe")
    topo.build_groups()
    ds_config = build_ds_config(cfg, layout)
    device = torch.device("cuda", torch.cuda.current_device()) if layout.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if layout.dtype == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)
    schedule = build_pipeline_schedule(
        cfg.parallel.schedule, cfg.model, topo, layout.grad_accum, layout.micro_batch_size, cfg.train.seq_len,
        device, dtype, ds_config, lambda m: param_groups(m, cfg.optim.weight_decay),
        make_lr_lambda(cfg.optim, cfg.train.steps), record_timeline=cfg.parallel.timeline_step > 0,
        defer_w=cfg.parallel.defer_w,
    )
    return schedule, ds_config

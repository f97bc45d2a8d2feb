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
from parallel.schedule import StepSchedule, build_schedule
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

"""Build this rank's model and the DeepSpeed engine that trains it (through the `parallel.schedule` switch).

Every rank seeds the same generator before building the model, so all ranks start from the same weights
(DeepSpeed also broadcasts rank 0's parameters). Under bf16 DeepSpeed casts the whole module, buffers
included; the router's bias and its count accumulator are put back to fp32 / fp64 afterwards, because a
bf16 bias cannot absorb the 0.001 updates of the auxiliary-loss-free balancing.
"""

from __future__ import annotations

import logging

import torch

from model.gemm import GemmBackend
from model.transformer import DeepseekV3
from parallel.step_schedule import PIPELINES, StepSchedule, build_pipeline_schedule, build_schedule
from trainer.config import JobConfig
from trainer.ds_config import build_ds_config
from trainer.lr_schedule import make_lr_lambda
from trainer.optim import client_optimizer, param_groups
from trainer.validate import Layout


def build_model(cfg: JobConfig) -> DeepseekV3:
    torch.manual_seed(cfg.train.seed)
    return DeepseekV3(cfg.model)


def fp8_backend(cfg: JobConfig, amax_group: object = None) -> GemmBackend | None:
    """The FP8 GEMM backend `precision.fp8` asks for (None: FP8 off). TE amaxes reduce over `amax_group`."""
    from model.fp8.factory import make_fp8_backend

    return make_fp8_backend(cfg.precision.fp8, amax_group)


def apply_precision(model: torch.nn.Module, cfg: JobConfig, layout: Layout, amax_group: object = None) -> None:
    """FP8 on the layers that take it. TE modules are built around the parameters, so those are cast to bf16
    first (DeepSpeed's own cast later is then a no-op)."""
    from model.fp8.factory import apply_fp8

    backend = fp8_backend(cfg, amax_group)
    if backend is None:
        return
    if cfg.precision.fp8.backend == "te" and layout.dtype == "bf16":
        model.to(torch.bfloat16)
        model.restore_router_precision()
    apply_fp8(model, backend)
    if cfg.precision.fp8.dispatch:  # expert parallelism: the dispatch rows travel in FP8
        from parallel.dispatcher import set_fp8_dispatch

        set_fp8_dispatch(model, True)


def build_engine(cfg: JobConfig, layout: Layout) -> tuple[StepSchedule, dict]:
    """(step schedule holding the DeepSpeed engine, the DeepSpeed config it was built from)."""
    logging.getLogger("DeepSpeed").setLevel(cfg.logging.deepspeed_log_level.upper())
    if cfg.parallel.schedule in PIPELINES:
        return build_pipeline_engine(cfg, layout)
    model = build_model(cfg)
    if layout.ep > 1:  # expert parallelism: this rank keeps its E/ep experts (parallel/expert_shard.py)
        from parallel.expert_groups import build_expert_groups, mark_expert_params
        from parallel.expert_shard import shard_experts

        ep = build_expert_groups(layout.ep)
        shard_experts(model, ep.ep_rank, ep.ep_size, ep.ep_group, overlap=True)
        mark_expert_params(model, ep.name)
    if layout.device == "cuda":
        model = model.cuda()
    apply_precision(model, cfg, layout)
    ds_config = build_ds_config(cfg, layout)
    schedule = build_schedule(
        cfg.parallel.schedule, model, ds_config, param_groups(model, cfg.optim.weight_decay),
        make_lr_lambda(cfg.optim, cfg.train.steps), optimizer=client_optimizer(cfg),
    )
    schedule.module.restore_router_precision()
    return schedule, ds_config


def build_pipeline_engine(cfg: JobConfig, layout: Layout) -> tuple[StepSchedule, dict]:
    """A pipeline schedule: this rank builds only its stages (same seed, so the same weights as `build_model`)."""
    import torch.distributed as dist

    from parallel.topology import PipelineTopology

    topo = PipelineTopology(pp=layout.pp, dp=layout.dp, rank=dist.get_rank(),
                            dualpipe=cfg.parallel.schedule == "dualpipe", ep=layout.ep)
    topo.build_groups()
    ds_config = build_ds_config(cfg, layout)
    device = torch.device("cuda", torch.cuda.current_device()) if layout.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if layout.dtype == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)
    schedule = build_pipeline_schedule(
        cfg.parallel.schedule, cfg.model, topo, layout.grad_accum, layout.micro_batch_size, cfg.train.seq_len,
        device, dtype, ds_config, lambda m: param_groups(m, cfg.optim.weight_decay),
        make_lr_lambda(cfg.optim, cfg.train.steps), record_timeline=cfg.parallel.timeline_step > 0,
        defer_w=cfg.parallel.defer_w, **_pipeline_precision(cfg, layout, topo.groups["data"]),
    )
    return schedule, ds_config


def _pipeline_precision(cfg: JobConfig, layout: Layout, dp_group: object) -> dict:
    """FP8 and optimizer arguments of a pipeline schedule: the stage model's GEMM backend, TE autocast per
    stage per microbatch with amaxes reduced over the stage's own data-parallel group (never the world:
    a group spanning stages would hang), and the client optimizer."""
    out: dict = {"optimizer": client_optimizer(cfg)}
    if not cfg.precision.fp8.enabled:
        return out
    out["gemm_backend_fn"] = lambda model: apply_precision(model, cfg, layout, dp_group)
    if cfg.precision.fp8.backend == "te":
        from model.fp8.te import autocast_context

        out["precision_context"] = autocast_context(cfg.precision.fp8.recipe, dp_group)
    return out

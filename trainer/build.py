"""Build this rank: topology, model, step schedule, from the job config. One path for every `parallel.schedule`.

    topology   pp x dp process groups (ep inside dp), built by every rank in the same order
    spec       one `PipelineSpec`: the schedule's inputs as plain values (sizes, DeepSpeed config, optimizer)
    model      `build_rank_model`: stages, per-name init, expert shard, FP8 numerics (parallel/rank_model.py)
    schedule   the `StepSchedule` of `parallel.schedule` around a DeepSpeed engine (parallel/registry.py)

Every rank seeds the same generator before building, so all ranks hold the single-process weights (DeepSpeed
also broadcasts rank 0's). The routers' bias and count accumulator stay fp32 / fp64 under bf16, because a
bf16 bias cannot absorb the 0.001 updates of the auxiliary-loss-free balancing.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from model.fp8.factory import make_fp8_backend
from parallel.rank_model import build_rank_model
from parallel.registry import build_step_schedule
from parallel.step_schedule import PipelineSpec, StepSchedule
from parallel.topology import PipelineTopology
from trainer.config import JobConfig
from trainer.ds_config import build_ds_config
from trainer.lr_schedule import make_lr_lambda
from trainer.optim import client_optimizer, param_groups
from trainer.validate import Layout


def build_topology(cfg: JobConfig, layout: Layout) -> PipelineTopology:
    topo = PipelineTopology(pp=layout.pp, dp=layout.dp * layout.cp, rank=dist.get_rank(),
                            dualpipe=cfg.parallel.schedule == "dualpipe", ep=layout.ep, cp=layout.cp)
    topo.build_groups()
    return topo


def precision_context(cfg: JobConfig, topo: PipelineTopology):
    """Transformer Engine's autocast per stage per microbatch, amaxes reduced over the stage's own data-parallel
    group (never the world: a group spanning stages would hang); no context otherwise."""
    from parallel.runtime import no_context

    if not cfg.precision.fp8.enabled or cfg.precision.fp8.backend != "te":
        return no_context
    from model.fp8.te import autocast_context

    return autocast_context(cfg.precision.fp8.recipe, topo.groups["data"])


def build_rank(cfg: JobConfig, layout: Layout) -> tuple[StepSchedule, dict]:
    """(this rank's step schedule holding the DeepSpeed engine, the DeepSpeed config it was built from)."""
    logging.getLogger("DeepSpeed").setLevel(cfg.logging.deepspeed_log_level.upper())
    topo = build_topology(cfg, layout)
    ds_config = build_ds_config(cfg, layout)
    device = torch.device("cuda", torch.cuda.current_device()) if layout.device == "cuda" else torch.device("cpu")
    spec = PipelineSpec(
        name=cfg.parallel.schedule, topo=topo, microbatches=layout.grad_accum,
        micro_batch_size=layout.micro_batch_size, seq_len=cfg.train.seq_len, ds_config=ds_config,
        lr_lambda=make_lr_lambda(cfg.optim, cfg.train.steps), optimizer=client_optimizer(cfg), device=device,
        dtype=torch.bfloat16 if layout.dtype == "bf16" else torch.float32, defer_w=cfg.parallel.defer_w,
        record_timeline=False, precision_context=precision_context(cfg, topo),
        ep_two_hop_ranks_per_node=cfg.parallel.ep_ranks_per_node if cfg.parallel.ep_dispatch == "two_hop" else None,
    )
    torch.manual_seed(cfg.train.seed)
    model = build_rank_model(cfg.model, spec, gemm_backend=make_fp8_backend(cfg.precision.fp8, topo.groups["data"]),
                             fp8_dispatch=cfg.precision.fp8.enabled and cfg.precision.fp8.dispatch)
    spec.param_groups = param_groups(model, cfg.optim.weight_decay)
    return build_step_schedule(model, spec), ds_config

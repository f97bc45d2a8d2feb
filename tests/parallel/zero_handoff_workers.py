"""Worker for tests/parallel/test_zero_handoff.py: DeepSpeed's ZeRO-1 optimizers given gradients made outside
`engine.backward` (`parallel.zero_handoff`: local ones it then reduces, or ones already averaged over the data
ranks) against its own backward and reduction, on 2 ranks (CPU, gloo)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

WIDTHS = (24, 40, 8)  # three parameters of different sizes, so ZeRO's partition boundary cuts through one


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTHS[0], WIDTHS[1]), nn.Tanh(), nn.Linear(WIDTHS[1], WIDTHS[2]))


def _engine(dtype: str, mpu, zero: dict | None = None):
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    model = _model()
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1, **(zero or {})}, "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True}
    if dtype == "bf16":
        config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    return engine


def _loss(engine, rank: int) -> torch.Tensor:
    """Each rank's own batch."""
    torch.manual_seed(100 + rank)
    x = torch.randn(5, WIDTHS[0], dtype=next(engine.module.parameters()).dtype)
    return engine.module(x).float().square().mean()


def run_handoff(rank: int, world: int, dtype: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import safe_get_full_grad

    from parallel.topology import PipelineMpu, PipelineTopology
    from parallel.zero_handoff import (
        gradient_dtype,
        hand_local_gradients,
        hand_reduced_gradients,
        takes_reduced_gradients,
    )

    topo = PipelineTopology(pp=1, dp=world, rank=rank)
    topo.build_groups()
    out = {}
    for way in ("deepspeed", "local", "reduced"):
        engine = _engine(dtype, PipelineMpu(topo))
        if way == "deepspeed":  # the engine's own backward and reduction
            engine.backward(_loss(engine, rank))
        else:
            engine.pipeline_parallelism = True  # gradients made outside engine.backward, as DualPipe's runtime does
            _loss(engine, rank).backward()
            out["optimizer"], out["takes"] = type(engine.optimizer).__name__, takes_reduced_gradients(engine)
        if way == "local":
            hand_local_gradients(engine)
            engine.allreduce_gradients()
        elif way == "reduced":
            dtype_ = gradient_dtype(engine)
            out["own"] = [p.grad.float().clone() for p in engine.module.parameters()]
            for p in engine.module.parameters():  # the average over the data ranks, as parallel/grad_reduce.py
                g = p.grad.to(dtype_ or p.grad.dtype).div_(world)
                dist.all_reduce(g)
                if dtype_ is None:
                    p.grad = g
                else:
                    p.grad_accum = g
            hand_reduced_gradients(engine)
        grads = [safe_get_full_grad(p).float().clone() for p in engine.module.parameters()]
        engine.step()
        out[way] = {"grads": grads, "params": [p.detach().float().clone() for p in engine.module.parameters()]}
    return out


def run_refusal(rank: int, world: int) -> bool:
    """ZeRO-1 with `overlap_comm` reduces inside the backward through its hooks: not handed reduced gradients."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from parallel.topology import PipelineMpu, PipelineTopology
    from parallel.zero_handoff import takes_reduced_gradients

    topo = PipelineTopology(pp=1, dp=world, rank=rank)
    topo.build_groups()
    return takes_reduced_gradients(_engine("fp32", PipelineMpu(topo), {"overlap_comm": True}))

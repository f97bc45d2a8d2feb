"""ZeRO-1's partitioned, flattened AdamW step equals torch's per-tensor AdamW given identical gradients.

On CPU the engine's optimizer is torch's AdamW (`torch_adam`) applied to each rank's slice of the flattened
parameter groups, so this checks the partitioning and flattening (tensors cut across the partition boundary,
padding, the decay / no-decay groups, the all-gather of the updated slices), not the formula. Both sides get the
same gradient, bitwise: every rank backpropagates sum(p * g) with the same g, so ZeRO's average over the two
ranks is exact (halving and adding two equal fp32 numbers rounds nothing). This is the regime the engine tests
avoid (eps = 1e-8, sign-like first steps), on purpose: with identical gradients it is well-conditioned.
"""

from __future__ import annotations

import os

import pytest
import torch

from parallel.spawn import run_ranks
from tests.conftest import tiny_config

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8
U = 2.0**-24  # fp32 unit roundoff


def groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}]


def gradient(name_index: int, p: torch.Tensor, step: int) -> torch.Tensor:
    """A fixed pseudo-random gradient per tensor and step, of a tensor-specific scale (1e-6 .. 1)."""
    g = torch.Generator().manual_seed(1000 * step + name_index)
    scale = 10.0 ** -float(torch.randint(0, 7, (), generator=g))
    return torch.randn(p.shape, generator=g) * scale


def run_zero1_adamw(rank: int, world: int, steps: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    from model.transformer import DeepseekV3

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    cfg = tiny_config(num_hidden_layers=2)
    ds_config = {
        "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": 1}, "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1,
    }
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model), config=ds_config)
    torch.manual_seed(0)
    ref = DeepseekV3(cfg)
    opt = torch.optim.AdamW(groups(ref), lr=LR, betas=BETAS, eps=EPS)
    named, ref_named = list(engine.module.named_parameters()), list(ref.named_parameters())
    initial = [q.detach().clone() for _, q in ref_named]
    for step in range(steps):
        grads = [gradient(i, p, step) for i, (_, p) in enumerate(named)]
        loss = sum((p * g).sum() for (_, p), g in zip(named, grads))  # d loss / d p = g exactly
        engine.backward(loss)
        engine.step()
        for (_, p), g in zip(ref_named, grads):
            p.grad = g.clone()
        opt.step()
    # per tensor: the largest difference in units of the rounding allowed per step on each side: p (1 - lr wd)
    # and p - step round to <= u |p| each, and the step lr m / (sqrt(v) + eps) (<= lr) to a few u
    ratios = {}
    for (name, p), (_, q) in zip(named, ref_named):
        tol = steps * 2 * (2 * U * float(q.abs().max()) + 8 * U * LR)
        ratios[name] = float((p.detach() - q.detach()).abs().max()) / tol
    moved = min(float((q.detach() - q0).abs().max()) for (_, q), q0 in zip(ref_named, initial))
    partitions = [len(group) for group in engine.optimizer.params_in_partition]
    return {"worst": max((v, n) for n, v in ratios.items()), "n": len(ratios), "moved": moved,
            "optimizer": type(engine.optimizer.optimizer).__name__, "params_in_partition": partitions,
            "group_sizes": [len(group) for group in engine.optimizer.bit16_groups]}


@pytest.mark.multiprocess
def test_zero1_partitioned_adamw_equals_per_tensor_adamw():
    reports = run_ranks(2, run_zero1_adamw, 3)
    for rep in reports:
        assert rep["optimizer"] == "AdamW" and rep["n"] > 0
        assert rep["worst"][0] <= 1.0, rep["worst"]
        assert rep["moved"] > 1e-3  # every tensor took its steps (AdamW moves each entry by ~lr per step)
    # each rank holds tensors of both groups, and a tensor of each group is cut at the partition boundary
    for g, size in enumerate(reports[0]["group_sizes"]):
        held = [rep["params_in_partition"][g] for rep in reports]
        assert all(n > 0 for n in held) and sum(held) > size, (g, held, size)

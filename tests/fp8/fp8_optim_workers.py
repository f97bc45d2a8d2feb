"""Worker for the BF16-moments test: a client AdamW under DeepSpeed ZeRO-1 (CPU, gloo)."""

from __future__ import annotations

import os

import torch

from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.parallel.test_zero_partition import U, gradient
from trainer.optim import BF16MomentsAdamW

LR, WD = 1e-2, 0.1


def groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(params):
    return BF16MomentsAdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)


def run_zero1_bf16_moments(rank: int, world: int, steps: int):
    """ZeRO-1 with the client optimizer against the optimizer alone, both fed the same gradients (every rank
    backpropagates sum(p * g) with the same g: ZeRO's average over two ranks is exact), as in
    tests/parallel/test_zero_partition.py."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    cfg = tiny_config(num_hidden_layers=2)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
                 "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model), config=ds_config,
                                           optimizer=make_optimizer)
    torch.manual_seed(0)
    ref = DeepseekV3(cfg).train()
    opt = make_optimizer(groups(ref))
    named, ref_named = list(engine.module.named_parameters()), list(ref.named_parameters())
    for step in range(steps):
        grads = [gradient(i, p, step) for i, (_, p) in enumerate(named)]
        engine.backward(sum((p * g).sum() for (_, p), g in zip(named, grads)))
        engine.step()
        for (_, q), g in zip(ref_named, grads):
            q.grad = g.clone()
        opt.step()
    inner = engine.optimizer.optimizer
    dtypes = sorted({str(v.dtype) for st in inner.state.values() for k, v in st.items() if k.startswith("exp_avg")})
    # Identical fp32 inputs give identical BF16 moments unless the two layouts' fp32 arithmetic differs by an
    # ulp at a BF16 rounding boundary: then a moment moves by one BF16 step (<= 2^-7 of m, 2^-7 of v: 2^-8 of
    # sqrt(v)), the update (<= lr) by <= lr (2^-7 + 2^-8); plus the fp32 rounding of p (1 - lr wd) - update.
    ratios = {}
    for (name, p), (_, q) in zip(named, ref_named):
        tol = steps * (LR * (2**-7 + 2**-8) + 2 * (2 * U * float(q.abs().max()) + 8 * U * LR))
        ratios[name] = float((p.detach() - q.detach()).abs().max()) / tol
    return {"optimizer": type(inner).__name__, "moment_dtypes": dtypes, "worst": max((v, n) for n, v in ratios.items())}

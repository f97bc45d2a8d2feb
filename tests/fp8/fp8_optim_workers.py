"""Worker for the BF16-moments test: a client AdamW under DeepSpeed ZeRO-1 (CPU, gloo)."""

from __future__ import annotations

import os

import torch

from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from trainer.optim import BF16MomentsAdamW

LR, WD = 1e-2, 0.1


def groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(params):
    return BF16MomentsAdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)


def run_zero1_bf16_moments(rank: int, world: int, steps: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    cfg = tiny_config(num_hidden_layers=2)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, cfg.vocab_size, (2, 10), generator=g) for _ in range(steps * world)]

    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    ds_config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
                 "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model), config=ds_config,
                                           optimizer=make_optimizer)
    for s in range(steps):
        out = engine(batches[s * world + rank])
        engine.backward(out.loss)
        engine.step()
    inner = engine.optimizer.optimizer
    dtypes = sorted({str(v.dtype) for st in inner.state.values() for k, v in st.items() if k.startswith("exp_avg")})

    torch.manual_seed(0)
    ref = DeepseekV3(cfg).train()
    opt = make_optimizer(groups(ref))
    for s in range(steps):
        opt.zero_grad()
        loss = sum(ref(batches[s * world + r]).loss for r in range(world)) / world
        loss.backward()
        opt.step()
    diffs = [float((p.detach() - q.detach()).abs().max()) for p, q in zip(engine.module.parameters(), ref.parameters())]
    return {"optimizer": type(inner).__name__, "moment_dtypes": dtypes, "max_param_diff": max(diffs)}

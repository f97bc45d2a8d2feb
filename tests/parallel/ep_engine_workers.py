"""Worker bodies for the expert-parallel DeepSpeed-engine tests: ep ranks with ZeRO-1 through
`deepspeed.initialize` (the trainer's `parallel.schedule=none` path) against single-process AdamW training."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist

from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.parallel import engine_workers
from tests.parallel.engine_workers import LR, WD, reference_steps
from tests.parallel.pipeline_workers import MICRO, make_batches

# Router biases for selection only (scores lie in (0, 1), so +-10 decides): experts 1, 2 and 6 never chosen
# (one empty expert on ep rank 1 and two on ep rank 0 at ep=2), expert 5 always.
BAN, FAVOUR = (1, 2, 6), (5,)


def skew(model: torch.nn.Module) -> None:
    for router in model.routers():
        for e in BAN:
            router.e_score_correction_bias[e] = -10.0
        for e in FAVOUR:
            router.e_score_correction_bias[e] = 10.0


def skewed_model(cfg) -> DeepseekV3:
    model = DeepseekV3(cfg)
    with torch.no_grad():
        skew(model)
    return model


@contextmanager
def skewed_reference():
    """reference_steps builds its own DeepseekV3: give it the same skew."""
    with mock.patch.object(engine_workers, "DeepseekV3", skewed_model):
        yield


def ds_config(world: int, microbatches: int, clip: float) -> dict:
    return {
        "train_batch_size": MICRO * microbatches * world, "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": microbatches,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": 1}, "gradient_clipping": clip, "steps_per_print": 2**31 - 1,
    }


def reference_grad_norm(cfg, batches) -> float:
    """The global grad norm of the first step (initial weights) in one process."""
    torch.manual_seed(0)
    model = skewed_model(cfg).train()
    for b in batches:
        (model(b["tokens"]).loss / len(batches)).backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                       if p.grad is not None])))


def run_ep_engine(rank: int, world: int, ep: int, microbatches: int, steps: int, clip: float, ckpt: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.ep import build_expert_groups, gather_expert_state, mark_expert_params, shard_experts
    from parallel.step_schedule import build_schedule
    from trainer.checkpoint import Checkpointer
    from trainer.ds_config import param_groups
    from trainer.load_balance import moe_routers, update_router_biases

    cfg = tiny_config()
    groups = build_expert_groups(ep)
    torch.manual_seed(0)
    model = skewed_model(cfg)
    shard_experts(model, groups.ep_rank, ep, groups.ep_group, overlap=True)
    n_marked = mark_expert_params(model, groups.name)
    sched = build_schedule("none", model, ds_config(world, microbatches, clip), param_groups(model, WD),
                           lambda step: 1.0)
    all_batches = make_batches(cfg, steps * microbatches * world)
    per_step = [all_batches[s * microbatches * world:(s + 1) * microbatches * world] for s in range(steps)]
    routers = moe_routers(sched.module)
    losses, norms, biases = [], [], []
    for s in range(steps):
        mine = [{**b, "loss_mask": torch.ones_like(b["tokens"], dtype=torch.float32)}
                for b in per_step[s][rank * microbatches:(rank + 1) * microbatches]]
        out = sched.train_batch(iter(mine))
        norms.append(float(sched.engine.get_global_grad_norm()))
        counts = update_router_biases(routers)  # summed over the whole DP group (EP ranks included)
        vec = out.loss.double().clone()
        dist.all_reduce(vec)
        losses.append(float(vec) / world)
        biases.append({i: r.e_score_correction_bias.clone() for i, r in routers.items()})

    # every rank's weights, gathered to the full model (ep ranks 0..ep-1 of the first EP group)
    state = {n: t.detach().clone() for n, t in sched.module.state_dict().items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, state)
    full = gather_expert_state(everyone[:ep])
    with skewed_reference():
        ref_losses, ref_state = reference_steps(cfg, per_step, clip)
    diffs = torch.cat([(t - ref_state[n]).abs().flatten().double() for n, t in full.items()])
    ref_norm = reference_grad_norm(cfg, per_step[0])
    empty = {i: [e for e, c in enumerate(row.tolist()) if c == 0] for i, row in counts.items()}

    # the checkpoint as the trainer writes it (DeepSpeed's files plus our expert shards), through the Checkpointer
    checkpointer = Checkpointer(ckpt, rank, rank, keep_last=2)
    saved = checkpointer.save(sched.engine, steps, {"tokens": 0},
                              {"model_config.json": json.dumps(cfg.to_dict())})
    probe = make_batches(cfg, world, seed=3)[rank]["tokens"]
    sched.module.eval()
    with torch.no_grad():
        logits = sched.module(probe, return_logits=True).logits

    # resume: a fresh engine (other weights) loads the checkpoint; every parameter, experts included, restored
    torch.manual_seed(1)
    fresh = DeepseekV3(cfg)
    shard_experts(fresh, groups.ep_rank, ep, groups.ep_group, overlap=True)
    mark_expert_params(fresh, groups.name)
    sched2 = build_schedule("none", fresh, ds_config(world, microbatches, clip), param_groups(fresh, WD),
                            lambda step: 1.0)
    Checkpointer(ckpt, rank, rank, keep_last=2).load(sched2.engine, saved)
    resumed = sched2.module.state_dict()
    resume_diffs = {n: float((resumed[n] - t).abs().max()) for n, t in state.items() if t.is_floating_point()}
    resume_diff = max(resume_diffs.values())
    return {
        "losses": losses, "ref_losses": ref_losses, "norms": norms, "ref_norm": ref_norm,
        "max_param_diff": float(diffs.max()), "mean_param_diff": float(diffs.mean()), "n": len(full),
        "n_marked": n_marked, "bias_diff": max(float((b - ref_state[f"{name}.e_score_correction_bias"]).abs().max())
                                                for name, b in _bias_names(sched.module, biases[-1]).items()),
        "biases": {i: b.tolist() for i, b in biases[-1].items()}, "empty_last_step": empty,
        "logits": logits.tolist(), "probe": probe.tolist(), "resume_diff": resume_diff,  # no tensors: queue
    }


def _bias_names(model: torch.nn.Module, biases: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{router module name: bias} for the layer-indexed biases."""
    names = {}
    for name, module in model.named_modules():
        if hasattr(module, "e_score_correction_bias"):
            for i, b in biases.items():
                if module is moe_router_of(model, i):
                    names[name] = b
    return names


def moe_router_of(model: torch.nn.Module, layer: int):
    from trainer.load_balance import moe_routers

    return moe_routers(model)[layer]

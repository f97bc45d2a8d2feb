"""Worker bodies for the DeepSpeed-engine pipeline tests (DualPipe / DualPipeV as a DeepSpeed engine)."""

from __future__ import annotations

import os

import torch

from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.parallel.pipeline_workers import MICRO, SEQ, make_batches

LR, WD = 1e-2, 0.1


def assert_params_close(rep: dict, steps: int = 2) -> None:
    """Parameters after `steps` AdamW steps against the single-process run. Gradients agree to fp32
    reassociation, but AdamW's first steps are ~lr * sign(g): an entry whose gradient is itself reassociation
    noise (nearly cancelling terms) can take the opposite step, moving by up to 2 lr per step. So: on average to
    1e-6 (a wrong or missing gradient, or a grad norm missing a stage, moves whole tensors: 5e-5 was seen for
    the latter), at most a handful of entries beyond 1e-4, and none beyond that sign flip."""
    assert rep["mean_param_diff"] <= 1e-6, rep["mean_param_diff"]
    assert rep["outliers"] <= 2, (rep["outliers"], rep["numel"])  # one seen; gradients are compared directly
    # (to 1e-5) in test_pipeline_runtime.py and test_ep_pipeline.py
    assert rep["max_param_diff"] <= 2 * LR * steps, rep["max_param_diff"]


def ds_config(clip: float) -> dict:
    return {
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": 1}, "gradient_clipping": clip, "steps_per_print": 2**31 - 1,
    }


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    keep = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}) if g["params"]]


def build_schedule(name: str, cfg, topo, microbatches: int, ds_config: dict, groups_fn=param_groups,
                   gemm_backend=None, **spec_fields):
    """This rank's model and step schedule as the trainer builds them (parallel/rank_model.py, registry.py)."""
    from parallel.rank_model import build_rank_model
    from parallel.registry import build_step_schedule
    from parallel.step_schedule import PipelineSpec

    spec = PipelineSpec(name=name, topo=topo, microbatches=microbatches, micro_batch_size=MICRO, seq_len=SEQ,
                        ds_config=ds_config, **spec_fields)
    torch.manual_seed(0)
    model = build_rank_model(cfg, spec, gemm_backend)
    spec.param_groups = groups_fn(model)
    return build_step_schedule(model, spec)


def reference_steps(cfg, batches_per_step, clip: float):
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for batches in batches_per_step:
        opt.zero_grad()
        total = 0.0
        for b in batches:
            out = model(b["tokens"])
            (out.loss / len(batches)).backward()
            total += float(out.loss.detach()) / len(batches)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        model.update_router_biases()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.state_dict().items()}


def run_engine(rank: int, world: int, schedule: str, pp: int, microbatches: int, steps: int, clip: float,
               layers: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.topology import PipelineTopology
    from trainer.load_balance import moe_routers, update_router_biases

    cfg = tiny_config(num_hidden_layers=layers)
    dp = world // pp
    topo = PipelineTopology(pp=pp, dp=dp, rank=rank, dualpipe=schedule == "dualpipe")
    topo.build_groups()
    sched = build_schedule(schedule, cfg, topo, microbatches, ds_config(clip))
    all_batches = make_batches(cfg, steps * microbatches * dp)
    # global batch of a step: dp x microbatches samples; data rank d takes its contiguous slice
    per_step = [all_batches[s * microbatches * dp:(s + 1) * microbatches * dp] for s in range(steps)]
    losses = []
    routers = moe_routers(sched.module)
    for s in range(steps):
        mine = per_step[s][topo.dp_rank * microbatches:(topo.dp_rank + 1) * microbatches]
        out = sched.train_batch(iter(mine))
        update_router_biases(routers, group=sched.counts_group)
        # the loop averages over dp
        vec = out.loss.double().clone()
        torch.distributed.all_reduce(vec, group=topo.groups["data"])
        losses.append(float(vec) / dp)
    ref_losses, ref_state = reference_steps(cfg, per_step, clip)
    state = sched.module.state_dict()
    diffs = torch.cat([(t - ref_state[n]).abs().flatten().double() for n, t in state.items()])
    return {"losses": losses, "ref_losses": ref_losses, "max_param_diff": float(diffs.max()),
            "outliers": int((diffs > 1e-4).sum()), "numel": diffs.numel(),
            "mean_param_diff": float(diffs.mean()), "n": len(state)}

"""Worker bodies for the FP8 pipeline tests: the pipeline runtime with emulated FP8 on every stage, against
the single-process model with the same FP8 numerics."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.fp8.emulated import EmulatedFP8Backend
from model.fp8.factory import apply_fp8
from model.gemm import defer_weight_grads
from model.transformer import DeepseekV3
from parallel.instructions import Placement
from parallel.p2p import P2P
from parallel.runtime import PipelineRuntime
from parallel.schedules import build_instructions
from parallel.stages import build_stage
from parallel.weight_grad import WeightGradStore
from tests.conftest import tiny_config
from tests.parallel.pipeline_workers import MICRO, SEQ, make_batches


def fp8_reference(cfg, batches, recipe: str):
    """Single process, no checkpointing, weight-gradients in backward: per-microbatch losses and gradients."""
    torch.manual_seed(0)
    model = DeepseekV3(cfg.__class__(**{**cfg.to_dict(), "activation_checkpointing": False})).train()
    apply_fp8(model, EmulatedFP8Backend(recipe))
    losses = []
    for batch in batches:
        out = model(batch["tokens"])
        (out.loss / len(batches)).backward()
        losses.append(float((out.loss - (out.balance_loss if out.balance_loss is not None else 0)).detach()))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def run_fp8_pipeline(rank: int, world: int, schedule: str, microbatches: int, cfg_overrides: dict, recipe: str):
    cfg = tiny_config(**cfg_overrides)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    apply_fp8(model, EmulatedFP8Backend(recipe))  # before the W split, as PipelineSchedule does
    placement = Placement(schedule, world)
    store = WeightGradStore()
    defer_weight_grads(model, store)
    stages = {c: build_stage(model, placement.stage(rank, c), placement.num_stages)
              for c in range(placement.chunks_per_rank)}
    batches = make_batches(cfg, microbatches)
    runtime = PipelineRuntime(
        placement, rank, stages, P2P(list(range(world))) if world > 1 else None, store,
        activation_shape=(MICRO, SEQ, cfg.hidden_size), dtype=torch.float32, device=torch.device("cpu"), seq_len=SEQ,
    )
    result = runtime.run(build_instructions(schedule, world, microbatches, defer_w=True)[rank], batches,
                         loss_scale=1.0 / microbatches)
    held = {id(p) for s in stages.values() for p in s.parameters()}
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters() if id(p) in held}
    if schedule == "dualpipe":  # mirror copies: sum their gradients
        pairs = [dist.new_group([r, world - 1 - r]) for r in range(world // 2)]
        group = pairs[min(rank, world - 1 - rank)]
        for name in sorted(grads):
            dist.all_reduce(grads[name], group=group)
    ref_losses, ref_grads = fp8_reference(cfg, batches, recipe)
    worst = 0.0
    for name, g in grads.items():
        scale = float(ref_grads[name].abs().max()) + 1e-12
        worst = max(worst, float((g - ref_grads[name]).abs().max()) / scale)
    return {"losses": {mb: (loss, ref_losses[mb]) for mb, loss in result.loss.items()}, "max_grad_diff": worst,
            "checked": len(grads)}

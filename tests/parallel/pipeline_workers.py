"""Worker bodies for the multi-process pipeline tests: run a schedule, compare with the single-process model."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.gemm import defer_weight_grads
from model.transformer import DeepseekV3
from parallel.instructions import Placement
from parallel.p2p import P2P
from parallel.runtime import PipelineRuntime
from parallel.schedules import build_instructions
from parallel.stages import build_stage
from parallel.weight_grad import WeightGradStore
from tests.conftest import tiny_config

SEQ, MICRO = 8, 2


def make_batches(cfg, microbatches: int, seed: int = 7, documents: bool = False) -> list[dict[str, torch.Tensor]]:
    """Random token microbatches; with `documents`, packed documents as the reader gives them (data.document_mask,
    data.restart_positions): a document starts at each position with probability 1/6."""
    g = torch.Generator().manual_seed(seed)
    width = SEQ + 1 + cfg.num_nextn_predict_layers
    batches = [{"tokens": torch.randint(0, cfg.vocab_size, (MICRO, width), generator=g)} for _ in range(microbatches)]
    if documents:
        index = torch.arange(width)
        for b in batches:
            starts = torch.rand(MICRO, width, generator=g) < 1 / 6
            starts[:, 0] = True
            first = torch.where(starts, index, 0).cummax(dim=1).values
            b.update(loss_mask=torch.ones(MICRO, width), segments=starts.long().cumsum(1), positions=index - first)
    return batches


def forward(model, batch: dict[str, torch.Tensor]):
    """The single-process model on a microbatch as the schedules see it (mask and documents when present)."""
    return model(batch["tokens"], batch.get("loss_mask"), segments=batch.get("segments"),
                 positions=batch.get("positions"))


def reference(cfg, batches):
    """The single-process model: mean of per-microbatch losses, its gradients and router counts."""
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    losses = []
    for batch in batches:
        out = forward(model, batch)
        (out.loss / len(batches)).backward()
        losses.append(float((out.loss - (out.balance_loss if out.balance_loss is not None else 0)).detach()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    counts = {n: m.step_counts.clone() for n, m in model.named_modules() if hasattr(m, "step_counts")}
    return losses, grads, counts


def run_pipeline(rank: int, world: int, schedule: str, microbatches: int, cfg_overrides: dict, defer_w: bool):
    cfg = tiny_config(**cfg_overrides)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
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
    instrs = build_instructions(schedule, world, microbatches, defer_w=defer_w)[rank]
    result = runtime.run(instrs, batches, loss_scale=1.0 / microbatches)

    # gradients of the parameters this rank holds, by their full-model name; a DualPipe stage exists on two
    # ranks, and its gradient is the sum of both copies'
    held = {id(p) for s in stages.values() for p in s.parameters()}
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters() if id(p) in held}
    counts = {n: m.step_counts.clone() for n, m in model.named_modules() if hasattr(m, "step_counts")
              and any(id(p) in held for p in m.parameters())}
    if schedule == "dualpipe":
        # ranks r and pp-1-r hold the same two stages (mirror copies): sum their gradients and counts
        pairs = [dist.new_group([r, world - 1 - r]) for r in range(world // 2)]
        group = pairs[min(rank, world - 1 - rank)]
        for table in (grads, counts):
            for name in sorted(table):
                dist.all_reduce(table[name], group=group)
    ref_losses, ref_grads, ref_counts = reference(cfg, batches)
    report = {"losses": {}, "max_grad_diff": 0.0, "checked": 0}
    for mb, loss in result.loss.items():
        report["losses"][mb] = (loss, ref_losses[mb])
    for name, g in grads.items():
        diff = float((g - ref_grads[name]).abs().max())
        scale = float(ref_grads[name].abs().max()) + 1e-12
        report["max_grad_diff"] = max(report["max_grad_diff"], diff / scale)
        report["checked"] += 1
    report["counts_equal"] = all(torch.equal(c, ref_counts[n]) for n, c in counts.items())
    report["names"] = sorted(grads)
    return report

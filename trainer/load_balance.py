"""The auxiliary-loss-free bias update, once per optimizer step, on counts of the whole global batch.

During the step's forwards every MoE router adds its routed-token counts to `step_counts` (all
microbatches). After the optimizer step the counts are summed over the data-parallel group (one all-reduce
of a [moe_layers, experts] fp64 tensor), each router applies b += gamma * sign(mean - load) with those
global counts and clears its accumulator. Every rank thus applies the identical update.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.block import DecoderBlock


def moe_routers(model: nn.Module) -> dict[int, Any]:
    """{layer index: router} for every MoE layer of the model (MTP blocks included)."""
    return {m.layer_idx: m.mlp.gate for m in model.modules() if isinstance(m, DecoderBlock) and m.is_moe}


@torch.no_grad()
def update_router_biases(routers: dict[int, Any], group: Any = None) -> dict[int, torch.Tensor]:
    """All-reduce the step's counts over `group` (sum), update every router's bias; returns the global counts."""
    if not routers:
        return {}
    layers = sorted(routers)
    counts = torch.stack([routers[i].step_counts.to(torch.float64) for i in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    for row, i in zip(counts, layers):
        routers[i].update_bias(counts=row)
    return {i: row.cpu() for row, i in zip(counts, layers)}


def gather_layer_counts(counts: dict[int, torch.Tensor], group: Any = None) -> dict[int, torch.Tensor]:
    """Every layer's global counts on every rank of `group` (a pipeline: each rank holds some layers)."""
    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return counts
    parts: list[dict[int, torch.Tensor] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, counts, group=group)
    merged: dict[int, torch.Tensor] = {}
    for part in parts:
        merged.update(part or {})
    return dict(sorted(merged.items()))

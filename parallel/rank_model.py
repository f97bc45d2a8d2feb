"""This rank's model, built once for every schedule, in a fixed order (as torchtitan applies parallelisms):

    1. stages   which pipeline stages this rank holds (all of them under `none`)
    2. init     `DeepseekV3` on the meta device, pruned to those stages, materialised on the device and
                initialised per parameter name: exactly the single-process weights, in the run's dtype
    3. experts  under `parallel.ep > 1` this rank keeps its E/ep routed experts of every MoE layer, marked
                for DeepSpeed's expert groups, with an all-to-all dispatcher over the topology's EP group
    4. numerics the FP8 GEMM backend on the layers that take it; the FP8 dispatch of expert rows

Parameter names stay the single-process names whatever the layout, which is what checkpoints, the HF export
and the tests against the single-process model rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import ModelConfig
from model.fp8.factory import apply_fp8
from model.gemm import GemmBackend
from model.transformer import DeepseekV3
from parallel.dispatcher import set_fp8_dispatch
from parallel.expert_groups import mark_expert_params, register_expert_groups
from parallel.expert_shard import shard_experts
from parallel.instructions import Placement
from parallel.stages import check_divisible
from parallel.step_schedule import PIPELINES, PipelineSpec
from parallel.topology import PipelineTopology


class _Absent(nn.Module):
    """Stands in for a piece another pipeline rank holds."""


@dataclass(frozen=True)
class RankStages:
    """The stages a rank holds. `tied_embedding`: the last stage also keeps a copy of the embedding table
    (DeepSpeed's 1F1B with MTP: the MTP modules read the table that lives on stage 0)."""

    stage_ids: tuple[int, ...]
    num_stages: int
    tied_embedding: bool = False


def rank_stages(name: str, topo: PipelineTopology, cfg: ModelConfig) -> RankStages:
    if name not in PIPELINES:
        return RankStages((0,), 1)
    placement = Placement(name, topo.pp)
    ids = tuple(placement.stage(topo.pipe_rank, c) for c in range(placement.chunks_per_rank))
    last = placement.num_stages - 1
    if name == "1f1b":
        return RankStages(ids, placement.num_stages, tied_embedding=last in ids and bool(cfg.num_nextn_predict_layers))
    if last in ids and 0 not in ids and cfg.num_nextn_predict_layers:
        raise ValueError("the MTP modules need the embedding on the head's rank (use dualpipe or dualpipev)")
    return RankStages(ids, placement.num_stages)


def build_stage_model(cfg: ModelConfig, stages: RankStages, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """`DeepseekV3` with only the pieces of `stages` materialised, in `dtype` on `device` (the routers' bias
    and counts stay fp32 / fp64)."""
    check_divisible(cfg, stages.num_stages)
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    per = cfg.num_hidden_layers // stages.num_stages
    held = {i for s in stages.stage_ids for i in range(s * per, (s + 1) * per)}
    for i in range(cfg.num_hidden_layers):
        if i not in held:
            model.layers[i] = _Absent()
    if 0 not in stages.stage_ids and not stages.tied_embedding:
        model.embed = _Absent()
    if stages.num_stages - 1 not in stages.stage_ids:
        model.head = _Absent()
    model.to_empty(device=torch.device("cpu"))  # initialise on the CPU: the same numbers on every device
    model.reset_parameters()
    model = model.to(device=device, dtype=dtype)
    model.restore_router_precision()
    return model


def shard_experts_over(model: nn.Module, topo: PipelineTopology, two_hop_ranks_per_node: int | None = None) -> None:
    """Expert parallelism over the topology's EP group: this rank keeps its E/ep experts, marked for ZeRO-1's
    expert-DP groups. `two_hop_ranks_per_node`: the two-hop dispatch over nodes of that many EP ranks."""
    ep = register_expert_groups(topo.ep, topo.ep_rank, (topo.groups["ep"], topo.group_ranks["ep"]),
                                (topo.groups["expert_data"], topo.group_ranks["expert_data"]))
    shard_experts(model, ep.ep_rank, ep.ep_size, ep.ep_group, overlap=True,
                  two_hop_ranks_per_node=two_hop_ranks_per_node, layout_group=topo.groups["ep_layout"])
    mark_expert_params(model, ep.name)


def build_rank_model(cfg: ModelConfig, spec: PipelineSpec, gemm_backend: GemmBackend | None = None,
                     fp8_dispatch: bool = False) -> DeepseekV3:
    """This rank's model for `spec` (the topology's groups must be built). `gemm_backend`: the FP8 numerics
    of the layers that take them (model/fp8/factory.py), None for plain GEMMs; `fp8_dispatch`: expert rows
    travel through the all-to-all in FP8."""
    model = build_stage_model(cfg, rank_stages(spec.name, spec.topo, cfg), spec.device, spec.dtype)
    if spec.topo.ep > 1:
        shard_experts_over(model, spec.topo, spec.ep_two_hop_ranks_per_node)
    if spec.topo.cp > 1:  # each rank holds seq_len / cp positions; attention swaps to heads and back
        from model.sequence_shard import SequenceShard, shard_sequences
        from parallel.context_parallel import UlyssesExchange

        exchange = UlyssesExchange(spec.topo.groups["cp"], spec.topo.cp)
        shard_sequences(model, SequenceShard(spec.topo.cp_rank, spec.topo.cp, exchange))
    if gemm_backend is not None:
        apply_fp8(model, gemm_backend)
    if fp8_dispatch:
        set_fp8_dispatch(model, True)
    return model

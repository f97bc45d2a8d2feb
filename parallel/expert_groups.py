"""DeepSpeed's side of expert parallelism: the EP / expert-DP process groups registered where ZeRO-1 looks
them up, expert parameters marked as DeepSpeed MoE parameters, and the marker module that makes
`deepspeed.initialize` build its expert-aware optimizer for our layers."""


from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.moe import MoE
from parallel.expert_shard import ep_layout, is_expert_key


# ---- DeepSpeed: expert groups, expert parameters, ZeRO-1 ---------------------------------------------------
@dataclass
class ExpertGroups:
    """The groups of `parallel.ep` inside a stage's data-parallel group (parallel/topology.py): EP group = ep
    consecutive data ranks, expert-DP group = the data ranks with the same ep rank. `name` is DeepSpeed's group
    name, which the expert parameters and their optimizer groups carry."""

    name: str
    ep_size: int
    ep_rank: int
    ep_group: Any
    expert_dp_group: Any


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # what deepspeed.utils.groups names them


def register_expert_groups(ep_size: int, ep_rank: int, ep: tuple[Any, list[int]],
                           expert_data: tuple[Any, list[int]]) -> ExpertGroups:
    """Register the topology's `ep` / `expert_data` groups (each (group, ranks)) in deepspeed.utils.groups under
    DeepSpeed's name, where ZeRO and the model broadcast look them up. DeepSpeed's own group builder assumes the
    whole world is data parallel, which a pipeline's world is not: one way for every schedule."""
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    name = expert_group_name(ep_size)
    groups._EXPERT_PARALLEL_GROUP[name], groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep
    groups._EXPERT_DATA_PARALLEL_GROUP[name], groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = expert_data
    return ExpertGroups(name, ep_size, ep_rank, ep[0], expert_data[0])


def mark_expert_params(model: nn.Module, group_name: str) -> int:
    """Mark the routed-expert weights as DeepSpeed MoE parameters (`allreduce=False`, `group_name`): their
    gradients are reduced over the expert-DP group only and ZeRO-1 partitions them there. Returns how many."""
    n = 0
    for name, p in model.named_parameters():
        if is_expert_key(name):
            p.allreduce, p.group_name = False, group_name
            n += 1
    return n


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's `is_moe_param` without importing DeepSpeed."""
    return getattr(p, "allreduce", True) is False


def _deepspeed_moe_marker(num_experts: int, ep_size: int, group_name: str) -> nn.Module:
    """A parameter-free stand-in for `deepspeed.moe.layer.MoE`: DeepSpeedEngine sets up its MoE support (the
    ZeRO optimizer's expert groups) only when it finds an instance of that class in the model."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class _Marker(DeepSpeedMoE):
        def __init__(self) -> None:  # no experts, no gate: nothing of DeepSpeed's layer
            nn.Module.__init__(self)
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = num_experts // ep_size

        def set_deepspeed_parallelism(self, *args: Any, **kwargs: Any) -> None:
            pass  # our groups are registered by register_expert_groups

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the DeepSpeed MoE marker is not a layer")

    return _Marker()


@contextlib.contextmanager
def deepspeed_moe_support(model: nn.Module) -> Iterator[None]:
    """Around `deepspeed.initialize` of a model with marked expert parameters (`mark_expert_params`): a marker
    module makes the engine build its ZeRO optimizer with the expert(-DP) groups; it is removed afterwards.
    The caller then sets `engine.has_moe_layers = False` (see `finish_deepspeed_moe`)."""
    layout = ep_layout(model)
    names = {p.group_name for p in model.parameters() if is_expert_param(p)}
    if layout is None or not names:
        yield
        return
    if len(names) != 1:
        raise ValueError(f"expert parameters carry several DeepSpeed group names: {sorted(names)}")
    n_experts = next(m.cfg.n_routed_experts for m in model.modules() if isinstance(m, MoE))
    model.add_module("_deepspeed_moe_marker", _deepspeed_moe_marker(n_experts, layout[1], names.pop()))
    try:
        yield
    finally:
        del model._deepspeed_moe_marker


def finish_deepspeed_moe(engine: Any) -> None:
    """After `deepspeed.initialize` under `deepspeed_moe_support`: the ZeRO optimizer keeps its MoE groups;
    the engine itself goes back to the plain path, because DeepSpeed's MoE checkpoint code only knows its own
    layer classes (it would save none of our experts). Our experts are saved in the layout-free state
    (trainer/elastic_state.py)."""
    engine.has_moe_layers = False
    engine.num_experts = []

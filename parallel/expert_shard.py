"""Which routed experts a rank holds and how a model and its state dicts are cut into expert shards.

- `shard_experts(model, ep_rank, ep_size, group)` keeps this rank's contiguous slice of every MoE layer's
  experts (same weights, same parameter names) and installs an `AllToAllDispatcher`.
- `gather_expert_state` / `slice_expert_state`: the same sharding on plain state dicts (checkpoints).
- `node_limited_groups`: checks that the router's groups map onto nodes (node-limited routing).
"""


from __future__ import annotations

import functools

import torch
from torch import nn

from model.moe import MoE, RoutedExperts
from parallel.dispatcher import AllToAllDispatcher, expert_range, overlapped_moe_forward

EXPERT_SUFFIXES = ("experts.gate_up_proj.weight", "experts.down_proj.weight")


def is_expert_key(name: str) -> bool:
    """A routed-expert weight (stacked over experts on dim 0); `shared_experts.*` is not one."""
    return any(name == s or name.endswith("." + s) for s in EXPERT_SUFFIXES)


# ---- sharding the model and its state --------------------------------------------------------------------
def _shard_routed(experts: RoutedExperts, lo: int, hi: int) -> RoutedExperts:
    """RoutedExperts for experts [lo, hi) holding the same weights (parameters sliced and copied)."""
    hidden, inter = experts.down_proj.weight.shape[1], experts.intermediate
    with torch.device("meta"):  # no throw-away init of the new weights
        shard = RoutedExperts(hi - lo, hidden, inter, first_expert=experts.first_expert + lo)
    for name in ("gate_up_proj", "down_proj"):
        old, new = getattr(experts, name), getattr(shard, name)
        new.weight = nn.Parameter(old.weight.detach()[lo:hi].clone(), requires_grad=old.weight.requires_grad)
        new.backend = old.backend  # keep FP8 / deferred weight-gradient settings
    return shard


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int, group=None, overlap: bool = False,
                  two_hop_ranks_per_node: int | None = None, layout_group=None) -> nn.Module:
    """In place: every MoE layer keeps experts [ep_rank*E/ep, (ep_rank+1)*E/ep) and gets an AllToAllDispatcher
    over `group` (None: the default group). Parameter names are unchanged; they now hold the local experts.
    `overlap`: the layer's forward becomes `overlapped_moe_forward` (shared experts hidden behind the dispatch
    all-to-all; bitwise the same result). `two_hop_ranks_per_node`: a TwoHopDispatcher over nodes of that many
    EP ranks instead (parallel/two_hop.py; no shared-expert overlap). `layout_group`: the same ranks as `group`
    on a communicator of their own, for the count exchange (default: `group`)."""
    from parallel.two_hop import TwoHopDispatcher

    for name, module in model.named_modules():
        if isinstance(module, MoE):
            n = module.cfg.n_routed_experts
            if module.experts.n_experts != n or module.experts.first_expert != 0:
                raise ValueError("shard_experts expects an unsharded model")
            lo, hi = expert_range(n, ep_rank, ep_size)
            module.experts = _shard_routed(module.experts, lo, hi)
            label = name.removesuffix(".mlp") or "moe"
            if two_hop_ranks_per_node is not None:
                module.dispatcher = TwoHopDispatcher(group, ep_size, ep_rank, n, two_hop_ranks_per_node, label=label)
                continue
            module.dispatcher = AllToAllDispatcher(group, ep_size, ep_rank, n, label=label, layout_group=layout_group)
            if overlap:  # an instance attribute: nn.Module.__call__ looks up self.forward
                module.forward = functools.partial(overlapped_moe_forward, module)
    return model


def ep_layout(model: nn.Module) -> tuple[int, int] | None:
    """(ep_rank, ep_size) of a model sharded by `shard_experts`, None for a full model."""
    for module in model.modules():
        if isinstance(module, MoE) and hasattr(module.dispatcher, "ep_size"):  # one-hop or two-hop
            return module.dispatcher.ep_rank, module.dispatcher.ep_size
    return None


def slice_expert_state(full_state: dict[str, torch.Tensor], ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """The state dict of `ep_rank`'s shard: expert weights sliced (copied, so saving one does not write the
    whole stack), every other entry as is."""
    out = {}
    for name, value in full_state.items():
        if is_expert_key(name):
            lo, hi = expert_range(value.shape[0], ep_rank, ep_size)
            out[name] = value[lo:hi].clone()
        else:
            out[name] = value
    return out


def gather_expert_state(state_dicts_by_ep_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full state dict from every EP rank's shard (in ep-rank order): expert weights concatenated on the
    expert dim; everything else (replicated over EP) taken from ep rank 0."""
    if not state_dicts_by_ep_rank:
        raise ValueError("no state dicts to gather")
    first = state_dicts_by_ep_rank[0]
    for r, sd in enumerate(state_dicts_by_ep_rank[1:], 1):
        if sd.keys() != first.keys():
            raise ValueError(f"ep rank {r}'s state dict has different keys from ep rank 0's")
    return {name: torch.cat([sd[name] for sd in state_dicts_by_ep_rank]) if is_expert_key(name) else value
            for name, value in first.items()}


# ---- node-limited routing --------------------------------------------------------------------------------
def node_limited_groups(ep_size: int, ep_ranks_per_node: int, n_group: int, topk_group: int) -> tuple[int, int]:
    """DeepSeek-V3's node-limited routing is group-limited routing where every router group lives on one node.

    With experts sharded contiguously over ep ranks and ranks contiguous per node, node k holds groups
    [k*G/N, (k+1)*G/N). Returns (nodes, max nodes a token's experts can span = min(topk_group, nodes)).
    Raises ValueError when a router group would straddle two nodes.
    """
    if ep_ranks_per_node < 1 or ep_size % ep_ranks_per_node:
        raise ValueError(f"ep={ep_size} is not a whole number of nodes of {ep_ranks_per_node} ep ranks")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be within [1, n_group={n_group}]")
    nodes = ep_size // ep_ranks_per_node
    if n_group % nodes:
        raise ValueError(
            f"node-limited routing needs each router group on one node: n_group={n_group} is not a multiple of "
            f"the {nodes} nodes of the ep group (ep={ep_size} / {ep_ranks_per_node} per node); set n_group to a "
            f"multiple of {nodes}"
        )
    return nodes, min(topk_group, nodes)

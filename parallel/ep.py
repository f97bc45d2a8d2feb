"""Expert parallelism: each of `ep` ranks holds E/ep routed experts; tokens travel to them by all-to-all.

- `shard_experts(model, ep_rank, ep_size, group)` keeps this rank's contiguous slice of every MoE layer's
  experts (same weights, same parameter names) and installs an `AllToAllDispatcher`.
- `AllToAllDispatcher` implements the `LocalDispatcher` protocol (`dispatch` -> `Dispatched`, `combine`) and an
  overlap-ready split of each all-to-all into post and wait (`dispatch_async` / `combine_async`).
- `gather_expert_state` / `slice_expert_state`: the same sharding on plain state dicts (checkpoint resharding).
- `node_limited_groups`: checks that the router's groups map onto nodes (node-limited routing).

Layout (see docs/expert_parallel.md): a rank sorts its T*K choices by global expert id (so rows for rank 0's
experts come first), exchanges the [ep, E/ep] count matrix, sends rows with uneven splits, and reorders what
it receives from (source rank, local expert) order to expert-major order for the grouped GEMM.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.moe import Dispatched, LocalDispatcher, MoE, RoutedExperts
from model.router import Routing

EXPERT_SUFFIXES = ("experts.gate_up_proj.weight", "experts.down_proj.weight")


def is_expert_key(name: str) -> bool:
    """A routed-expert weight (stacked over experts on dim 0); `shared_experts.*` is not one."""
    return any(name == s or name.endswith("." + s) for s in EXPERT_SUFFIXES)


def expert_range(n_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """[first, last) global expert ids held by `ep_rank`: contiguous, E/ep each."""
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} out of range for ep_size {ep_size}")
    if n_experts % ep_size:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by ep={ep_size}")
    per = n_experts // ep_size
    return ep_rank * per, (ep_rank + 1) * per


# ---- posted all-to-alls and their trace ------------------------------------------------------------------
@dataclass
class CommInterval:
    """One all-to-all as this rank saw it: posted at `posted`, its wait began at `wait_start` and returned at
    `wait_end` (perf_counter seconds). `wait_end - wait_start` is the exposed part; a synchronous call is all
    exposed. Host clock: exact for gloo (CPU), where the wait returns when the data is there; with NCCL the wait
    only orders the compute stream, so on GPUs these intervals understate the exposure (use a CUDA profiler)."""

    label: str
    posted: float
    wait_start: float
    wait_end: float


class PostedAllToAll:
    """An `all_to_all_single` in flight (no autograd). `wait()` returns the received rows once."""

    def __init__(self, out: torch.Tensor, send: torch.Tensor, work: Any, label: str, trace: list | None) -> None:
        self.out, self._send, self._work, self.label, self._trace = out, send, work, label, trace
        self._posted = time.perf_counter()

    def wait(self) -> torch.Tensor:
        if self._work is None:
            raise RuntimeError(f"wait() called twice on the posted all-to-all {self.label}")
        start = time.perf_counter()
        self._work.wait()
        self._work = self._send = None  # the send buffer had to outlive the collective
        if self._trace is not None:
            self._trace.append(CommInterval(self.label, self._posted, start, time.perf_counter()))
        return self.out


def post_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, label: str = "a2a",
                    trace: list | None = None, fp8: bool = False) -> PostedAllToAll:
    """Post rows of `x` (`in_splits[d]` rows to rank d) and receive `out_splits[s]` rows from rank s. `fp8`: the
    rows travel as E4M3 values with a scale per 1 x 128 tile (DeepSeek-V3's FP8 dispatch) and arrive
    dequantized to x's dtype."""
    if fp8:
        return PostedFP8AllToAll(x, out_splits, in_splits, group, label, trace)
    send = x.contiguous()
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    work = dist.all_to_all_single(out, send, out_splits, in_splits, group=group, async_op=True)
    return PostedAllToAll(out, send, work, label, trace)


class PostedFP8AllToAll:
    """Two posted all-to-alls with the same splits, the E4M3 values (as bytes: collectives do not all take
    float8) and their fp32 tile scales; `wait()` dequantizes into `out` (allocated at post time, so autograd
    can hand it out before the data arrives)."""

    def __init__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, label: str,
                 trace: list | None) -> None:
        from model.fp8 import quantize_dispatch

        with torch.no_grad():
            values, scales = quantize_dispatch(x.detach())
        self.out = x.new_empty(sum(out_splits), *x.shape[1:])
        self._dtype, self._fp8 = x.dtype, values.dtype
        self._values = post_all_to_all(values.view(torch.uint8), out_splits, in_splits, group, label + " fp8", trace)
        self._scales = post_all_to_all(scales, out_splits, in_splits, group, label + " scales", trace)
        self.label = label

    def wait(self) -> torch.Tensor:
        from model.fp8 import dequantize_dispatch

        values, scales = self._values.wait(), self._scales.wait()
        with torch.no_grad():
            self.out.copy_(dequantize_dispatch(values.view(self._fp8), scales, self._dtype).view_as(self.out))
        return self.out


# ---- autograd pieces -------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows out of an all_to_all_single with uneven splits; backward is the transposed all-to-all (splits
    swapped). The forward only posts the collective: the returned buffer is filled once the handle it appends
    to `pending` is waited on. Backward is synchronous (the overlapped pipeline path in
    parallel/ep_overlap.py posts its backward all-to-alls itself)."""

    @staticmethod
    def forward(ctx, x, recv_splits: list[int], send_splits: list[int], group, pending: list, label: str,
                trace: list | None, fp8: bool = False):
        ctx.recv_splits, ctx.send_splits, ctx.group, ctx.label, ctx.trace = (
            recv_splits, send_splits, group, label, trace)
        posted = post_all_to_all(x, recv_splits, send_splits, group, label, trace, fp8=fp8)
        pending.append(posted)
        return posted.out

    @staticmethod
    def backward(ctx, grad):
        back = post_all_to_all(grad, ctx.send_splits, ctx.recv_splits, ctx.group, ctx.label + " grad", ctx.trace)
        return back.wait(), None, None, None, None, None, None, None  # gradients travel in full precision


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation; backward gathers with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def expert_major_permutation(recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """recv_counts [ep, E/ep] (rows from source s for local expert j). Received rows lie in (source, expert)
    order; returns perm with received[perm] in (expert, source) order, and its inverse."""
    lens_sm = recv_counts.reshape(-1)
    starts_sm = torch.cumsum(lens_sm, 0) - lens_sm  # start of block (s, j) in the received buffer
    lens_em = recv_counts.t().reshape(-1)  # the same blocks, expert-major
    starts_em = torch.cumsum(lens_em, 0) - lens_em
    total = int(lens_sm.sum())
    # row i of expert-major block b comes from row i - starts_em[b] + starts_sm[b] of the received buffer
    block_shift = starts_sm.view_as(recv_counts).t().reshape(-1) - starts_em
    perm = torch.arange(total, device=recv_counts.device) + torch.repeat_interleave(block_shift, lens_em)
    inverse = torch.empty_like(perm).index_copy_(0, perm, torch.arange(total, device=perm.device))
    return perm, inverse


# ---- the dispatcher --------------------------------------------------------------------------------------
@dataclass
class ExchangeLayout:
    """Who sends how many rows where, for one dispatch (the combine is its transpose)."""

    send_splits: list[int]  # rows this rank sends to each rank
    recv_splits: list[int]  # rows this rank receives from each rank
    rows: torch.Tensor  # [E/ep] received rows per local expert
    perm: torch.Tensor  # received (source-major) -> expert-major
    inverse: torch.Tensor


@dataclass
class EPDispatched(Dispatched):
    """`x`/`rows`: the rows this rank's experts compute, expert-major, rows per LOCAL expert. `order`/`gates`
    describe this rank's own tokens (as in `local`, the pre-exchange sort); combine needs the rest."""

    local: Dispatched | None = None
    layout: ExchangeLayout | None = None


class _Pending:
    def __init__(self, works: list) -> None:
        self._works: list | None = works

    def _wait_all(self) -> None:
        if self._works is None:
            raise RuntimeError("wait() called twice on the same pending all-to-all")
        for posted in self._works:
            posted.wait()
        self._works = None


class PendingDispatch(_Pending):
    """A posted dispatch all-to-all. `wait()` -> `Dispatched` (expert-major rows for the local experts)."""

    def __init__(self, works: list, recv: torch.Tensor, d: EPDispatched) -> None:
        super().__init__(works)
        self._recv, self._d = recv, d

    def wait(self) -> EPDispatched:
        self._wait_all()
        d = self._d
        d.x = _PermuteRows.apply(self._recv, d.layout.perm, d.layout.inverse)
        return d


class PendingCombine(_Pending):
    """A posted combine all-to-all. `wait()` -> [T, hidden], the gate-weighted sum over the K choices."""

    def __init__(self, works: list, back: torch.Tensor, local: Dispatched, dispatcher: LocalDispatcher) -> None:
        super().__init__(works)
        self._back, self._local, self._dispatcher = back, local, dispatcher

    def wait(self) -> torch.Tensor:
        self._wait_all()
        return self._dispatcher.combine(self._back, self._local)


class AllToAllDispatcher:
    """The `LocalDispatcher` protocol across `ep_size` ranks of `group`; this rank holds experts
    [ep_rank*E/ep, (ep_rank+1)*E/ep). No token dropping: every choice is sent, empty experts/ranks are fine.

    `dispatch_async`/`combine_async` post the row all-to-all and return a handle whose `wait()` finishes the
    sub-step; compute placed between them (the shared experts, another microbatch's attention) overlaps the
    communication. `dispatch`/`combine` are post + wait back to back. The pieces (`sort`, `exchange_layout`,
    `post`) are public for the pipeline's sub-step path (parallel/ep_overlap.py). `trace`, when a list, collects
    a `CommInterval` per all-to-all (forward and backward), for the recorded timeline.
    """

    def __init__(self, group, ep_size: int, ep_rank: int, n_experts: int, label: str = "moe") -> None:
        self.group, self.ep_size, self.ep_rank, self.n_experts = group, ep_size, ep_rank, n_experts
        self.first, self.last = expert_range(n_experts, ep_rank, ep_size)
        self.local_experts = self.last - self.first
        self.label = label
        self.trace: list[CommInterval] | None = None
        self.fp8_dispatch = False  # precision.fp8.dispatch: the dispatch rows travel in FP8 (not combine, not grads)
        self._local = LocalDispatcher()

    def sort(self, x: torch.Tensor, routing: Routing, n_experts: int) -> Dispatched:
        """This rank's T*K choices stably sorted by global expert id: rank-major, so each destination's rows are
        one contiguous block."""
        if n_experts != self.n_experts:
            raise ValueError(f"dispatcher built for {self.n_experts} experts, routing has {n_experts}")
        return self._local.dispatch(x, routing, n_experts)

    @torch.no_grad()
    def exchange_layout(self, counts: torch.Tensor) -> ExchangeLayout:
        """The count-matrix exchange (small, synchronous: the row buffers' sizes depend on it). Row d of this
        rank's [ep, E/ep] counts goes to rank d; received row s = rows from rank s for each local expert."""
        counts = counts.to(torch.int64).view(self.ep_size, self.local_experts).contiguous()
        recv_counts = post_all_to_all(counts, [1] * self.ep_size, [1] * self.ep_size, self.group,
                                      f"counts {self.label}", self.trace).wait()
        perm, inverse = expert_major_permutation(recv_counts)
        return ExchangeLayout(counts.sum(1).tolist(), recv_counts.sum(1).tolist(), recv_counts.sum(0), perm, inverse)

    def post(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], what: str) -> PostedAllToAll:
        fp8 = self.fp8_dispatch and what == "dispatch"
        return post_all_to_all(x, out_splits, in_splits, self.group, f"{what} {self.label}", self.trace, fp8=fp8)

    def combine_rows(self, back: torch.Tensor, local: Dispatched) -> torch.Tensor:
        """The gate-weighted sum over the K choices of rows returned by the combine all-to-all."""
        return self._local.combine(back, local)

    def dispatch_async(self, x: torch.Tensor, routing: Routing, n_experts: int) -> PendingDispatch:
        local = self.sort(x, routing, n_experts)
        layout = self.exchange_layout(routing.counts)
        works: list = []
        recv = _AllToAll.apply(local.x, layout.recv_splits, layout.send_splits, self.group, works,
                               f"dispatch {self.label}", self.trace, self.fp8_dispatch)
        d = EPDispatched(x=recv, rows=layout.rows, order=local.order, gates=local.gates, local=local, layout=layout)
        return PendingDispatch(works, recv, d)

    def dispatch(self, x: torch.Tensor, routing: Routing, n_experts: int) -> Dispatched:
        return self.dispatch_async(x, routing, n_experts).wait()

    def combine_async(self, y: torch.Tensor, d: Dispatched) -> PendingCombine:
        if not isinstance(d, EPDispatched) or d.local is None:
            raise TypeError("AllToAllDispatcher.combine needs the EPDispatched its dispatch returned")
        layout = d.layout
        source_major = _PermuteRows.apply(y, layout.inverse, layout.perm)
        works: list = []
        back = _AllToAll.apply(source_major, layout.send_splits, layout.recv_splits, self.group, works,
                               f"combine {self.label}", self.trace)
        return PendingCombine(works, back, d.local, self._local)

    def combine(self, y: torch.Tensor, d: Dispatched) -> torch.Tensor:
        return self.combine_async(y, d).wait()


def overlapped_moe_forward(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """`MoE.forward` with the shared experts computed while the dispatch all-to-all is in flight (the
    schedule=none overlap). Same sub-steps and the same arithmetic: bitwise equal to `moe(x)`."""
    if not isinstance(moe.dispatcher, AllToAllDispatcher):
        return moe(x)
    routing = moe.route(x)
    pending = moe.dispatcher.dispatch_async(x.reshape(-1, x.shape[-1]), routing, moe.cfg.n_routed_experts)
    shared = moe.shared_experts(x) if moe.shared_experts is not None else None
    d = pending.wait()
    y = moe.compute_experts(d)
    out = moe.dispatcher.combine_async(y, d).wait().view_as(x)
    return (out + shared if shared is not None else out), routing


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


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int, group=None, overlap: bool = False) -> nn.Module:
    """In place: every MoE layer keeps experts [ep_rank*E/ep, (ep_rank+1)*E/ep) and gets an AllToAllDispatcher
    over `group` (None: the default group). Parameter names are unchanged; they now hold the local experts.
    `overlap`: the layer's forward becomes `overlapped_moe_forward` (shared experts hidden behind the dispatch
    all-to-all; bitwise the same result)."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            n = module.cfg.n_routed_experts
            if module.experts.n_experts != n or module.experts.first_expert != 0:
                raise ValueError("shard_experts expects an unsharded model")
            lo, hi = expert_range(n, ep_rank, ep_size)
            module.experts = _shard_routed(module.experts, lo, hi)
            module.dispatcher = AllToAllDispatcher(group, ep_size, ep_rank, n, label=name.removesuffix(".mlp") or "moe")
            if overlap:  # an instance attribute: nn.Module.__call__ looks up self.forward
                module.forward = functools.partial(overlapped_moe_forward, module)
    return model


@dataclass
class ExpertShardRole:
    """Where a rank's expert shard is saved: `pipe_rank` (None without a pipeline) names the file, and only the
    first EP group of each pipeline rank (`writer`) writes it; the others hold identical copies."""

    pipe_rank: int | None
    writer: bool


def set_expert_shard_role(model: nn.Module, role: ExpertShardRole) -> None:
    model._expert_shard_role = role  # read by trainer/reshard.py when saving / loading the shard


def expert_shard_role(model: nn.Module) -> ExpertShardRole | None:
    return getattr(model, "_expert_shard_role", None)


def set_fp8_dispatch(model: nn.Module, enabled: bool) -> int:
    """Send every EP layer's dispatch rows in FP8 (1 x 128 tiles, DeepSeek-V3 section 3.3); returns how many
    dispatchers were switched."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.dispatcher, AllToAllDispatcher):
            module.dispatcher.fp8_dispatch = enabled
            n += 1
    return n


def ep_layout(model: nn.Module) -> tuple[int, int] | None:
    """(ep_rank, ep_size) of a model sharded by `shard_experts`, None for a full model."""
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.dispatcher, AllToAllDispatcher):
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


# ---- DeepSpeed: expert groups, expert parameters, ZeRO-1 ---------------------------------------------------
@dataclass
class ExpertGroups:
    """The groups of `parallel.ep` inside the data-parallel group (pp=1): EP group = ep consecutive ranks
    (rank // ep), expert-DP group = the dp/ep ranks with the same ep rank (rank % ep). `name` is DeepSpeed's
    group name, which the expert parameters and their optimizer groups carry."""

    name: str
    ep_size: int
    ep_rank: int
    ep_group: Any
    expert_dp_group: Any


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # what deepspeed.utils.groups names them


def build_expert_groups(ep_size: int) -> ExpertGroups:
    """Create (collectively) and register the EP / expert-DP groups in deepspeed.utils.groups, where the ZeRO
    optimizer and the model broadcast of `deepspeed.initialize` look them up. DeepSpeed's default (E + D)
    ordering is exactly ours: EP groups [0..ep-1], [ep..2ep-1], ...; expert-DP groups {i, i+ep, ...}."""
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep={ep_size} does not divide the {world} data-parallel ranks")
    name = expert_group_name(ep_size)
    groups._create_expert_and_data_parallel(ep_size)
    rank = dist.get_rank()
    first = rank - rank % ep_size
    if list(groups._get_expert_parallel_group_ranks(name)) != list(range(first, first + ep_size)):
        raise RuntimeError(f"DeepSpeed's EP group of rank {rank} is not ranks [{first}, {first + ep_size})")
    return ExpertGroups(name, ep_size, rank % ep_size, groups._get_expert_parallel_group(name),
                        groups._get_expert_data_parallel_group(name))


def register_expert_groups(ep_size: int, ep_rank: int, ep: tuple[Any, list[int]],
                           expert_data: tuple[Any, list[int]]) -> ExpertGroups:
    """Register groups built elsewhere (a pipeline topology's `ep` / `expert_data`, each (group, ranks)) in
    deepspeed.utils.groups under DeepSpeed's name, where ZeRO and the model broadcast look them up. DeepSpeed's
    own group builder assumes the whole world is data parallel, which a pipeline's world is not."""
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
            pass  # our groups are built by build_expert_groups

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
    layer classes (it would save none of our experts). Our experts are saved by trainer/reshard.py."""
    engine.has_moe_layers = False
    engine.num_experts = []


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

"""Expert parallelism: each of `ep` ranks holds E/ep routed experts; tokens travel to them by all-to-all.

- `shard_experts(model, ep_rank, ep_size, group)` keeps this rank's contiguous slice of every MoE layer's
  experts (same weights, same parameter names) and installs an `AllToAllDispatcher`.
- `AllToAllDispatcher` implements the `LocalDispatcher` protocol (`dispatch` -> `Dispatched`, `combine`) and an
  overlap-ready split of each all-to-all into post and wait (`dispatch_async` / `combine_async`).
- `gather_expert_state` / `slice_expert_state`: the same sharding on plain state dicts.
- `node_limited_groups`: checks that the router's groups map onto nodes (node-limited routing).

Layout (see docs/expert_parallel.md): a rank sorts its T*K choices by global expert id (so rows for rank 0's
experts come first), exchanges the [ep, E/ep] count matrix, sends rows with uneven splits, and reorders what
it receives from (source rank, local expert) order to expert-major order for the grouped GEMM.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.moe import Dispatched, LocalDispatcher, MoE
from model.router import Routing
from parallel.all_to_all import CommInterval, PostedAllToAll, _AllToAll, post_all_to_all


def expert_range(n_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """[first, last) global expert ids held by `ep_rank`: contiguous, E/ep each."""
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} out of range for ep_size {ep_size}")
    if n_experts % ep_size:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by ep={ep_size}")
    per = n_experts // ep_size
    return ep_rank * per, (ep_rank + 1) * per


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

    def __init__(self, group, ep_size: int, ep_rank: int, n_experts: int, label: str = "moe",
                 layout_group=None) -> None:
        self.group, self.ep_size, self.ep_rank, self.n_experts = group, ep_size, ep_rank, n_experts
        # the count exchange's own communicator (same ranks): on one group it would queue behind the row
        # transfers still in flight there (NCCL runs a group's collectives in order); default: `group`
        self.layout_group = group if layout_group is None else layout_group
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
        recv_counts = post_all_to_all(counts, [1] * self.ep_size, [1] * self.ep_size, self.layout_group,
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


def set_fp8_dispatch(model: nn.Module, enabled: bool) -> int:
    """Send every EP layer's dispatch rows in FP8 (1 x 128 tiles, DeepSeek-V3 section 3.3); returns how many
    dispatchers were switched."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.dispatcher, AllToAllDispatcher):
            module.dispatcher.fp8_dispatch = enabled
            n += 1
    return n

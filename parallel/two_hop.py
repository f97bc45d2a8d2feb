"""DeepSeek-V3's two-hop expert dispatch: each token crosses the inter-node link once per destination node, then
fans out to that node's expert ranks over the intra-node link; the combine runs the reverse path.

EP rank e sits on node e // R at local index e % R (R = `ranks_per_node`); experts are contiguous over ranks, so
node n holds experts [n*E/N, (n+1)*E/N). With node-limited routing (every router group on one node,
parallel/expert_shard.py `node_limited_groups`) a token's K choices span at most `topk_group` nodes.

    hop 1 (inter-node)  token t of rank (n, l) -> rank (d, l) for every node d holding one of its experts: the
                        row once, its K gates appended (0 for experts elsewhere), and its K expert ids (-1 there)
    hop 2 (intra-node)  rank (d, l) -> the rank of node d holding each chosen expert: one row per choice, its
                        gate appended, and its expert id
    experts             rows sorted by local expert, the grouped GEMM, each output row times its gate
    combine hop 2       back to (d, l), summed per hop-1 row: one partial sum per (token, node)
    combine hop 1       back to (n, l), summed per token

Every transfer is an `all_to_all_single` over the EP group with zero splits to the ranks a hop does not reach,
so each hop's bytes cross only its link type (counted by the modelled interconnect, parallel/modelled_comm.py).
Each hop exchanges its row counts first (synchronous, as the one-hop dispatcher's count exchange). The rows of a
token are those of the one-hop dispatcher and the gate-weighted sum is the same, summed per node first: equal
to the one-hop result to fp32 rounding (tested). Backward is autograd's: the transposed all-to-alls.

Not here: the overlapped F&B pair (its sub-steps use the one-hop dispatcher's pieces: a two-hop layer runs as
a plain layer inside DualPipe) and the FP8 dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.moe import Dispatched
from model.router import Routing
from parallel.all_to_all import _AllToAll, post_all_to_all
from parallel.dispatcher import _PermuteRows, expert_range


def _rows_through(x: torch.Tensor, recv: list[int], send: list[int], group, label: str, trace) -> torch.Tensor:
    """A differentiable all-to-all of rows, waited at once (its backward is the transposed one)."""
    pending: list = []
    out = _AllToAll.apply(x, recv, send, group, pending, label, trace, False)
    pending[0].wait()
    return out


@dataclass
class TwoHopDispatched(Dispatched):
    """What the combine needs: the two hops' splits, each hop's row maps, the gates on the expert rank."""

    hop1_token: torch.Tensor | None = None  # [M1] this rank's token of each hop-1 row it sent
    hop1_send: list[int] | None = None
    hop1_recv: list[int] | None = None
    hop2_row: torch.Tensor | None = None  # [M2] the received hop-1 row of each hop-2 row this rank sent
    hop2_send: list[int] | None = None
    hop2_recv: list[int] | None = None
    hop1_rows_received: int = 0
    expert_gates: torch.Tensor | None = None  # [rows] gate of each received hop-2 row (source order)
    perm: torch.Tensor | None = None  # received hop-2 rows -> expert-major
    inverse: torch.Tensor | None = None


class TwoHopDispatcher:
    """The `LocalDispatcher` protocol over `ep_size` ranks of `group` on ep_size / ranks_per_node nodes."""

    def __init__(self, group, ep_size: int, ep_rank: int, n_experts: int, ranks_per_node: int,
                 label: str = "moe") -> None:
        if ranks_per_node < 1 or ep_size % ranks_per_node:
            raise ValueError(f"ep={ep_size} is not a whole number of nodes of {ranks_per_node} ranks")
        self.group, self.ep_size, self.ep_rank, self.n_experts = group, ep_size, ep_rank, n_experts
        self.ranks_per_node, self.nodes = ranks_per_node, ep_size // ranks_per_node
        self.node, self.local_index = divmod(ep_rank, ranks_per_node)
        self.first, self.last = expert_range(n_experts, ep_rank, ep_size)
        self.local_experts = self.last - self.first
        self.experts_per_node = n_experts // self.nodes
        self.label = label
        self.trace: list | None = None

    def _counts(self, send: list[int], what: str) -> list[int]:
        counts = torch.tensor(send, dtype=torch.int64).view(self.ep_size, 1)
        ones = [1] * self.ep_size
        got = post_all_to_all(counts, ones, ones, self.group, f"counts {what} {self.label}", self.trace).wait()
        return got.view(-1).tolist()

    def _ints(self, x: torch.Tensor, recv: list[int], send: list[int], what: str) -> torch.Tensor:
        return post_all_to_all(x, recv, send, self.group, f"{what} {self.label}", self.trace).wait()

    def dispatch(self, x: torch.Tensor, routing: Routing, n_experts: int) -> TwoHopDispatched:
        if n_experts != self.n_experts:
            raise ValueError(f"dispatcher built for {self.n_experts} experts, routing has {n_experts}")
        experts = routing.experts
        # hop 1: one row per (token, destination node), node-major; to the rank of that node with our local index
        with torch.no_grad():
            node_of = experts // self.experts_per_node  # [T, K]
            goes = torch.zeros(experts.shape[0], self.nodes, dtype=torch.bool, device=x.device)
            goes.scatter_(1, node_of, True)
            dst_node, token = goes.t().nonzero(as_tuple=True)
            in_node = node_of.index_select(0, token) == dst_node[:, None]  # [M1, K]: the choices this row serves
            ids1 = torch.where(in_node, experts.index_select(0, token), -1)
            per_node = goes.sum(0).tolist()
        hop1_send = [0] * self.ep_size
        for d, n in enumerate(per_node):
            hop1_send[d * self.ranks_per_node + self.local_index] = n
        hop1_recv = self._counts(hop1_send, "hop1")
        # the gates ride in the same rows (as the combine casts them to the rows' dtype anyway): one transfer
        hidden = x.shape[1]
        gates1 = (routing.gates.index_select(0, token) * in_node).to(x.dtype)
        rows1 = _rows_through(torch.cat([x.index_select(0, token), gates1], 1), hop1_recv, hop1_send, self.group,
                              f"hop1 {self.label}", self.trace)
        x1, g1 = rows1[:, :hidden], rows1[:, hidden:]
        ids1 = self._ints(ids1, hop1_recv, hop1_send, "hop1 ids")
        # hop 2: one row per choice served by this node, to the rank holding its expert (rank-major)
        with torch.no_grad():
            row, choice = (ids1 >= 0).nonzero(as_tuple=True)
            expert = ids1[row, choice]
            dst = expert // self.local_experts
            order = torch.argsort(dst, stable=True)
            row, choice, expert = row[order], choice[order], expert[order]
            hop2_send = torch.bincount(dst[order], minlength=self.ep_size).tolist()
        if any(n and r // self.ranks_per_node != self.node for r, n in enumerate(hop2_send)):
            raise RuntimeError("two-hop dispatch: a hop-1 row names an expert outside this node")
        hop2_recv = self._counts(hop2_send, "hop2")
        rows2 = _rows_through(torch.cat([x1.index_select(0, row), g1[row, choice].unsqueeze(1)], 1), hop2_recv,
                              hop2_send, self.group, f"hop2 {self.label}", self.trace)
        x2, g2 = rows2[:, :hidden], rows2[:, hidden]
        local = self._ints(expert.unsqueeze(1), hop2_recv, hop2_send, "hop2 ids").view(-1) - self.first
        with torch.no_grad():
            perm = torch.argsort(local, stable=True)
            inverse = torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))
            rows = torch.bincount(local, minlength=self.local_experts)
        return TwoHopDispatched(
            x=_PermuteRows.apply(x2, perm, inverse), rows=rows, order=perm, gates=routing.gates,
            hop1_token=token, hop1_send=hop1_send, hop1_recv=hop1_recv, hop2_row=row, hop2_send=hop2_send,
            hop2_recv=hop2_recv, hop1_rows_received=int(sum(hop1_recv)), expert_gates=g2, perm=perm,
            inverse=inverse,
        )

    def combine(self, y: torch.Tensor, d: Dispatched) -> torch.Tensor:
        if not isinstance(d, TwoHopDispatched) or d.hop1_token is None:
            raise TypeError("TwoHopDispatcher.combine needs the TwoHopDispatched its dispatch returned")
        weighted = _PermuteRows.apply(y, d.inverse, d.perm) * d.expert_gates.to(y.dtype).unsqueeze(1)
        back2 = _rows_through(weighted, d.hop2_send, d.hop2_recv, self.group, f"combine hop2 {self.label}",
                              self.trace)
        partial = y.new_zeros(d.hop1_rows_received, y.shape[1]).index_add(0, d.hop2_row, back2)
        back1 = _rows_through(partial, d.hop1_send, d.hop1_recv, self.group, f"combine hop1 {self.label}",
                              self.trace)
        return y.new_zeros(d.gates.shape[0], y.shape[1]).index_add(0, d.hop1_token, back1)

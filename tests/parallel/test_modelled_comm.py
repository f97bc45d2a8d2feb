"""The modelled interconnect at the torch.distributed seam (parallel/modelled_comm.py), on 2 real gloo ranks placed
on two "nodes": the transfers still happen (results equal the unmodelled ones), each gets its link's modelled
duration, bytes are counted per link type, DeepSpeed's own collectives pass through the seam, and uninstalling
restores torch. Timing runs on a fake clock (no sleeping: a loaded machine cannot break it)."""

from __future__ import annotations

import pytest
import torch

from parallel.network_model import NetworkModel
from parallel.spawn import run_ranks

NET = NetworkModel(latency_us=10.0, intra_node_gbs=100.0, inter_node_gbs=1.0, ranks_per_node=1)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def _worker(rank: int, world: int) -> dict:
    import os

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as ds_dist

    from parallel.modelled_comm import ModelledComm, active
    from parallel.p2p import P2P

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    originals = {name: getattr(dist, name) for name in ("all_reduce", "isend", "all_to_all_single")}
    out: dict = {}
    clock = FakeClock()
    comm = ModelledComm(NET, clock)
    with comm:
        out["active"] = active() is comm
        # an uneven all-to-all, posted asynchronously and waited at once: blocked for the whole duration
        send_rows = [1, 3] if rank == 0 else [2, 5]
        recv_rows = [1, 2] if rank == 0 else [3, 5]
        x = torch.full((sum(send_rows), 4), float(rank))
        y = x.new_empty(sum(recv_rows), 4)
        work = dist.all_to_all_single(y, x, recv_rows, send_rows, async_op=True)
        work.wait()
        out["a2a"] = {"y": y, "clock": clock.t, "sent": dict(comm.stats.sent_bytes)}
        # posted, then compute longer than the transfer: the wait costs nothing more
        t0, blocked0 = clock.t, comm.stats.blocked_s
        work = dist.all_to_all_single(y, x, recv_rows, send_rows, async_op=True)
        clock.t += 1.0
        work.wait()
        out["covered"] = {"blocked": comm.stats.blocked_s - blocked0, "clock": clock.t - t0}
        # a synchronous all-reduce holds the caller for its duration
        t0 = clock.t
        s = torch.ones(256)
        dist.all_reduce(s)
        out["all_reduce"] = {"sum": s[0].item(), "clock": clock.t - t0}
        # the pipeline's batched p2p (parallel/p2p.py): one message each way
        sent_before = comm.stats.sent_bytes["inter_node"]
        p2p = P2P(ranks=[0, 1])
        msg, got = torch.full((1000,), float(rank)), torch.empty(1000)
        p2p.post_send(msg, 1 - rank, tag=0)
        slot = p2p.post_recv(got, 1 - rank, tag=0)
        p2p.flush()
        t0 = clock.t
        slot[0].wait()
        p2p.wait_sends()
        out["p2p"] = {"got": got[0].item(), "clock": clock.t - t0,
                      "sent": comm.stats.sent_bytes["inter_node"] - sent_before}
        # DeepSpeed's own collectives go through the same seam, its cached all-gather included
        transfers = comm.stats.transfers
        d = torch.ones(8) * (rank + 1)
        ds_dist.all_reduce(d)
        gathered = torch.empty(16)
        ds_dist.all_gather_into_tensor(gathered, torch.full((8,), float(rank)))
        out["deepspeed"] = {"sum": d[0].item(), "gathered": gathered, "transfers": comm.stats.transfers - transfers}
        out["stats"] = comm.stats.as_dict()
    out["restored"] = all(getattr(dist, k) is v for k, v in originals.items()) and active() is None
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, _worker)


@pytest.mark.multiprocess
def test_an_all_to_all_moves_the_rows_and_takes_its_modelled_time(ranks):
    for rank, r in enumerate(ranks):
        assert r["active"] and r["restored"]
        recv_rows = [1, 2] if rank == 0 else [3, 5]
        expected = torch.cat([torch.full((n, 4), float(src)) for src, n in enumerate(recv_rows)])
        assert torch.equal(r["a2a"]["y"], expected)
        send_rows = [1, 3] if rank == 0 else [2, 5]
        row = 4 * 4
        peer = 1 - rank
        seconds = NET.all_to_all_seconds(rank, [0, 1], [n * row for n in send_rows], [n * row for n in recv_rows])
        assert seconds == pytest.approx(10e-6 + max(send_rows[peer], recv_rows[peer]) * row / 1e9)
        assert r["a2a"]["clock"] == pytest.approx(seconds)
        assert r["a2a"]["sent"] == {"intra_node": 0, "inter_node": send_rows[peer] * row}


@pytest.mark.multiprocess
def test_a_wait_after_enough_compute_is_free(ranks):
    for r in ranks:
        assert r["covered"]["blocked"] == 0.0 and r["covered"]["clock"] == pytest.approx(1.0)


@pytest.mark.multiprocess
def test_synchronous_collectives_and_batched_p2p_are_modelled(ranks):
    for rank, r in enumerate(ranks):
        assert r["all_reduce"]["sum"] == 2.0
        assert r["all_reduce"]["clock"] == pytest.approx(NET.ring_seconds("all_reduce", 1024, [0, 1]))
        assert r["p2p"]["got"] == float(1 - rank)
        assert r["p2p"]["clock"] == pytest.approx(NET.p2p_seconds(4000, 0, 1))
        assert r["p2p"]["sent"] == 4000


@pytest.mark.multiprocess
def test_deepspeed_collectives_pass_through_the_seam(ranks):
    for r in ranks:
        assert r["deepspeed"]["sum"] == 3.0
        assert torch.equal(r["deepspeed"]["gathered"], torch.cat([torch.zeros(8), torch.ones(8)]))
        assert r["deepspeed"]["transfers"] == 2
        assert r["stats"]["blocked_s"] > 0 and r["stats"]["modelled_s"] >= r["stats"]["blocked_s"]

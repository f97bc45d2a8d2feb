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

    from parallel.dispatcher import AllToAllDispatcher
    from parallel.modelled_comm import ModelledComm, active
    from parallel.p2p import P2P

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from deepspeed.comm import comm as ds_comm

    originals = {name: getattr(dist, name) for name in ("all_reduce", "isend", "all_to_all_single")}
    ds_gather = ds_comm.cdb.all_gather_function
    out: dict = {}
    other = dist.new_group([0, 1])  # a second communicator over the same ranks: a stream of its own
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
        # two reductions posted together on two groups share the rank's link: the smaller ends after twice its
        # time alone, the larger after both durations; on one group (one stream) they run one after the other
        for key, groups in (("shared", (None, other)), ("queued", (None, None))):
            t0 = clock.t
            a, b = torch.ones(256), torch.ones(512)
            works = [dist.all_reduce(a, group=groups[0], async_op=True),
                     dist.all_reduce(b, group=groups[1], async_op=True)]
            works[0].wait()
            first = clock.t - t0
            works[1].wait()
            out[key] = {"first": first, "clock": clock.t - t0}
        # the dispatcher's count exchange on a group of its own shares the link with its rows in flight; on the
        # rows' group it waits for them
        for key, layout_group in (("layout_own_group", other), ("layout_rows_group", None)):
            dispatcher = AllToAllDispatcher(None, 2, rank, 4, layout_group=layout_group)
            t0 = clock.t
            rows = dispatcher.post(torch.ones(64, 256), [32, 32], [32, 32], "dispatch")
            dispatcher.exchange_layout(torch.ones(4))
            counts = clock.t - t0
            rows.wait()
            out[key] = {"counts": counts, "clock": clock.t - t0}
        # DeepSpeed's own collectives go through the same seam, its cached all-gather included
        transfers = comm.stats.transfers
        d = torch.ones(8) * (rank + 1)
        ds_dist.all_reduce(d)
        gathered = torch.empty(16)
        ds_dist.all_gather_into_tensor(gathered, torch.full((8,), float(rank)))
        out["deepspeed"] = {"sum": d[0].item(), "gathered": gathered, "transfers": comm.stats.transfers - transfers}
        out["stats"] = comm.stats.as_dict()
    out["restored"] = (all(getattr(dist, k) is v for k, v in originals.items()) and active() is None
                       and ds_comm.cdb.all_gather_function is ds_gather)
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
def test_transfers_posted_together_share_the_link_or_queue_on_one_group(ranks):
    small, large = NET.ring_seconds("all_reduce", 1024, [0, 1]), NET.ring_seconds("all_reduce", 2048, [0, 1])
    for r in ranks:
        assert r["shared"]["first"] == pytest.approx(2 * small)
        assert r["shared"]["clock"] == pytest.approx(small + large)
        assert r["queued"]["first"] == pytest.approx(small)
        assert r["queued"]["clock"] == pytest.approx(small + large)


@pytest.mark.multiprocess
def test_the_count_exchange_on_its_own_group_does_not_queue_behind_the_rows(ranks):
    rows = NET.all_to_all_seconds(0, [0, 1], [32 * 256 * 4] * 2, [32 * 256 * 4] * 2)
    counts = NET.all_to_all_seconds(0, [0, 1], [2 * 8] * 2, [2 * 8] * 2)  # a row of 2 int64 counts per peer
    for r in ranks:
        # sharing the link with the rows, both at half rate until the counts are done
        assert r["layout_own_group"]["counts"] == pytest.approx(2 * counts)
        assert r["layout_rows_group"]["counts"] == pytest.approx(rows + counts)
        assert r["layout_own_group"]["clock"] == pytest.approx(rows + counts)
        assert r["layout_rows_group"]["clock"] == pytest.approx(rows + counts)


@pytest.mark.multiprocess
def test_deepspeed_collectives_pass_through_the_seam(ranks):
    for r in ranks:
        assert r["deepspeed"]["sum"] == 3.0
        assert torch.equal(r["deepspeed"]["gathered"], torch.cat([torch.zeros(8), torch.ones(8)]))
        assert r["deepspeed"]["transfers"] == 2
        assert r["stats"]["blocked_s"] > 0 and r["stats"]["modelled_s"] >= r["stats"]["blocked_s"]


class SteppedCPU:
    """A fake thread CPU time that the test moves by hand (the compute a rank has done)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _virtual_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from parallel.modelled_comm import ModelledComm
    from parallel.network_model import VirtualClock
    from parallel.p2p import P2P

    cpu = SteppedCPU(0.0)
    clock = VirtualClock(cpu)
    out: dict = {}
    with ModelledComm(NET, clock) as comm:
        # a message from a rank that is ahead (rank 0 at 10 s) to one that is behind (rank 1 at 2 s): it arrives
        # at the sender's post time plus its duration on both sides
        cpu.t = 10.0 if rank == 0 else 2.0
        msg = torch.ones(250)
        if rank == 0:
            dist.isend(msg, 1, tag=3).wait()
        else:
            dist.irecv(msg, 0, tag=3).wait()
        out["p2p"] = clock.now()
        # an all-to-all waits for the latest participant; each side then takes its own duration
        out["aligned"] = comm.align_clocks()
        cpu.t += 1.0 if rank == 0 else 3.0
        x, y = torch.zeros(6, 4), torch.zeros(6, 4)
        dist.all_to_all_single(y, x)
        out["a2a"] = clock.now() - out["aligned"]
        # batched p2p (the pipeline's), the sender behind this time
        base = comm.align_clocks()
        cpu.t += 0.5 if rank == 0 else 4.0
        p2p = P2P(ranks=[0, 1])
        got = torch.empty(1000)
        p2p.post_send(torch.full((1000,), float(rank)), 1 - rank, tag=1)
        slot = p2p.post_recv(got, 1 - rank, tag=1)
        p2p.flush()
        slot[0].wait()
        p2p.wait_sends()
        out["batch"] = (clock.now() - base, got[0].item())
    return out


@pytest.mark.multiprocess
def test_the_virtual_clock_completes_transfers_at_the_latest_post_time():
    ranks = run_ranks(2, _virtual_worker)
    d = NET.p2p_seconds(1000, 0, 1)
    assert ranks[0]["p2p"] == pytest.approx(10.0 + d) and ranks[1]["p2p"] == pytest.approx(10.0 + d)
    assert ranks[0]["aligned"] == ranks[1]["aligned"] == pytest.approx(10.0 + d)
    a2a = NET.all_to_all_seconds(0, [0, 1], [48, 48], [48, 48])
    assert ranks[0]["a2a"] == pytest.approx(3.0 + a2a) and ranks[1]["a2a"] == pytest.approx(3.0 + a2a)
    d = NET.p2p_seconds(4000, 0, 1)
    # rank 1 posted at +4: its send to rank 0 lands at 4 + d; rank 0's send (posted at +0.5) meets rank 1's
    # receive posted at +4, so rank 1 has it at 4 + d as well
    assert ranks[0]["batch"] == (pytest.approx(4.0 + d), 1.0)
    assert ranks[1]["batch"] == (pytest.approx(4.0 + d), 0.0)


def test_a_shared_link_splits_its_rate_among_the_transfers_in_flight():
    from parallel.network_model import SharedLink

    link = SharedLink()
    a = link.post(0.0, 2.0)
    b = link.post(1.0, 2.0)  # a is half done: from now on both move at half rate
    assert link.done_at(a) == pytest.approx(3.0)
    assert link.done_at(b) == pytest.approx(4.0)  # alone again after a ends
    c = link.post(3.5, 1.0)  # b has 0.5 s left: shared again
    assert a.done == pytest.approx(3.0)
    assert link.done_at(b) == pytest.approx(4.5)
    assert link.done_at(c) == pytest.approx(5.0)


def test_a_stream_runs_its_transfers_one_at_a_time_and_shares_the_link_with_other_streams():
    from parallel.network_model import SharedLink

    link = SharedLink()
    a = link.post(0.0, 2.0, stream="ep")
    b = link.post(1.0, 2.0, stream="ep")  # queued behind a: starts at 2, alone
    assert link.done_at(a) == pytest.approx(2.0) and link.done_at(b) == pytest.approx(4.0)
    c = link.post(1.5, 1.0, stream="reduce")  # shares with a (0.5 s left) from 1.5, then with b
    # 1.5-2.5: a and c at half rate, a ends at 2.5 with c at 0.5 left; 2.5-3.5: b and c halve, c ends at 3.5
    # with b at 1.5 left, which it runs alone to 5.0
    assert link.done_at(a) == pytest.approx(2.5)
    assert link.done_at(c) == pytest.approx(3.5)
    assert link.done_at(b) == pytest.approx(5.0)
    link.post(6.0, 1.0, stream="ep")  # everything before has ended by then
    assert (a.done, b.done, c.done) == (pytest.approx(2.5), pytest.approx(5.0), pytest.approx(3.5))

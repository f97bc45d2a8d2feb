"""The modelled interconnect (parallel/network_model.py): durations from the link each transfer crosses, and a
wait that honours them, checked with a fake clock (no sleeping, so a loaded machine cannot break it)."""

from __future__ import annotations

import pytest

from parallel.network_model import GB, ModelledWork, NetworkModel, NetworkModelError

NET = NetworkModel(latency_us=5.0, intra_node_gbs=160.0, inter_node_gbs=50.0, ranks_per_node=4)


class FakeClock:
    def __init__(self) -> None:
        self.t, self.slept = 100.0, []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


class FakeWork:
    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> bool:
        self.waited += 1
        self.done = True
        return True


def test_links_follow_the_nodes():
    assert NET.node_of(3) == 0 and NET.node_of(4) == 1
    assert NET.bandwidth(0, 3) == 160 * GB and NET.bandwidth(3, 4) == 50 * GB
    mb = 8 * 2**20
    assert NET.p2p_seconds(mb, 1, 2) == pytest.approx(5e-6 + mb / (160 * GB))
    assert NET.p2p_seconds(mb, 1, 5) == pytest.approx(5e-6 + mb / (50 * GB))
    assert NET.p2p_seconds(mb, 2, 2) == 0.0


def test_all_to_all_shares_each_link_and_runs_nvlink_beside_infiniband():
    peers = [0, 1, 2, 3, 4, 5, 6, 7]  # rank 1 of node 0; ranks 4-7 are on node 1
    send = [10, 0, 20, 30, 40, 40, 40, 40]
    recv = [0, 0, 60, 0, 10, 10, 10, 10]
    intra = max(10 + 20 + 30, 60) / (160 * GB)  # out 60, in 60 (its own 0 bytes stay local)
    inter = max(160, 40) / (50 * GB)
    assert NET.all_to_all_seconds(1, peers, send, recv) == pytest.approx(5e-6 + max(intra, inter))
    # all traffic local: nothing modelled; empty messages to peers: the latency
    assert NET.all_to_all_seconds(1, [1], [100], [100]) == 0.0
    assert NET.all_to_all_seconds(1, [1, 5], [0, 0], [0, 0]) == pytest.approx(5e-6)


def test_ring_collectives_take_the_slowest_link():
    nbytes = 2**30
    one_node, two_nodes = [0, 1, 2, 3], [2, 3, 4, 5]
    assert NET.ring_seconds("all_reduce", nbytes, one_node) == pytest.approx(
        6 * 5e-6 + 2 * 3 / 4 * nbytes / (160 * GB))
    assert NET.ring_seconds("reduce_scatter", nbytes, two_nodes) == pytest.approx(
        3 * 5e-6 + 3 / 4 * nbytes / (50 * GB))
    assert NET.ring_seconds("all_gather", nbytes, [7]) == 0.0
    with pytest.raises(NetworkModelError, match="^kind: "):
        NET.ring_seconds("scatter", nbytes, one_node)
    assert NET.ring_seconds("broadcast", nbytes, two_nodes) == pytest.approx(3 * 5e-6 + nbytes / (50 * GB))


def test_a_wait_after_enough_compute_costs_nothing():
    clock = FakeClock()
    work = ModelledWork(FakeWork(), 0.010, clock)
    clock.t += 0.025  # compute longer than the transfer
    assert not work.blocked and work.is_completed() is False  # the real transfer has not been waited on
    work.wait()
    assert clock.slept == [] and work.blocked == 0.0 and work.work.waited == 1


def test_an_early_wait_blocks_for_the_remainder_only():
    clock = FakeClock()
    work = ModelledWork(FakeWork(), 0.010, clock)
    clock.t += 0.004
    work.wait()
    assert clock.slept == [pytest.approx(0.006)] and work.blocked == pytest.approx(0.006)
    assert clock.t == pytest.approx(100.010) and work.is_completed()


def test_a_transfer_already_done_still_takes_its_modelled_time():
    clock = FakeClock()
    work = ModelledWork(None, 0.002, clock)
    assert not work.is_completed()
    clock.t += 0.002
    assert work.is_completed()


@pytest.mark.parametrize(("key", "value"), [("intra_node_gbs", 0.0), ("inter_node_gbs", -1.0),
                                            ("latency_us", -1.0), ("ranks_per_node", 0)])
def test_impossible_values_name_the_key(key, value):
    with pytest.raises(NetworkModelError, match=f"^{key}: "):
        NetworkModel(**{key: value})

"""The modelled interconnect in the trainer (`parallel.network.model=ib_nvlink`): it changes timing only, so a run
with it logs the same losses as one without, and its rows count the step's bytes per link type (2 CPU ranks on two
modelled nodes: everything crosses InfiniBand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import base_overrides, launch, rows

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SHORT = ["train.steps=3", "train.eval_interval=0", "train.eval_batches=0", "checkpoint.interval=0",
         "checkpoint.save_final=false"]
NETWORK = ["parallel.network.model=ib_nvlink", "parallel.network.ranks_per_node=1",
           "parallel.network.inter_node_gbs=5"]


@pytest.mark.parametrize(("layout", "clock"), [(["parallel=dp", "parallel.ep=2"], "wall"),
                                               (["parallel=dualpipe"], "virtual")], ids=["dp_ep2", "dualpipe_pp2"])
def test_a_modelled_network_changes_timing_only(tiny_data: Path, tmp_path: Path, layout: list[str], clock: str):
    plain, modelled = tmp_path / "plain", tmp_path / "modelled"
    launch(base_overrides(tiny_data, plain, *SHORT, *layout), nproc=2)
    launch(base_overrides(tiny_data, modelled, *SHORT, *layout, *NETWORK, f"parallel.network.clock={clock}",
                          "parallel.timeline_step=2"), nproc=2)
    a, b = rows(plain), rows(modelled)
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]  # same arithmetic, same order
    assert all("train/net_inter_node_bytes" not in r for r in a)
    for r in b:
        assert r["train/net_inter_node_bytes"] > 0 and r["train/net_intra_node_bytes"] == 0
        assert r["train/net_modelled_s"] > 0 and r["train/net_exposed_s"] >= 0 and r["train/net_step_time_s"] > 0
        # the tail gradient reduction (parallel/grad_reduce.py): DualPipe's mirror sum, the data-parallel average
        # under schedule=none
        assert r["train/net_grad_reduce_s"] > 0 and r["train/net_grad_reduce_exposed_s"] >= 0
        if clock == "wall":  # a wait is held for at most its own transfer's duration (on the virtual clock the
            # hold also covers waiting for a later participant: bubbles and skew)
            assert r["train/net_exposed_s"] <= r["train/net_modelled_s"]
    # the recorded step's trace: compute on one track, the reduction's buckets on their own, on one clock
    trace = json.loads((modelled / "timeline.json").read_text())["traceEvents"]
    ops = [e for e in trace if e["ph"] == "X" and e["tid"] == 0]
    buckets = [e for e in trace if e["ph"] == "X" and e["cat"] == "grad_reduce"]
    assert ops and buckets and all(e["tid"] == 2 for e in buckets)
    # a bucket is posted during the step's compute and waited for after it (same clock: no offset between them)
    end = max(e["ts"] + e["dur"] for e in ops)
    assert all(min(e["ts"] for e in ops) <= b["ts"] <= end for b in buckets)
    # buckets carry their modelled seconds (what parallel.simulate.step_makespan replays); a bucket of a group of
    # one rank (an expert shard no other replica holds: dp_ep2) sends nothing and has none
    assert any(b["args"].get("modelled_us", 0.0) > 0 for b in buckets)
    if "parallel=dualpipe" in layout:  # DualPipe's step tail: one per rank, after its last op, its wait within it
        tails = [e for e in trace if e["ph"] == "X" and e["cat"] == "step_tail"]
        assert sorted(e["pid"] for e in tails) == [0, 1] and all(e["tid"] == 3 for e in tails)
        for t in tails:
            last = max(e["ts"] + e["dur"] for e in ops if e["pid"] == t["pid"])
            assert t["ts"] >= last - 1.0 and 0 <= t["args"].get("waited_us", 0.0) <= t["dur"]


def test_two_hop_dispatch_trains_like_one_hop_with_fewer_inter_node_bytes(tiny_data: Path, tmp_path: Path):
    """ep=4 over 2 modelled nodes of 2 ranks (`parallel.ep_dispatch=two_hop`): the same first step as the one-hop
    dispatcher, and less traffic over the inter-node link every step."""
    from tests.trainer.conftest import assert_first_step_matches

    layout = ["parallel=dp", "parallel.ep=4", "parallel.ep_ranks_per_node=2", "train.global_batch_size=16",
              "parallel.network.model=ib_nvlink", "parallel.network.ranks_per_node=2"]
    runs = {}
    for dispatch in ("one_hop", "two_hop"):
        runs[dispatch] = tmp_path / dispatch
        launch(base_overrides(tiny_data, runs[dispatch], *SHORT, *layout, f"parallel.ep_dispatch={dispatch}"),
               nproc=4, timeout=400)
    assert_first_step_matches(runs["two_hop"], runs["one_hop"])
    one, two = rows(runs["one_hop"]), rows(runs["two_hop"])
    assert all(b["train/net_inter_node_bytes"] < a["train/net_inter_node_bytes"] for a, b in zip(one, two))

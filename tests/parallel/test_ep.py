"""Expert parallelism: the all-to-all dispatcher against the single-process model, state-dict sharding, and the
node-limited routing check."""

from __future__ import annotations

import copy

import pytest
import torch

from model.moe import LocalDispatcher, MoE
from model.transformer import DeepseekV3
from parallel.dispatcher import AllToAllDispatcher, expert_major_permutation
from parallel.expert_shard import (
    gather_expert_state,
    is_expert_key,
    node_limited_groups,
    shard_experts,
    slice_expert_state,
)
from parallel.spawn import run_ranks
from tests.conftest import tiny_config
from tests.parallel.ep_workers import SKEWS, run_ep, run_fp8_dispatch

TOL = 1e-6  # relative, fp32


@pytest.fixture(scope="module")
def ep2():
    """One 2-process run (the layer under three routing skews, then the whole tiny model); tests read it."""
    return run_ranks(2, run_ep)


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", sorted(SKEWS))
def test_moe_layer_ep2_equals_single_process(ep2, scenario):
    """Each rank feeds its own (unevenly many) tokens: outputs, input grads, local expert grads and summed
    replicated grads equal the single-process layer fed every rank's tokens; counts sum to its counts."""
    for rank, report in enumerate(ep2):
        r = report["layer"][scenario]
        assert r["out"] <= TOL and r["xgrad"] <= TOL, (rank, r)
        assert all(d <= TOL for d in r["grads"].values()), (rank, r["grads"])
        assert r["counts_equal"]
    loads = [ep2[rank]["layer"][scenario]["expert_loads"] for rank in range(2)]
    if scenario == "rank1_empty":
        assert sum(loads[1]) == 0 and sum(loads[0]) > 0  # a whole rank receives nothing
    if scenario == "experts_empty":
        assert loads[0][1] == loads[0][2] == loads[1][2] == 0 and sum(loads[0]) > 0 and sum(loads[1]) > 0


@pytest.mark.multiprocess
def test_async_post_wait_bitwise_equals_sync(ep2):
    """Shared experts computed between dispatch post and wait: same outputs and gradients, bit for bit."""
    for report in ep2:
        assert all(report["layer"][s]["async_bitwise"] for s in SKEWS)


@pytest.mark.multiprocess
def test_model_ep2_equals_single_process(ep2):
    """The tiny model (3 MoE layers incl. MTP; layer 1 sends nothing to rank 1): per-rank logits and loss, grads
    (expert grads / dp, replicated grads averaged) and summed router counts equal the single-process model's."""
    for rank, report in enumerate(ep2):
        m = report["model"]
        assert m["logits"] <= TOL and m["loss"] <= TOL, (rank, m["logits"], m["loss"])
        bad = {n: d for n, d in m["grads"].items() if d > TOL}
        assert not bad, (rank, bad)
        assert any(is_expert_key(n) for n in m["grads"])
        assert m["counts_equal"]
        assert m["rank_loads"]["layers.1.block.mlp.gate"][1] == 0


# ---- single-process pieces ------------------------------------------------------------------------------
def test_expert_major_permutation():
    # received: from rank 0 two rows for expert 0 and one for expert 2; from rank 1 one for 0, three for 1
    perm, inverse = expert_major_permutation(torch.tensor([[2, 0, 1], [1, 3, 0]]))
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert torch.equal(perm[inverse], torch.arange(7))
    empty, _ = expert_major_permutation(torch.zeros(2, 3, dtype=torch.long))
    assert empty.numel() == 0


def _sharded(model, ep):
    return [shard_experts(copy.deepcopy(model), r, ep) for r in range(ep)]


def test_shard_gather_slice_round_trip():
    model = DeepseekV3(tiny_config())
    full = model.state_dict()
    shards = _sharded(model, 2)
    states = [s.state_dict() for s in shards]
    assert all(sd.keys() == full.keys() for sd in states)  # same names, now the local experts
    moe = shards[1].layers[1].block.mlp
    assert isinstance(moe.dispatcher, AllToAllDispatcher) and moe.experts.first_expert == 4
    assert moe.experts.gate_up_proj.weight.shape[0] == 4
    gathered = gather_expert_state(states)
    assert gathered.keys() == full.keys() and all(torch.equal(gathered[k], full[k]) for k in full)
    for ep in (2, 4):
        sliced = [slice_expert_state(full, r, ep) for r in range(ep)]
        back = gather_expert_state(sliced)
        assert all(torch.equal(back[k], full[k]) for k in full)
        for r, sd in enumerate(sliced):
            key = "layers.2.block.mlp.experts.down_proj.weight"
            assert torch.equal(sd[key], full[key][r * 8 // ep:(r + 1) * 8 // ep])
    for r, shard in enumerate(_sharded(model, 4)):  # a shard's own state is the slice; it loads it strictly
        sliced = slice_expert_state(full, r, 4)
        assert all(torch.equal(v, sliced[k]) for k, v in shard.state_dict().items())
        shard.load_state_dict(sliced)
    assert not is_expert_key("layers.1.block.mlp.shared_experts.down_proj.weight")


def test_shard_rejects_bad_layouts():
    model = DeepseekV3(tiny_config())
    with pytest.raises(ValueError, match="divisible"):
        shard_experts(copy.deepcopy(model), 0, 3)
    with pytest.raises(ValueError, match="unsharded"):
        shard_experts(shard_experts(copy.deepcopy(model), 0, 2), 0, 2)


def test_single_rank_ep_group_matches_local(tmp_path):
    """ep=1 over a one-process group: the all-to-all dispatcher equals the local one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = tiny_config()
        moe = MoE(cfg)
        x = torch.randn(2, 5, cfg.hidden_size)
        ref, _ = moe(x)
        moe.dispatcher = AllToAllDispatcher(None, 1, 0, cfg.n_routed_experts)
        out, _ = moe(x)
        assert torch.equal(out, ref)
        moe.dispatcher = LocalDispatcher()
    finally:
        dist.destroy_process_group()


def test_node_limited_groups():
    assert node_limited_groups(ep_size=64, ep_ranks_per_node=8, n_group=8, topk_group=4) == (8, 4)  # V3
    assert node_limited_groups(ep_size=16, ep_ranks_per_node=8, n_group=8, topk_group=4) == (2, 2)
    assert node_limited_groups(ep_size=8, ep_ranks_per_node=8, n_group=1, topk_group=1) == (1, 1)
    with pytest.raises(ValueError, match="each router group on one node"):
        node_limited_groups(ep_size=32, ep_ranks_per_node=2, n_group=8, topk_group=4)  # 16 nodes, 8 groups
    with pytest.raises(ValueError, match="whole number of nodes"):
        node_limited_groups(ep_size=12, ep_ranks_per_node=8, n_group=8, topk_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        node_limited_groups(ep_size=8, ep_ranks_per_node=8, n_group=4, topk_group=5)


def test_node_limited_routing_reaches_at_most_topk_group_nodes():
    """ep=8 with 2 ranks per node (4 nodes), 32 experts in 4 groups, 2 groups kept: the experts every token picks
    live on at most 2 nodes, and with many tokens some do reach 2 (the bound is tight)."""
    from model.router import Router

    cfg = tiny_config(n_routed_experts=32, num_experts_per_tok=6, n_group=4, topk_group=2)
    nodes, max_nodes = node_limited_groups(ep_size=8, ep_ranks_per_node=2, n_group=4, topk_group=2)
    router = Router(cfg)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.5)  # any bias: the group limit holds regardless
    routing = router(torch.randn(1, 512, cfg.hidden_size))
    experts_per_node = cfg.n_routed_experts // nodes
    reached = torch.stack([torch.unique(row // experts_per_node).numel() * torch.ones(())
                           for row in routing.experts.reshape(-1, cfg.num_experts_per_tok)])
    assert int(reached.max()) <= max_nodes == 2
    assert int(reached.max()) == 2


@pytest.mark.multiprocess
def test_ep4_equals_single_process():
    """ep=4 on 4 processes (one local expert pair each; under the `rank1_empty` skew ranks 2 and 3 get nothing):
    the same equalities as at ep=2, for the layer under every skew and for the whole model."""
    reports = run_ranks(4, run_ep)
    for rank, report in enumerate(reports):
        for scenario, r in report["layer"].items():
            assert r["out"] <= TOL and r["xgrad"] <= TOL and r["counts_equal"] and r["async_bitwise"], (rank, scenario)
            assert all(d <= TOL for d in r["grads"].values()), (rank, scenario, r["grads"])
        m = report["model"]
        assert m["logits"] <= TOL and m["loss"] <= TOL and m["counts_equal"], rank
        assert all(d <= TOL for d in m["grads"].values()), rank
    assert sum(reports[2]["layer"]["rank1_empty"]["expert_loads"]) == 0


@pytest.mark.multiprocess
def test_fp8_dispatch_sends_e4m3_rows_with_tile_scales():
    """precision.fp8.dispatch: the dispatch all-to-all carries E4M3 bytes + 1x128-tile scales; the layer moves
    by FP8 rounding only: its output and input gradient equal those of the full-precision dispatch of the same
    rows quantized and dequantized before sending, and every dispatched value is within E4M3's rounding bound
    (3 mantissa bits: 2^-4 of itself). Gradients and the combine stay in full precision."""
    for rep in run_ranks(2, run_fp8_dispatch):
        assert rep["finite"] and rep["dispatched"] > 0
        assert rep["out_equal"] and rep["grad_equal"]  # the same values arrive: the same arithmetic after
        assert rep["quantization_vs_bound"] <= 1.0, rep["quantization_vs_bound"]
        assert rep["out_rel"] > 0  # and FP8 did round something
        assert any(label.startswith("dispatch") and label.endswith("fp8") for label in rep["labels_fp8"])
        assert any(label.endswith("scales") for label in rep["labels_fp8"])
        assert not any(label.endswith("fp8") for label in rep["labels_plain"])
        assert not any(label.startswith("combine") and label.endswith("fp8") for label in rep["labels_fp8"])

"""The router bias update uses the counts of the whole global batch: all microbatches, all DP ranks."""

from __future__ import annotations

import pytest
import torch

from parallel.spawn import run_ranks
from tests.conftest import tiny_config

pytestmark = pytest.mark.multiprocess


def _update_on_rank(rank: int, world: int) -> dict:
    from model.transformer import DeepseekV3
    from trainer.load_balance import moe_routers, update_router_biases

    torch.manual_seed(0)
    model = DeepseekV3(tiny_config()).train()
    routers = moe_routers(model)
    # Different data per rank, two microbatches each: the local loads differ between ranks.
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        tokens = torch.randint(0, 64 if rank == 0 else 256, (2, 18), generator=gen)
        model(tokens).loss.backward()
    local = {i: r.step_counts.clone() for i, r in routers.items()}
    counts = update_router_biases(routers)
    biases = {i: r.e_score_correction_bias.clone() for i, r in routers.items()}
    assert all(float(r.step_counts.abs().sum()) == 0 for r in routers.values())  # cleared for the next step
    return {"local": local, "global": counts, "bias": biases}


def test_bias_update_uses_global_counts_and_is_identical_on_every_rank():
    out = run_ranks(2, _update_on_rank)
    r0, r1 = out
    assert set(r0["bias"]) == {1, 2, 3}  # two MoE decoder layers and the MTP block
    for layer in r0["bias"]:
        assert not torch.equal(r0["local"][layer], r1["local"][layer])  # the ranks saw different loads
        total = r0["local"][layer] + r1["local"][layer]
        assert torch.equal(r0["global"][layer], total) and torch.equal(r1["global"][layer], total)
        gamma = tiny_config().bias_update_speed
        expected = gamma * torch.sign(total.mean() - total).float()
        torch.testing.assert_close(r0["bias"][layer], expected, rtol=0, atol=0)
        torch.testing.assert_close(r1["bias"][layer], expected, rtol=0, atol=0)
    # what rank 0 alone would have done differs somewhere: the all-reduce mattered
    alone = {i: torch.sign(c.mean() - c) for i, c in r0["local"].items()}
    assert any(not torch.equal(alone[i], torch.sign(r0["global"][i].mean() - r0["global"][i])) for i in alone)

import torch

from model.router import Router, max_violation
from tests.conftest import tiny_config


def make_router(**overrides) -> Router:
    cfg = tiny_config(**overrides)
    router = Router(cfg)
    router.train()
    return router


def test_selection_uses_the_bias_and_gates_do_not():
    router = make_router(n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0)
    x = torch.randn(1, 64, 64)
    before = router(x)
    # a huge bias on experts 5 and 6 makes every token choose them ...
    router.e_score_correction_bias[5] = 10.0
    router.e_score_correction_bias[6] = 10.0
    after = router(x)
    assert (after.experts.sort(dim=1).values == torch.tensor([5, 6])).all()
    assert not torch.equal(before.experts.sort(dim=1).values, after.experts.sort(dim=1).values)
    # ... but the gate values are the unbiased sigmoid scores of experts 5 and 6, normalised
    scores = router.scores(x.view(-1, 64))
    expected = scores.gather(1, after.experts)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(after.gates, expected, rtol=0, atol=1e-7)


def test_gates_normalised_times_routed_scale():
    router = make_router(routed_scaling_factor=2.5)
    r = router(torch.randn(2, 16, 64))
    torch.testing.assert_close(r.gates.sum(-1), torch.full((32,), 2.5), rtol=0, atol=1e-5)


def test_masked_groups_are_never_chosen():
    # 8 experts in 4 groups of 2, keep 2 groups: every chosen expert must lie in the token's two best groups
    router = make_router(n_group=4, topk_group=2, num_experts_per_tok=3)
    torch.nn.init.normal_(router.weight, std=0.3)  # spread the affinities so groups really compete
    router.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
    x = torch.randn(4, 32, 64)
    r = router(x)
    biased = router.scores(x.view(-1, 64)) + router.e_score_correction_bias
    group_rank = biased.view(-1, 4, 2).topk(2, dim=-1).values.sum(-1)
    kept = group_rank.topk(2, dim=-1).indices  # [T, 2]
    chosen_groups = r.experts // 2
    assert all(set(chosen_groups[t].tolist()) <= set(kept[t].tolist()) for t in range(chosen_groups.shape[0]))
    # the group limit matters here: without it some token would pick an expert outside its kept groups
    unlimited = biased.topk(3, dim=-1).indices // 2
    assert any(not set(unlimited[t].tolist()) <= set(kept[t].tolist()) for t in range(unlimited.shape[0]))


def test_counts_are_right():
    router = make_router()
    r = router(torch.randn(3, 10, 64))
    manual = torch.zeros(8, dtype=torch.long)
    for e in r.experts.flatten().tolist():
        manual[e] += 1
    assert torch.equal(r.counts, manual)
    assert int(r.counts.sum()) == 30 * 2


def test_bias_update_rule_and_reset():
    router = make_router(bias_update_speed=0.001)
    router.step_counts.copy_(torch.tensor([10, 0, 5, 5, 5, 5, 5, 5], dtype=torch.float64))
    router.update_bias()
    # mean load 5: overloaded expert 0 goes down, underloaded expert 1 goes up, the rest stay
    assert torch.allclose(router.e_score_correction_bias, torch.tensor([-0.001, 0.001, 0, 0, 0, 0, 0, 0]))
    assert router.step_counts.sum() == 0
    assert router.e_score_correction_bias.dtype == torch.float32
    assert "e_score_correction_bias" in router.state_dict() and "step_counts" not in router.state_dict()


def test_bias_updates_balance_a_skewed_routing_problem():
    """Tokens whose affinities strongly favour a few experts: repeated updates cut MaxVio by >= 5x."""
    torch.manual_seed(1)
    router = make_router(n_group=1, topk_group=1, num_experts_per_tok=2, n_routed_experts=8)
    shared = torch.ones(64) / 8  # a direction every token has, and experts 0 and 1 like
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64) * 0.1)
        router.weight[0] += 2 * shared
        router.weight[1] += 1.5 * shared
    x = torch.randn(32, 64, 64) + shared
    start = max_violation(router(x).counts)
    for _ in range(300):
        router.step_counts += router(x).counts
        router.update_bias(gamma=0.01)
    end = max_violation(router(x).counts)
    assert start > 1.0
    assert end * 5 <= start, (start, end)


def test_sequence_balance_loss_formula():
    router = make_router(seq_aux_alpha=0.1, n_group=1, topk_group=1)
    x = torch.randn(2, 5, 64)
    r = router(x)
    scores = router.scores(x.view(-1, 64)).view(2, 5, 8)
    experts = r.experts.view(2, 5, 2)
    total = 0.0
    for b in range(2):
        counts = torch.bincount(experts[b].flatten(), minlength=8).float()
        f = counts * 8 / (2 * 5)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        total += float((f * p).sum().detach())
    assert abs(float(r.balance_loss.detach()) - 0.1 * total / 2) < 1e-6

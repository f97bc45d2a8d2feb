"""The routed experts' weight-gradients held back during their backward and run once the next all-to-all is posted
(parallel/ep_overlap.py HeldWeightGrads, DeepSeek-V3's MLP(W) placement): while held, no weight gradient exists;
released, they equal plain autograd's; with a zero-bubble store underneath, released work joins its W group."""

from __future__ import annotations

import torch

from model.moe import RoutedExperts
from parallel.ep_overlap import HeldWeightGrads
from parallel.weight_grad import WeightGradStore

ROWS = torch.tensor([3, 0, 5, 2])


def _experts_and_input():
    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 8)
    x = torch.randn(int(ROWS.sum()), 16, requires_grad=True)
    return experts, x


def _reference():
    experts, x = _experts_and_input()
    experts(x, ROWS).square().sum().backward()
    return x.grad, {n: p.grad for n, p in experts.named_parameters()}


def test_held_weight_grads_run_on_release_and_equal_autograd():
    ref_x, ref_w = _reference()
    experts, x = _experts_and_input()
    held = HeldWeightGrads()
    with held.installed(experts):
        y = experts(x, ROWS)
    assert all(p.backend.wgrad_store is None for p in (experts.gate_up_proj, experts.down_proj))  # restored
    with held.holding():
        y.square().sum().backward()
    assert torch.equal(x.grad, ref_x)  # the input-gradient is computed at once
    assert all(p.grad is None for p in experts.parameters())
    held.release()
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, ref_w[name], rtol=0, atol=0)


def test_outside_holding_weight_grads_run_in_backward():
    experts, x = _experts_and_input()
    held = HeldWeightGrads()
    with held.installed(experts):
        y = experts(x, ROWS)
    y.square().sum().backward()
    assert all(p.grad is not None for p in experts.parameters())


def test_released_work_joins_the_pipelines_weight_gradient_group():
    ref_x, ref_w = _reference()
    experts, x = _experts_and_input()
    store = WeightGradStore()
    from model.gemm import defer_weight_grads

    defer_weight_grads(experts, store)  # the zero-bubble pipeline's store, as parallel/dualpipe_engine.py sets it
    held = HeldWeightGrads()
    with held.installed(experts):
        y = experts(x, ROWS)
    group = store.open_group("b")
    with store.capturing_into(group):
        with held.holding():
            y.square().sum().backward()
        held.release()  # inside the backward's step: deferred to the W group, not run
    store.close_group(group)
    assert all(p.grad is None for p in experts.parameters())
    assert store.pop() == "b"
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, ref_w[name], rtol=0, atol=0)
    assert torch.equal(x.grad, ref_x)

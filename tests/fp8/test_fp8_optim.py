"""AdamW with BF16 moments: close to torch's AdamW, half the state memory, and usable as DeepSpeed's ZeRO-1
client optimizer on CPU."""

from __future__ import annotations

import pytest
import torch

from parallel.spawn import run_ranks
from tests.fp8.fp8_optim_workers import run_zero1_bf16_moments
from trainer.optim import BF16MomentsAdamW, optimizer_state_bytes


def test_bf16_moments_follow_adamw_and_halve_the_state():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = BF16MomentsAdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(20):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert ours.state[b]["exp_avg"].dtype == torch.bfloat16 and ours.state[b]["exp_avg_sq"].dtype == torch.bfloat16
    # BF16 keeps 8 bits of the moments: the updates differ by a fraction of a percent of their size
    moved = (a.detach() - w0).abs().mean()
    assert float((a.detach() - b.detach()).abs().mean()) < 0.01 * float(moved)
    assert optimizer_state_bytes(ours) * 2 == optimizer_state_bytes(ref)  # 2+2 bytes vs 4+4 per value


@pytest.mark.multiprocess
def test_zero1_client_optimizer_with_bf16_moments():
    """ZeRO-1 over 2 ranks shards the client optimizer's states (kept in BF16) and, given the same gradients,
    steps like the optimizer alone (to one BF16 rounding step of a moment: see the worker)."""
    reports = run_ranks(2, run_zero1_bf16_moments, 3)
    for rep in reports:
        assert rep["optimizer"] == "BF16MomentsAdamW"
        assert rep["moment_dtypes"] == ["torch.bfloat16"]
        assert rep["worst"][0] <= 1.0, rep["worst"]

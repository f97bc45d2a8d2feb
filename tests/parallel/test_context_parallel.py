"""Context parallelism (Ulysses, parallel/context_parallel.py) equals the single-process model: each rank holds
S / cp positions of every sample, and the losses (their mean over the CP group) and the gradients (their mean
over the group, as the data-parallel reduction takes it) are the single-process ones, with MTP, MoE (the
sequence-wise balance loss over the whole sequence) and packed documents."""

from __future__ import annotations

import pytest
import torch

from parallel.spawn import run_ranks
from tests.conftest import tiny_config
from tests.parallel.pipeline_workers import forward, make_batches

# fp32. A rank's GEMMs see S / cp rows instead of S: each output element is the same K-term dot product, but the
# kernel may block K differently for another row count, so activations differ by <= K u |terms| per layer
# (K <= 128, u = 2^-24: ~1e-5 of their scale over the 4 blocks here, MTP's included); gradients inherit that and
# add the reassociation of their sums over positions split in cp parts (<= n u, n <= 64): 1e-4 of each tensor's
# largest entry. A wrong position offset, exchange or loss scale moves them by O(1) of that scale.
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5  # a mean over 64 tokens of per-token losses, each as exact as the activations


def run_cp(rank: int, world: int, cp: int, documents: bool) -> dict:
    import torch.distributed as dist

    from model.sequence_shard import SequenceShard, shard_sequences
    from model.transformer import DeepseekV3
    from parallel.context_parallel import UlyssesExchange

    cfg = tiny_config(num_attention_heads=4)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    shard_sequences(model, SequenceShard(rank, cp, UlyssesExchange(dist.group.WORLD, cp)))
    batch = make_batches(cfg, 1, documents=documents)[0]
    out = forward(model, batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():  # the data-parallel mean over the CP group
        dist.all_reduce(g)
        g /= cp
    losses = torch.stack([out.lm_loss.detach(), out.mtp_losses[0].detach(), out.balance_loss.detach()])
    dist.all_reduce(losses)
    counts = {n: m.step_counts.clone() for n, m in model.named_modules() if hasattr(m, "step_counts")}
    return {"grads": grads, "losses": (losses / cp).tolist(), "counts": counts}


def reference(documents: bool) -> dict:
    cfg = tiny_config(num_attention_heads=4)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    batch = make_batches(cfg, 1, documents=documents)[0]
    out = forward(model, batch)
    out.loss.backward()
    return {"grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "losses": [out.lm_loss.item(), out.mtp_losses[0].item(), out.balance_loss.item()],
            "counts": {n: m.step_counts.clone() for n, m in model.named_modules() if hasattr(m, "step_counts")}}


from model.transformer import DeepseekV3  # noqa: E402  (used by `reference` in the parent process)


def check(reports: list[dict], ref: dict) -> None:
    for got, want in zip(reports[0]["losses"], ref["losses"], strict=True):
        assert abs(got - want) <= LOSS_RTOL * abs(want), (reports[0]["losses"], ref["losses"])
    assert set(reports[0]["grads"]) == set(ref["grads"])
    for name, want in ref["grads"].items():
        err = float((reports[0]["grads"][name] - want).abs().max())
        assert err <= GRAD_RTOL * float(want.abs().max()), (name, err, float(want.abs().max()))
    # router counts: each rank counts its own positions; together they are the whole batch's
    for name, want in ref["counts"].items():
        assert torch.equal(sum(r["counts"][name] for r in reports), want), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("documents", [False, True], ids=["plain", "packed_documents"])
def test_cp2_equals_single_process(documents: bool):
    check(run_ranks(2, run_cp, 2, documents), reference(documents))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cp4_equals_single_process():
    check(run_ranks(4, run_cp, 4, True), reference(True))

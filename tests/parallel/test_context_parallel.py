"""Context parallelism (Ulysses, parallel/context_parallel.py) equals the single-process model: each rank holds
S / cp positions of every sample, and the losses (their mean over the CP group) and the gradients (their mean
over the group, as the data-parallel reduction takes it) are the single-process ones, with MTP, MoE (the
sequence-wise balance loss over the whole sequence), packed documents and selective recompute."""

from __future__ import annotations

import pytest
import torch

from parallel.spawn import run_ranks
from tests.conftest import tiny_config
from tests.parallel.engine_workers import CP_FWD_RTOL as LOSS_RTOL  # the bounds and their derivation
from tests.parallel.engine_workers import CP_GRAD_RTOL as GRAD_RTOL
from tests.parallel.pipeline_workers import forward, make_batches


def run_cp(rank: int, world: int, cp: int, documents: bool, selective: bool = False) -> dict:
    import torch.distributed as dist

    from model.sequence_shard import SequenceShard, shard_sequences
    from model.transformer import DeepseekV3
    from parallel.context_parallel import UlyssesExchange

    cfg = tiny_config(num_attention_heads=4, selective_recompute=selective)
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
@pytest.mark.parametrize(("documents", "selective"), [(False, False), (True, False), (True, True)],
                         ids=["plain", "packed_documents", "packed_selective_recompute"])
def test_cp2_equals_single_process(documents: bool, selective: bool):
    """(the reference keeps every activation: selective recompute, inside each rank, must not change a value)"""
    check(run_ranks(2, run_cp, 2, documents, selective), reference(documents))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cp4_equals_single_process():
    check(run_ranks(4, run_cp, 4, True), reference(True))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_cp2_with_a_pp2_pipeline_trains_as_single_process(schedule: str):
    """cp=2 x pp=2 (4 ranks): two AdamW steps through the DeepSpeed engine with ZeRO-1 over the cp pair, packed
    documents, MTP; the comparison and its tolerances of tests/parallel/engine_workers.py at the CP bounds."""
    from tests.parallel.engine_workers import assert_evaluation_matches, assert_matches, run_engine

    reports = run_ranks(4, run_engine, schedule, 2, 4, 2, 1.0, 4 if schedule == "dualpipev" else 2, True, 2)
    for rep in reports:
        assert_matches(rep)
        assert_evaluation_matches(rep)

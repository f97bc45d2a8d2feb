"""One FP8 training step of the tiny model as the pipeline runs it: apply_fp8 first, then (optionally) the
zero-bubble weight-gradient deferral, with or without activation checkpointing."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.fp8.factory import apply_fp8, fp8_layers
from model.gemm import GemmBackend, defer_weight_grads
from model.transformer import DeepseekV3
from parallel.weight_grad import WeightGradStore
from tests.conftest import tiny_config


def fp8_step(make_backend: Callable[[], GemmBackend], tokens: torch.Tensor, checkpointing: bool, deferred: bool,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], DeepseekV3]:
    """(loss, gradients by name, model) of one forward+backward from the seed-0 weights."""
    torch.manual_seed(0)
    model = DeepseekV3(tiny_config(activation_checkpointing=checkpointing)).train()
    backend = make_backend()
    assert set(apply_fp8(model, backend)) == set(fp8_layers(model))
    store = None
    if deferred:
        store = WeightGradStore()
        defer_weight_grads(model, store)
        assert all(type(m.backend) is type(backend) for m in fp8_layers(model).values())
    out = model(tokens)
    if store is not None:
        with store.capture("mb0"):
            out.loss.backward()
        assert model.layers[0].block.self_attn.o_proj.weight.grad is None  # deferred
        store.pop()
    else:
        out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model


def assert_same_step(results: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> None:
    """Equal losses, gradients equal to fp32 reassociation."""
    (l0, g0), *others = results
    for loss, grads in others:
        assert torch.equal(loss, l0)
        for n, g in g0.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7 * float(g.abs().max()) + 1e-12)

"""The emulated FP8 backend: each GEMM quantizes its operands exactly as its recipe says, grouped GEMMs
quantize expert by expert, the right layers switch, and FP8 composes with deferred weight-gradients and
activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from model.fp8.emulated import EmulatedFP8Backend
from model.fp8.factory import apply_fp8, fp8_layers
from model.fp8.numerics import RECIPES, quantize_dequantize
from model.gemm import DEFAULT_BACKEND, GroupedLinear, Linear
from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.fp8.fp8_steps import assert_same_step, fp8_step

# operand tiles of each recipe, in the orientation the operand has in the GEMM (contraction dim last)
TILES = {
    "blockwise": {"x": (1, 128), "w": (128, 128), "g": (1, 128), "t": (128, 1)},
    "mxfp8": {"x": (1, 32), "w": (1, 32), "g": (1, 32), "t": (32, 1)},
    "current": {"x": None, "w": None, "g": None, "t": None},
}


def qd(t, tile, recipe):
    return quantize_dequantize(t, tile, power_of_two=recipe == "mxfp8")


@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8", "current"])
def test_gemms_quantize_operands_as_the_recipe_says(recipe):
    torch.manual_seed(0)
    x, w, g = torch.randn(200, 300), torch.randn(160, 300) * 0.02, torch.randn(200, 160)
    t = TILES[recipe]
    b = EmulatedFP8Backend(recipe, scaled_mm=False)
    assert torch.equal(b.fprop(x, w), qd(x, t["x"], recipe) @ qd(w, t["w"], recipe).t())
    # dgrad contracts over W's rows: the contraction-last operand is W^T
    assert torch.equal(b.dgrad(g, w), qd(g, t["g"], recipe) @ qd(w.t(), t["w"], recipe).t())
    # wgrad contracts over tokens: token tiles on dY and X
    assert torch.equal(b.wgrad(g, x), qd(g, t["t"], recipe).t() @ qd(x, t["t"], recipe))


@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8", "current"])
def test_grouped_gemms_quantize_expert_by_expert(recipe):
    """A grouped GEMM equals the 2-D GEMMs of each expert's rows (ragged groups, one empty)."""
    torch.manual_seed(0)
    rows = [37, 0, 130, 5]
    offsets = torch.tensor(rows).cumsum(0).to(torch.int32)
    x, g = torch.randn(sum(rows), 96), torch.randn(sum(rows), 144)
    w = torch.randn(len(rows), 144, 96) * 0.05
    b = EmulatedFP8Backend(recipe, scaled_mm=False)
    y, dx, dw = b.grouped_fprop(x, w, offsets), b.grouped_dgrad(g, w, offsets), b.grouped_wgrad(g, x, offsets, 4)
    start = 0
    for e, n in enumerate(rows):
        sl = slice(start, start + n)
        if n:
            torch.testing.assert_close(y[sl], b.fprop(x[sl], w[e]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dx[sl], b.dgrad(g[sl], w[e]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dw[e], b.wgrad(g[sl], x[sl]), rtol=1e-5, atol=1e-4)
        else:
            assert not dw[e].any()
        start += n


def test_layers_differentiate_through_the_backend():
    torch.manual_seed(0)
    layer = Linear(64, 32)
    b = EmulatedFP8Backend("blockwise")
    layer.backend = b
    x = torch.randn(4, 5, 64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2, g2 = x.detach().reshape(-1, 64), gy.reshape(-1, 32)
    assert torch.equal(y.reshape(-1, 32), b.fprop(x2, layer.weight.detach()))
    assert torch.equal(x.grad.reshape(-1, 64), b.dgrad(g2, layer.weight.detach()))
    assert torch.equal(layer.weight.grad, b.wgrad(g2, x2))


def test_bf16_operands_give_bf16_results():
    b = EmulatedFP8Backend("blockwise")
    x, w = torch.randn(8, 128, dtype=torch.bfloat16), torch.randn(16, 128, dtype=torch.bfloat16)
    assert b.fprop(x, w).dtype == torch.bfloat16


def test_apply_fp8_switches_the_report_layers_only():
    model = DeepseekV3(tiny_config())
    names = apply_fp8(model, EmulatedFP8Backend("delayed"))
    assert set(names) == set(fp8_layers(model))
    every = {n for n, m in model.named_modules() if isinstance(m, Linear | GroupedLinear)}
    # high precision: the output head and the MTP projection (router, embedding, norms are no Linear)
    assert every - set(names) == {"head.lm_head", "head.mtp.0.eh_proj"}
    assert model.head.lm_head.backend is DEFAULT_BACKEND
    assert any(".mlp.experts.gate_up_proj" in n for n in names) and any("shared_experts" in n for n in names)
    assert any("head.mtp.0.block.self_attn" in n for n in names)
    backends = [model.get_submodule(n).backend for n in names]
    assert len({id(b) for b in backends}) == len(backends)  # delayed keeps state per layer


def _loss_and_grads(model, tokens):
    model.zero_grad()
    out = model(tokens)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fp8_model_trains_close_to_fp32():
    cfg = tiny_config()
    torch.manual_seed(0)
    ref = DeepseekV3(cfg).train()
    fp8 = DeepseekV3(cfg).train()
    fp8.load_state_dict(ref.state_dict())
    apply_fp8(fp8, EmulatedFP8Backend("blockwise"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 18))
    l_ref, g_ref = _loss_and_grads(ref, tokens)
    l_fp8, g_fp8 = _loss_and_grads(fp8, tokens)
    assert l_fp8 != l_ref and abs(float(l_fp8 - l_ref)) < 1e-3 * float(l_ref)
    flat_ref = torch.cat([g.flatten() for g in g_ref.values()])
    flat_fp8 = torch.cat([g_fp8[n].flatten() for n in g_ref])
    assert float(torch.nn.functional.cosine_similarity(flat_ref, flat_fp8, dim=0)) > 0.99


@pytest.mark.parametrize("recipe", RECIPES)
def test_deferred_weight_grads_and_recompute_keep_fp8_numerics(recipe):
    """apply_fp8 then defer_weight_grads (the pipeline's order): W later gives the same gradients; under
    activation checkpointing the recompute quantizes as the forward did, so loss and gradients are equal."""
    cfg = tiny_config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing, deferred in ((False, False), (True, False), (False, True)):
        loss, grads, model = fp8_step(lambda: EmulatedFP8Backend(recipe), tokens, checkpointing, deferred)
        results.append((loss, grads))
        if recipe == "delayed":  # one record per forward, none from the recompute
            hist = model.layers[0].block.self_attn.o_proj.backend.histories[("x",)]
            assert len(hist.values) == 1
    assert_same_step(results)

"""FP8 activation caching (the report's low-precision storage) and the memory levers around it.

- An FP8 linear keeps its weight-gradient GEMM's own E4M3 operand instead of its input: the weight gradient is
  bit for bit the one quantizing the input in backward gives (emulated and torch backends, plain and grouped,
  every recipe that quantizes the same input the same way), and what is kept is 1 byte a value plus scales.
- SwiGLU inputs kept in E4M3 1x128 tiles: the forward is untouched, the backward is exactly the backward of
  the quantize-dequantized input; half the bytes of bf16.
- The router's fp32 logits keep the bf16 input (not its fp32 copy) with autograd's own gradient bits.
- Selective recompute reruns the FFN's RMSNorm: the same step bit for bit, less kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.activation_memory import SavedTensorLedger, kept_for_backward
from model.fp8.emulated import EmulatedFP8Backend
from model.fp8.factory import apply_fp8
from model.fp8.numerics import FP8Storage, quantize_dequantize
from model.fp8.scaled_mm import ScaledMMFP8Backend
from model.gemm import GroupedLinear, Linear
from model.mlp import swiglu
from model.router import _Fp32Logits
from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.fp8.test_fp8_native import needs_cpu_op


def _data(rows: int, cols: int, out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[3, 5] = 40.0  # an outlier: tiles and scales matter
    return x, torch.randn(rows, out, generator=g)


@pytest.mark.parametrize("recipe", ["blockwise", "current", "mxfp8"])
def test_linear_keeps_its_wgrad_operand_exactly(recipe):
    torch.manual_seed(0)
    layer = Linear(256, 96)
    backend = EmulatedFP8Backend(recipe)
    apply_fp8(torch.nn.ModuleDict({"proj": layer}), backend)
    x, g = _data(200, 256, 96)
    xin = x.clone().requires_grad_()
    out, kept = kept_for_backward(lambda: layer(xin), layer.parameters())
    out.backward(g)
    # the reference: quantize the input in backward, as the backend did before it kept the operand
    expected = layer.backend.wgrad(g, x)
    assert torch.equal(layer.weight.grad, expected)
    assert torch.equal(xin.grad, layer.backend.dgrad(g, layer.weight.detach()))
    tile = {"blockwise": 128, "mxfp8": 32}.get(recipe)
    scales = 4 if tile is None else 4 * (-(-200 // tile)) * 256
    assert kept == 200 * 256 + scales, kept  # E4M3 values + fp32 scales, no fp32 input


def test_delayed_keeps_the_forward_scale():
    """`delayed`: the kept operand uses the amax history as the forward leaves it (Transformer Engine's cached
    FP8 input does the same), even when later forwards record larger amaxes before this backward."""
    torch.manual_seed(0)
    layer = Linear(64, 32)
    apply_fp8(torch.nn.ModuleDict({"proj": layer}), EmulatedFP8Backend("delayed"))
    x, g = _data(16, 64, 32)
    out = layer(x)
    scale_then = layer.backend.histories[("x",)].peek(x)
    layer(x * 100)  # a later microbatch's forward records a 100x amax
    out.backward(g)
    xq = quantize_dequantize(x, None, False, scale_then)
    expected = (quantize_dequantize(g.t(), None, False, layer.backend.histories[("g",)].peek(g)) @ xq)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["blockwise", "current", "delayed", "mxfp8"])
def test_grouped_linear_keeps_its_wgrad_operands_exactly(recipe):
    torch.manual_seed(0)
    layer = GroupedLinear(4, 256, 64)
    apply_fp8(torch.nn.ModuleDict({"experts": layer}), EmulatedFP8Backend(recipe))
    rows = torch.tensor([130, 0, 7, 150])  # an empty expert, an expert shorter than a tile
    offsets = rows.cumsum(0, dtype=torch.int32)
    x, g = _data(int(rows.sum()), 256, 64)
    xin = x.clone().requires_grad_()
    out, kept = kept_for_backward(lambda: layer(xin, offsets), layer.parameters())
    out.backward(g)
    expected = layer.backend.grouped_wgrad(g, x, offsets, 4)
    assert torch.equal(layer.weight.grad, expected)
    n = int(rows.sum())
    tile = {"blockwise": 128, "mxfp8": 32}.get(recipe)
    scales = 4 * 3 if tile is None else 4 * 256 * sum(-(-int(r) // tile) for r in rows if r)
    assert kept == n * 256 + scales + offsets.numel() * 4, kept


@needs_cpu_op
@pytest.mark.parametrize("recipe", ["current", "blockwise"])  # blockwise runs its row-wise fallback on CPU
def test_torch_backend_keeps_its_wgrad_operand_exactly(recipe):
    torch.manual_seed(0)
    dense, experts = Linear(128, 64), GroupedLinear(3, 128, 64)
    apply_fp8(torch.nn.ModuleDict({"d": dense, "e": experts}), ScaledMMFP8Backend(recipe))
    x, g = _data(96, 128, 64)
    xin = x.clone().requires_grad_()
    out, kept = kept_for_backward(lambda: dense(xin), dense.parameters())
    out.backward(g)
    assert torch.equal(dense.weight.grad, dense.backend.wgrad(g, x))
    assert kept < 96 * 128 * 2  # E4M3 (padded to 16) and scales: under a bf16 copy's bytes
    offsets = torch.tensor([40, 40, 96], dtype=torch.int32)  # expert 1 empty
    experts(x, offsets).backward(g)
    assert torch.equal(experts.weight.grad, experts.backend.grouped_wgrad(g, x, offsets, 3))


def test_swiglu_keeps_its_input_in_e4m3():
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(300, 2 * 192, generator=g).to(torch.bfloat16)
    grad = torch.randn(300, 192, generator=g).to(torch.bfloat16)
    a = gate_up.clone().requires_grad_()
    out, kept = kept_for_backward(lambda: swiglu(a, FP8Storage()))
    assert torch.equal(out, swiglu(gate_up.clone()))  # the forward reads the exact input
    out.backward(grad)
    b = quantize_dequantize(gate_up, (1, 128)).to(torch.bfloat16).requires_grad_()
    swiglu(b.clone()).backward(grad)
    assert torch.equal(a.grad, b.grad)  # the backward reads the E4M3 values
    assert kept == 300 * 384 + 4 * 300 * 3  # 1 byte a value, an fp32 scale per 128 values


def test_router_logits_keep_the_bf16_input_with_autograd_gradients():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(16, 128, generator=g)
    grad = torch.randn(64, 16, generator=g)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, kept = kept_for_backward(lambda: _Fp32Logits.apply(xa, wa))
    out.backward(grad)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.linear(xb.float(), wb.float())
    ref.backward(grad)
    assert torch.equal(out, ref) and torch.equal(xa.grad, xb.grad) and torch.equal(wa.grad, wb.grad)
    assert kept == 64 * 128 * 2 + 16 * 128 * 4  # bf16 x and W, no fp32 copy of x


def _decoder_bytes(model: DeepseekV3, tokens: torch.Tensor) -> int:
    ledger = SavedTensorLedger(model.parameters())
    with ledger.recording():
        model(tokens)
    return ledger.total


def test_fp8_caching_and_selective_recompute_keep_less_in_a_model():
    """A tiny bf16 model: FP8 caching keeps less than BF16; with selective recompute (now the FFN norm too)
    less again; the SwiGLU E4M3 cache changes the gradients by about one E4M3 rounding, not more."""
    base_cfg = tiny_config()
    torch.manual_seed(0)
    ref = DeepseekV3(base_cfg).to(torch.bfloat16).train()
    ref.restore_router_precision()
    tokens = torch.randint(0, base_cfg.vocab_size, (2, 16 + 1 + base_cfg.num_nextn_predict_layers))

    def variant(selective: bool, fp8: bool, swiglu_fp8: bool = True) -> DeepseekV3:
        m = DeepseekV3(tiny_config(selective_recompute=selective)).to(torch.bfloat16).train()
        m.load_state_dict(ref.state_dict())
        m.restore_router_precision()
        if fp8:
            apply_fp8(m, EmulatedFP8Backend("blockwise", fp8_swiglu_inputs=swiglu_fp8))
        return m

    bf16 = _decoder_bytes(variant(False, False), tokens)
    fp8 = _decoder_bytes(variant(False, True), tokens)
    fp8_sel = _decoder_bytes(variant(True, True), tokens)
    assert fp8 < bf16 and fp8_sel < fp8, (bf16, fp8, fp8_sel)

    grads = {}
    for swiglu_fp8 in (True, False):
        m = variant(True, True, swiglu_fp8)
        m(tokens).loss.backward()
        grads[swiglu_fp8] = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
    rel = float((grads[True] - grads[False]).norm() / grads[False].norm())
    # E4M3 keeps 3 mantissa bits: one rounding is <= 2^-4 relative per value, far less on a whole gradient
    assert 0 < rel < 2**-4, rel


def test_selective_recompute_reruns_the_ffn_norm_bit_for_bit():
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = DeepseekV3(cfg).train()
    sel = DeepseekV3(tiny_config(selective_recompute=True)).train()
    sel.load_state_dict(plain.state_dict())
    block_p, block_s = plain.layers[1].block, sel.layers[1].block
    h = torch.randn(2, 16, cfg.hidden_size)
    hp, hs = h.clone().requires_grad_(), h.clone().requires_grad_()
    out_p, kept_p = kept_for_backward(lambda: block_p.ffn_norm(hp) * 1.0, block_p.parameters())
    out_s, kept_s = kept_for_backward(lambda: block_s.ffn_norm(hs) * 1.0, block_s.parameters())
    grad = torch.randn_like(out_p)
    out_p.backward(grad)
    out_s.backward(grad)
    assert torch.equal(out_p, out_s) and torch.equal(hp.grad, hs.grad)
    assert torch.equal(block_p.post_attention_layernorm.weight.grad, block_s.post_attention_layernorm.weight.grad)
    assert kept_s < kept_p

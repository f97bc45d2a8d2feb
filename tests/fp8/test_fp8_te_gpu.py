"""Transformer Engine FP8 on a Hopper GPU: our layers through te.Linear / te.GroupedLinear agree with the
emulation and with bf16, gradients land on our parameters, and a model step trains. Skipped without an SM90
GPU and a working Transformer Engine; `python -m bench fp8_te` is the timed check on one H100/H200."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _hopper_with_te() -> str | None:
    """None when the tests can run, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() < (9, 0):
        return f"{torch.cuda.get_device_name()} is older than Hopper"
    from model.fp8.te import TEUnavailable, check_te

    try:
        check_te("blockwise")
    except TEUnavailable as e:
        return str(e)
    return None


REASON = _hopper_with_te()
needs_hopper = pytest.mark.skipif(REASON is not None, reason=f"TE FP8 needs Hopper + TE: {REASON}")

# TE's block scaling uses power-of-two scales by default and bf16 GEMM outputs; the emulation uses exact
# amax/448 scales and fp32. Both sit about one E4M3 rounding (~3%) from bf16; from each other, within 5%.
REL = 0.05


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_hopper
@pytest.mark.parametrize("recipe", ["blockwise", "current", "delayed"])
def test_te_linear_matches_emulation_and_keeps_our_parameter(recipe):
    from model.fp8.emulated import EmulatedFP8Backend
    from model.fp8.te import TEBackend
    from model.gemm import Linear

    torch.manual_seed(0)
    layer = Linear(1024, 512).cuda().bfloat16()
    layer.backend = TEBackend(recipe).for_layer("probe", layer)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape
    ref = x.detach().float() @ layer.weight.detach().float().t()
    emu = EmulatedFP8Backend(recipe).fprop(x.detach(), layer.weight.detach())
    assert rel(y, ref) < REL and rel(y, emu) < REL
    assert rel(x.grad, (2 * ref) @ layer.weight.detach().float()) < 2 * REL


@needs_hopper
def test_te_grouped_linear_pads_ragged_splits():
    from model.fp8.te import TEBackend
    from model.gemm import GroupedLinear

    torch.manual_seed(0)
    layer = GroupedLinear(4, 512, 256).cuda().bfloat16()
    layer.backend = TEBackend("blockwise").for_layer("experts", layer)
    rows = [300, 0, 5, 211]
    offsets = torch.tensor(rows, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(rows), 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x, offsets)
    y.float().sum().backward()
    assert layer.weight.grad is not None and not layer.weight.grad[1].any()  # the empty expert
    start = 0
    for e, n in enumerate(rows):
        if n:
            want = x[start:start + n].detach().float() @ layer.weight[e].detach().float().t()
            assert rel(y[start:start + n], want) < REL, e
        start += n


@needs_hopper
def test_te_model_step_close_to_bf16_and_under_checkpointing():
    from model.config import ModelConfig
    from model.fp8.factory import apply_fp8
    from model.fp8.te import TEBackend
    from model.transformer import DeepseekV3

    cfg = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=2, first_k_dense_replace=1,
               intermediate_size=1024, num_attention_heads=4, q_lora_rank=256, kv_lora_rank=384,
               qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=128, n_routed_experts=8, n_shared_experts=1,
               moe_intermediate_size=256, num_experts_per_tok=2, n_group=2, topk_group=1,
               max_position_embeddings=512, name="te-probe")
    tokens = torch.randint(0, 1024, (2, 258), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for name, fp8, ckpt in (("bf16", False, False), ("fp8", True, False), ("fp8-ckpt", True, True)):
        torch.manual_seed(0)
        model = DeepseekV3(ModelConfig(**cfg, activation_checkpointing=ckpt)).cuda().bfloat16().train()
        model.restore_router_precision()
        if fp8:
            apply_fp8(model, TEBackend("blockwise"))
        out = model(tokens)
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "mlp.experts" in n)
        losses[name] = float(out.loss.detach())
    assert abs(losses["fp8"] - losses["bf16"]) < 0.01 * losses["bf16"]
    assert abs(losses["fp8-ckpt"] - losses["fp8"]) < 1e-3 * losses["fp8"]

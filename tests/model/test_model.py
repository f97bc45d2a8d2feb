import torch

from model.activation_memory import kept_for_backward
from model.moe import MoE
from model.transformer import DeepseekV3, MicroBatch
from tests.conftest import tiny_config


def batch(cfg, b=2, s=16):
    return torch.randint(0, cfg.vocab_size, (b, s + 1 + cfg.num_nextn_predict_layers))


def test_every_parameter_but_the_bias_gets_a_gradient():
    cfg = tiny_config()
    model = DeepseekV3(cfg).train()
    out = model(batch(cfg))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = {n for n, _ in model.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)
    assert out.lm_loss is not None and len(out.mtp_losses) == 1 and out.balance_loss is not None
    expected = out.lm_loss + cfg.mtp_loss_weight * out.mtp_losses[0] + out.balance_loss
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)


def test_pieces_stage_by_stage_equal_the_monolith():
    """Run the pieces as a pipeline would: detach at every boundary, then backward piece by piece from the
    last, each piece adding the balance losses of its own blocks. Loss: bitwise; gradients: each parameter
    sums the same terms in a possibly different order, so 1e-6 relative."""
    cfg = tiny_config(num_nextn_predict_layers=2, seq_aux_alpha=0.01)
    model = DeepseekV3(cfg).train()
    tokens = batch(cfg)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -5:] = 0
    out = model(tokens, loss_mask=mask)
    params = list(model.parameters())
    ref = torch.autograd.grad(out.loss, params)

    mb = MicroBatch(tokens=tokens, seq_len=16, loss_mask=mask)
    stages, x = [], None
    for piece in model.pieces():
        inp = None if x is None else x.detach().requires_grad_(True)
        before = set(mb.balance_losses)
        x = piece(inp, mb)
        own_balance = [mb.balance_losses[i] for i in sorted(set(mb.balance_losses) - before)]
        stages.append((inp, x, own_balance))
    total = x + mb.balance_loss
    assert torch.equal(total, out.loss)
    assert len(mb.counts) == cfg.num_moe_layers + 2  # MTP blocks route too

    grad_out = None
    for inp, y, own_balance in reversed(stages):
        outputs = [y, *own_balance]
        grads = [torch.ones_like(y) if grad_out is None else grad_out, *[torch.ones_like(b) for b in own_balance]]
        torch.autograd.backward(outputs, grads, inputs=params + ([inp] if inp is not None else []))
        grad_out = None if inp is None else inp.grad
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)


def assert_same_step(plain, a, other, b) -> None:
    """Backward of both outputs; the losses, every gradient and the router counts are equal bit for bit."""
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.loss, b.loss)
    for (n, p), q in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)
    for r1, r2 in zip(plain.routers(), other.routers()):
        assert torch.equal(r1.step_counts, r2.step_counts)


def test_activation_checkpointing_same_result_and_counts_not_doubled():
    cfg = tiny_config()
    torch.manual_seed(3)
    plain = DeepseekV3(cfg).train()
    ckpt = DeepseekV3(tiny_config(activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    tokens = batch(cfg)
    assert_same_step(plain, plain(tokens), ckpt, ckpt(tokens))
    for router in ckpt.routers():
        # one forward of 2 x 16 tokens, top-2: 64 routed choices, counted once despite the recompute
        assert int(router.step_counts.sum()) == 2 * 16 * cfg.num_experts_per_tok


def test_selective_recompute_same_result_less_kept():
    """The report's selective recompute (the attention core's results kept, the norm, projections and RoPE before
    it rerun in backward): the same loss and gradients bit for bit (the same kernels on the same inputs), the
    router counted once, and less kept for the backward: per block and token at least the normed input, both
    latents and their norms, and q, k, v (hidden + 2 q_lora + 2 kv_lora + rope + 3 heads x qk_head_dim floats;
    v is padded to qk_head_dim for SDPA's flash kernel) are gone. Parameters are not counted."""
    cfg = tiny_config()
    torch.manual_seed(3)
    plain = DeepseekV3(cfg).train()
    sel = DeepseekV3(tiny_config(selective_recompute=True)).train()
    sel.load_state_dict(plain.state_dict())
    tokens = batch(cfg)
    a, kept_plain = kept_for_backward(lambda: plain(tokens), plain.parameters())
    parts: dict[str, int] = {}
    b, kept_sel = kept_for_backward(lambda: sel(tokens), sel.parameters(), parts)
    assert_same_step(plain, a, sel, b)
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_token = (cfg.hidden_size + 2 * cfg.q_lora_rank + 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim
                 + 3 * cfg.num_attention_heads * cfg.qk_head_dim)
    assert kept_plain - kept_sel >= blocks * tokens.shape[0] * 16 * per_token * 4, (kept_plain, kept_sel)
    # the policy kept the attention core's results of every block once (padded output + fp32 softmax
    # statistics per head and token), so the core does not run again in the recompute
    rows = blocks * tokens.shape[0] * 16 * cfg.num_attention_heads
    assert parts["checkpoint_caches"] == rows * (cfg.qk_head_dim * 4 + 4), parts


def test_selective_recompute_and_whole_block_checkpointing_are_exclusive():
    import pytest

    from model.config import ConfigError

    with pytest.raises(ConfigError, match="model.selective_recompute: activation_checkpointing"):
        tiny_config(selective_recompute=True, activation_checkpointing=True)


def test_counts_accumulate_over_microbatches_and_reset_on_update():
    cfg = tiny_config()
    model = DeepseekV3(cfg).train()
    for _ in range(3):
        model(batch(cfg))
    for r in model.routers():
        assert int(r.step_counts.sum()) == 3 * 2 * 16 * cfg.num_experts_per_tok
    model.update_router_biases()
    for r in model.routers():
        assert int(r.step_counts.sum()) == 0
        assert r.e_score_correction_bias.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(batch(cfg))
    assert all(int(r.step_counts.sum()) == 0 for r in model.routers())


def test_moe_matches_a_per_token_reference():
    """Sorted grouped experts equal a direct per-token loop over the chosen experts."""
    cfg = tiny_config(n_group=1, topk_group=1)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.experts.gate_up_proj.weight, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj.weight, std=0.1)
    x = torch.randn(2, 7, 64)
    y, routing = moe(x)
    flat = x.view(-1, 64)
    ref = moe.shared_experts(x).view(-1, 64).clone()
    wgu, wd = moe.experts.gate_up_proj.weight, moe.experts.down_proj.weight
    for t in range(flat.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            e = routing.experts[t, k]
            g, u = (wgu[e] @ flat[t]).chunk(2)
            ref[t] += routing.gates[t, k] * (wd[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(y.view(-1, 64), ref, rtol=1e-5, atol=1e-6)


def test_experts_with_zero_tokens_work():
    cfg = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=1)
    moe = MoE(cfg).train()
    moe.gate.e_score_correction_bias[3] = 100.0  # every token picks expert 3; the other 7 get none
    x = torch.randn(1, 9, 64, requires_grad=True)
    y, routing = moe(x)
    assert int(routing.counts[3]) == 9 and int(routing.counts.sum()) == 9
    y.sum().backward()
    w = moe.experts.gate_up_proj.weight.grad
    assert w[3].abs().sum() > 0 and w[torch.arange(8) != 3].abs().sum() == 0

"""`model.chunked_head_loss`: the heads' cross-entropy over token chunks without their logits (model/head_loss.py)
equals the unfused path (the same per-token losses up to log-sum-exp rounding; gradients to fp32 rounding),
with a loss mask and MTP, in fp32 and bf16, and keeps no [tokens, vocab] tensor for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import head_loss
from model.activation_memory import kept_for_backward
from model.transformer import DeepseekV3
from tests.conftest import tiny_config


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 tokens: several chunks and a ragged last one even at test sizes."""
    monkeypatch.setattr(head_loss, "chunk_tokens", lambda vocab: 5)


def test_token_losses_and_gradients_equal_the_unfused_ones(small_chunks):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 32, generator=g, dtype=torch.float64)
    w = torch.randn(50, 32, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.rand(3, 7, generator=g, dtype=torch.float64)
    ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = head_loss.head_token_losses(ha, wa, targets)
    want = F.cross_entropy(F.linear(hb, wb).flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
    # float64 in, fp32 per-token losses out (as the unfused path's .float()): compare at fp32's precision
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(ha.grad, hb.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_trains_the_same_with_chunked_head_loss(small_chunks, dtype):
    torch.manual_seed(0)
    plain = DeepseekV3(tiny_config()).to(dtype).train()
    chunked = DeepseekV3(tiny_config(chunked_head_loss=True)).to(dtype).train()
    chunked.load_state_dict(plain.state_dict())
    for m in (plain, chunked):
        m.restore_router_precision()
    cfg = plain.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 16 + 1 + cfg.num_nextn_predict_layers),
                           generator=torch.Generator().manual_seed(1))
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[0, 5:9] = False
    a, kept_plain = kept_for_backward(lambda: plain(tokens, mask), plain.parameters())
    b, kept_chunked = kept_for_backward(lambda: chunked(tokens, mask), chunked.parameters())
    assert b.logits is None and len(b.mtp_losses) == len(a.mtp_losses) == cfg.num_nextn_predict_layers
    # bf16: both sides round the same bf16 logits; only the log-sum-exp is computed differently
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, **tol)
    torch.testing.assert_close(torch.stack(b.mtp_losses), torch.stack(a.mtp_losses), **tol)
    a.loss.backward()
    b.loss.backward()
    grads_a = dict(plain.named_parameters())
    for name, p in chunked.named_parameters():
        q = grads_a[name]
        if q.grad is None:
            assert p.grad is None, name
            continue
        scale = float(q.grad.float().abs().max()) + 1e-12
        err = float((p.grad.float() - q.grad.float()).abs().max()) / scale
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), (name, err)
    # the unfused path keeps each head's fp32 log-probabilities [tokens, vocab] (cross-entropy's saved output);
    # the chunked one a log-sum-exp (4 bytes) and the targets (8 bytes) per token
    heads, n = 1 + cfg.num_nextn_predict_layers, tokens.shape[0] * 16
    assert kept_plain - kept_chunked >= heads * n * (cfg.vocab_size * 4 - 12), (kept_plain, kept_chunked)


def test_logits_when_asked_for_come_from_the_unfused_path():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_config(chunked_head_loss=True)).train()
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (1, 12 + 1 + cfg.num_nextn_predict_layers))
    out = model(tokens, return_logits=True)
    assert out.logits is not None and out.logits.shape[-1] == cfg.vocab_size
    assert model.logits(tokens[:, :12]).shape == (1, 12, cfg.vocab_size)

"""Packed documents (model/documents.py): with document masking a packed sample computes what each of its
documents computes alone - main logits, the LM loss and the MTP loss - with RoPE positions restarting per
document or running on. Without the mask the documents see each other (the check can fail)."""

from __future__ import annotations

import pytest
import torch

from model.transformer import DeepseekV3, masked_cross_entropy
from tests.conftest import tiny_config

LENGTHS = (6, 9, 7)  # three documents packed into one sample of S + 1 + D = 22 tokens (D = 1)


def _model() -> DeepseekV3:
    torch.manual_seed(0)
    return DeepseekV3(tiny_config()).eval()


def _packed(lengths=LENGTHS) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (n,), generator=gen) for n in lengths]
    segments = torch.cat([torch.full((n,), j) for j, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, torch.cat(docs)[None], segments, positions


def _tolerance(reference: torch.Tensor, depth: int) -> float:
    # fp32: the packed and the lone run add the same non-zero terms in another order (masked keys contribute
    # exp(-inf) = 0 exactly); each of the `depth` blocks adds a few ulp of its operands' scale to the logits
    return 64 * depth * torch.finfo(torch.float32).eps * float(reference.abs().max())


@pytest.mark.parametrize("restart_positions", [True, False])
def test_packed_logits_equal_each_document_alone(restart_positions: bool):
    model = _model()
    docs, tokens, segments, positions = _packed()
    s = tokens.shape[1] - 2
    with torch.no_grad():
        out = model(tokens, segments=segments, positions=positions if restart_positions else None,
                    return_logits=True)
        plain = model(tokens, return_logits=True).logits
        start = 0
        for j, doc in enumerate(docs):
            n = min(len(doc), s - start)  # inputs are the first S tokens of the sample
            alone = model.logits(doc[None, :n])
            packed = out.logits[:, start : start + n]
            tol = _tolerance(alone, model.cfg.num_hidden_layers)
            assert (packed - alone).abs().max() <= tol, (j, float((packed - alone).abs().max()), tol)
            if j > 0:  # the unmasked run lets doc j see its predecessors: far beyond rounding
                assert (plain[:, start : start + n] - alone).abs().max() > 1000 * tol
            start += len(doc)


def test_losses_stay_inside_documents():
    model = _model()
    docs, tokens, segments, positions = _packed()
    s = tokens.shape[1] - 2
    with torch.no_grad():
        out = model(tokens, segments=segments, positions=positions, return_logits=True)
        # cross-entropy moves by at most twice its logits' max-norm error; MTP's logits pass one block more
        abs_tol = 2 * _tolerance(out.logits, model.cfg.num_hidden_layers + 1)
        # main head: every input whose next token is in its document (the EOS-like last token predicts nothing)
        sums, count, start = 0.0, 0, 0
        for doc in docs:
            n = min(len(doc) - 1, s - start)
            logits = model.logits(doc[None, :n])
            sums += float(masked_cross_entropy(logits, doc[None, 1 : n + 1], None)) * n
            count += n
            start += len(doc)
        assert out.lm_loss.item() == pytest.approx(sums / count, abs=abs_tol)
        # MTP depth 1: targets t + 2 inside the document; alone, a document of n tokens has n - 2 of them
        mtp = [(model(doc[None]).mtp_losses[0].item(), len(doc) - 2) for doc in docs]
        expected = sum(loss * n for loss, n in mtp) / sum(n for _, n in mtp)
        assert out.mtp_losses[0].item() == pytest.approx(expected, abs=abs_tol)
        # without the mask the losses differ (the check can fail)
        assert abs(model(tokens).mtp_losses[0].item() - expected) > 100 * abs_tol


def test_gradients_flow_with_activation_checkpointing():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_config(activation_checkpointing=True)).train()
    _, tokens, segments, positions = _packed()
    model(tokens, segments=segments, positions=positions).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

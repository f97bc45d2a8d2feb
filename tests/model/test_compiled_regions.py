"""`model.compile_regions` (model/compiled.py): RMSNorm, RoPE and the heads' cross-entropy through torch.compile
give the eager model's loss and gradients to rounding, with MTP, packed documents (per-token RoPE positions) and
selective recompute (the compiled regions first compiled and rerun inside checkpointed regions) and whole-block
activation checkpointing; graphs are really compiled in training, and evaluation runs eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.compiled import compile_problem, regional
from model.norm import rms_norm
from model.transformer import DeepseekV3
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # inductor writes and builds C++ on the first call: ~20 s here


@pytest.fixture(autouse=True)
def _compiler_and_triton(monkeypatch):
    """Skip without a compiler, asked at run time, not at collection: inductor imports Triton, and Triton fixes at
    import whether its own library functions are interpreted. Imported during collection without TRITON_INTERPRET,
    it would break the interpreted kernels of tests/fp8/test_fp8_triton.py for the whole session; for the same
    reason, without a GPU, whatever inductor imports here imports in interpreter mode."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = compile_problem("cpu")
    if problem is not None:
        pytest.skip(problem)


def _loss_and_grads(model: DeepseekV3, tokens: torch.Tensor, segments: torch.Tensor,
                    positions: torch.Tensor) -> tuple[float, list]:
    model.zero_grad(set_to_none=True)
    loss = model(tokens, segments=segments, positions=positions).loss
    loss.backward()
    return float(loss.detach()), [p.grad for p in model.parameters()]


def test_compiled_regions_equal_the_eager_model():
    # imported here, not at collection: torch._dynamo imports Triton, and Triton imported before
    # tests/fp8/test_fp8_triton.py sets TRITON_INTERPRET would leave its interpreter half set up for the session
    from torch._dynamo.utils import counters

    tokens = torch.randint(0, 256, (2, 34), generator=torch.Generator().manual_seed(1))
    segments = torch.zeros(2, 34, dtype=torch.long)
    segments[1, 20:] = 1  # two packed documents in the second row, RoPE restarting at the second (per-token tables)
    positions = torch.stack([torch.arange(34), torch.cat([torch.arange(20), torch.arange(14)])])
    graphs = counters["stats"]["unique_graphs"]
    # compiled first inside selective recompute's checkpointed regions, then whole-block checkpointing, then plain
    for recompute in ({"selective_recompute": True}, {"activation_checkpointing": True}, {}):
        cfg = tiny_config(**recompute)
        torch.manual_seed(0)
        eager = DeepseekV3(cfg).train()
        fused = DeepseekV3(dataclasses.replace(cfg, compile_regions=True)).train()
        fused.load_state_dict(eager.state_dict())
        want_loss, want = _loss_and_grads(eager, tokens, segments, positions)
        got_loss, got = _loss_and_grads(fused, tokens, segments, positions)
        # fp32 throughout; inductor sums the norms' means and the log-sum-exp in another order, so results move by
        # a few ulps per reduction (reductions of <= 256 terms: <= 256 x 6e-8 = 1.5e-5 relative, the bound used),
        # carried through 4 blocks (3 + MTP) into the gradients
        assert abs(got_loss - want_loss) <= 1.5e-5 * abs(want_loss)
        for (name, _), g, w in zip(eager.named_parameters(), got, want, strict=True):
            assert (g is None) == (w is None), name
            if w is not None:
                assert float((g - w).abs().max()) <= 1e-4 * float(w.abs().max()) + 1e-12, name
    assert counters["stats"]["unique_graphs"] > graphs  # Dynamo compiled the regions (not all skipped)
    # evaluation (no autograd) stays eager: no new graph for its shapes
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        fused.eval()(tokens[:1, :20])
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_rms_norm_in_bf16_is_within_one_rounding():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    want = rms_norm(x, w, 1e-6).float()
    got = regional(rms_norm, True, x.device)(x, w, 1e-6).float()
    # eager rounds x / rms to bf16 before the weight's product and rounds again after it; inductor may keep the
    # first in fp32: at most two bf16 roundings (2 x 2^-8 relative) apart
    assert float(((got - want).abs() / want.abs().clamp(min=1e-3)).max()) <= 2 * 2**-8

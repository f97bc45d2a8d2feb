"""The TE backend's wiring, on CPU, against a stand-in `transformer_engine` whose modules compute plain GEMMs:
our Parameters are the ones TE computes with, ragged expert splits are padded to the recipe's multiple and cut
back, gradients land on our parameters, and every GEMM runs inside FP8 autocast (the backend opens one when
none is active: activation-checkpoint recompute, the `none` schedule). The real kernels: test_fp8_te_gpu.py."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.fp8.factory import apply_fp8
from model.transformer import DeepseekV3
from tests.conftest import tiny_config


class FakeTE:
    """Just enough of transformer_engine.pytorch: Linear, GroupedLinear, autocast and its global state."""

    def __init__(self, multiple: int) -> None:
        self.multiple, self.active, self.entered, self.calls, self.splits = multiple, 0, 0, 0, []
        fake = self

        class Linear(nn.Module):
            def __init__(self, i, o, bias=True, params_dtype=None, device=None):
                super().__init__()
                assert bias is False
                self.weight = nn.Parameter(torch.empty(o, i, dtype=params_dtype, device=device))

            def forward(self, x):
                assert fake.active, "TE GEMM outside autocast"
                fake.calls += 1
                return F.linear(x, self.weight)

        class GroupedLinear(nn.Module):
            def __init__(self, n, i, o, bias=True, params_dtype=None, device=None):
                super().__init__()
                self.n = n
                for e in range(n):
                    self.register_parameter(f"weight{e}", nn.Parameter(torch.empty(o, i, dtype=params_dtype)))

            def forward(self, x, m_splits):
                assert fake.active, "TE GEMM outside autocast"
                assert all(m % fake.multiple == 0 for m in m_splits) and sum(m_splits) == x.shape[0]
                fake.calls += 1
                fake.splits.append(list(m_splits))
                parts = torch.split(x, m_splits)
                return torch.cat([F.linear(p, getattr(self, f"weight{e}")) for e, p in enumerate(parts)])

        @contextlib.contextmanager
        def autocast(enabled=True, recipe=None, amax_reduction_group=None):
            fake.active += 1
            fake.entered += 1
            try:
                yield
            finally:
                fake.active -= 1

        class State:
            @staticmethod
            def is_fp8_enabled():
                return fake.active > 0

        self.pytorch = types.SimpleNamespace(Linear=Linear, GroupedLinear=GroupedLinear, autocast=autocast)
        recipes = {name: type(name, (), {"__init__": lambda self, **kw: None})
                   for name in ("Float8BlockScaling", "Float8CurrentScaling", "DelayedScaling", "MXFP8BlockScaling")}
        self.recipe = types.SimpleNamespace(**recipes, Format=types.SimpleNamespace(E4M3="E4M3"))
        self.quantization = types.SimpleNamespace(FP8GlobalStateManager=State)

    def install(self, monkeypatch) -> None:
        root = types.ModuleType("transformer_engine")
        pt = types.ModuleType("transformer_engine.pytorch")
        pt.__dict__.update(vars(self.pytorch))
        common = types.ModuleType("transformer_engine.common")
        recipe = types.ModuleType("transformer_engine.common.recipe")
        recipe.__dict__.update(vars(self.recipe))
        quant = types.ModuleType("transformer_engine.pytorch.quantization")
        quant.__dict__.update(vars(self.quantization))
        root.pytorch, root.common, common.recipe, pt.quantization = pt, common, recipe, quant
        for name, mod in (("transformer_engine", root), ("transformer_engine.pytorch", pt),
                          ("transformer_engine.common", common), ("transformer_engine.common.recipe", recipe),
                          ("transformer_engine.pytorch.quantization", quant)):
            monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_te_backend_computes_with_our_parameters(monkeypatch, checkpointing):
    from model.fp8.te import TEBackend, autocast_context

    fake = FakeTE(multiple=16)
    fake.install(monkeypatch)
    cfg = tiny_config(activation_checkpointing=checkpointing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = DeepseekV3(cfg).train()
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    # SwiGLU inputs kept in bf16: the stand-in's plain GEMMs then compute exactly the reference model
    names = apply_fp8(model, TEBackend("current", fp8_swiglu_inputs=False))
    assert TEBackend("current").activation_storage is not None  # the default keeps them in E4M3
    lin = model.layers[0].block.self_attn.o_proj
    assert lin.backend.module.weight is lin.weight  # one Parameter, shared
    experts = model.layers[1].block.mlp.experts.gate_up_proj
    assert experts.backend.module._parameters["weight0"] is None  # TE's own copies dropped
    out_ref, out = ref(tokens), model(tokens)
    out_ref.loss.backward()
    out.loss.backward()
    assert abs(float((out.loss - out_ref.loss).detach())) < 1e-6
    assert fake.calls >= len(names) * (2 if checkpointing else 1)  # recompute reruns every GEMM
    assert fake.entered >= len(names)  # no outer context here: each layer opened its own
    assert fake.splits and all(m % 16 == 0 for s in fake.splits for m in s)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        # fp32 reassociation only (padded splits sum in another order): 1e-6 of the largest entry
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max()) + 1e-12), n
    assert experts.backend.module._parameters["weight0"] is None  # the views are not left behind

    # inside the pipeline engine's context the layers open none of their own
    fake.entered = 0
    with autocast_context("current")(0, 0):
        model(tokens)
    assert fake.entered == 1


def test_grouped_padding_to_the_recipe_multiple(monkeypatch):
    from model.fp8.te import TEBackend
    from model.gemm import GroupedLinear

    fake = FakeTE(multiple=128)
    fake.install(monkeypatch)
    layer = GroupedLinear(3, 128, 256)
    layer.backend = TEBackend("blockwise").for_layer("experts", layer)
    rows = [5, 0, 130]
    x = torch.randn(sum(rows), 128, requires_grad=True)
    y = layer(x, torch.tensor(rows).cumsum(0).to(torch.int32))
    assert fake.splits[-1] == [128, 0, 256]
    want = torch.cat([x[:5] @ layer.weight[0].t(), x[5:] @ layer.weight[2].t()])
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert not layer.weight.grad[1].any() and layer.weight.grad[0].any()
    torch.testing.assert_close(x.grad[5:], torch.ones(130, 256) @ layer.weight[2].detach())
    with pytest.raises(Exception, match="multiples of 128"):
        TEBackend("blockwise").for_layer("bad", GroupedLinear(2, 64, 128))

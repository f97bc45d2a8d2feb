"""The GEMM seam: custom numerics and deferred weight-gradients give the same results as plain autograd."""

import torch

from model.gemm import GemmBackend, GroupedLinear, Linear, defer_weight_grads, set_gemm_backend


class CountingBackend(GemmBackend):
    """Plain numerics through the backend's own GEMMs (not the F.linear fast path); counts the calls."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = {"fprop": 0, "dgrad": 0, "wgrad": 0}

    def fprop(self, x, w):
        self.calls["fprop"] += 1
        return super().fprop(x, w)

    def dgrad(self, g, w):
        self.calls["dgrad"] += 1
        return super().dgrad(g, w)

    def wgrad(self, g, x):
        self.calls["wgrad"] += 1
        return super().wgrad(g, x)


class ListStore:
    def __init__(self):
        self.fns = []

    def defer_or_run(self, fn):
        self.fns.append(fn)


def test_backend_gemms_equal_plain_autograd_and_deferral_delays_only_the_weight_grad():
    torch.manual_seed(0)
    plain, custom = Linear(16, 8), Linear(16, 8)
    custom.load_state_dict(plain.state_dict())
    backend = CountingBackend()
    set_gemm_backend(custom, backend)
    assert not backend.is_plain and GemmBackend().is_plain
    x = torch.randn(3, 5, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (plain(xa) ** 2).sum().backward()
    (custom(xb) ** 2).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(custom.weight.grad, plain.weight.grad)
    assert backend.calls == {"fprop": 1, "dgrad": 1, "wgrad": 1}

    store = ListStore()
    defer_weight_grads(custom, store)
    assert custom.backend.calls is backend.calls and custom.backend.wgrad_store is store  # numerics kept
    custom.weight.grad = None
    xc = x.clone().requires_grad_()
    (custom(xc) ** 2).sum().backward()
    torch.testing.assert_close(xc.grad, xa.grad)  # the input-gradient is there at once ...
    assert custom.weight.grad is None and len(store.fns) == 1  # ... the weight-gradient waits
    store.fns.pop()()
    torch.testing.assert_close(custom.weight.grad, plain.weight.grad)


def test_grouped_linear_gradients_in_fp64_and_with_empty_groups():
    torch.manual_seed(0)
    layer = GroupedLinear(3, 4, 6).double()
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)  # group 1 is empty
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: layer.backend.grouped_linear(x, w, offsets),
                                    (x, layer.weight.detach().clone().requires_grad_()))
    y = layer(x, offsets)
    y.sum().backward()
    assert layer.weight.grad[1].abs().sum() == 0 and layer.weight.grad[0].abs().sum() > 0

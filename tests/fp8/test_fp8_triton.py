"""The Triton quantization kernels (model/fp8/triton_quant.py) and the torch backend's fused path.

Without a CUDA GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
defined); with one they compile. Either way the E4M3 bits and scales equal the eager quantizers' (the emulated
reference of the same scaling convention) bit for bit, and the fused backend computes exactly what the eager
one does (blockwise GEMMs through the reference kernel of test_fp8_native on CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from model.fp8 import scaled_mm as nat
from model.fp8.factory import apply_fp8
from model.fp8.scaled_mm import NativeFP8Unavailable, ScaledMMFP8Backend, make_operand, make_operand_t
from model.gemm import GroupedLinear, Linear
from tests.fp8.test_fp8_native import CPU_REASON, reference_blockwise_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"


def _import_kernels():
    """model.fp8.triton_quant with its kernels interpreted on CPU: TRITON_INTERPRET must be set when the kernels
    are defined; it is set for this module's tests only (the fixture below), not for the whole session."""
    before = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from model.fp8 import triton_quant
    finally:
        if INTERPRET and before is None:
            del os.environ["TRITON_INTERPRET"]
        elif INTERPRET:
            os.environ["TRITON_INTERPRET"] = before
    return triton_quant


triton_quant = _import_kernels()
# the backend tests run the blockwise path through the reference kernel on CPU, which needs CPU _scaled_mm
needs_scaled_mm = pytest.mark.skipif(DEVICE == "cpu" and CPU_REASON is not None,
                                     reason=f"torch._scaled_mm on CPU: {CPU_REASON}")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
E4M3 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same_operand(got_values, got_scale, want) -> None:
    assert torch.equal(_bits(got_values), _bits(want.values)), "E4M3 values differ"
    assert torch.equal(got_scale, want.scale), "scales differ"


def _awkward(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Magnitudes over many binades (E4M3 subnormals after scaling), zero tiles, an outlier per block row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g) * 3)
    if cols > 200:
        x[:, 128:256] = 0  # an all-zero tile column: scale 1
    x[0, 0] = 0.0
    x[-1, -1] = -3e4
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("shape", [(256, 256), (200, 300), (1, 5), (130, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_kernel_writes_both_operands_bit_for_bit(shape, dtype):
    x = _awkward(*shape, dtype)
    v, s, v_t, s_t = triton_quant.activation_operands(x, 128)
    _same_operand(v, s, make_operand(x, "1x128", 128))
    want_t = make_operand_t(x, "1x128", 128)  # 128 x 1 token tiles, transposed: [K', T'] and scales [K', T'/128]
    _same_operand(v_t, s_t.t(), want_t)


def test_e4m3_rounding_ties_and_subnormals():
    """A tile whose amax is 448 has scale 1, so its values reach the rounding as they are: every E4M3 value,
    every midpoint between neighbours (ties go to the even mantissa), and points just off each midpoint,
    normals and subnormals, both signs. Equal to torch's float8_e4m3fn conversion."""
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    eps = torch.finfo(torch.float32).eps
    values = torch.cat([grid, mids, mids * (1 + 4 * eps), mids * (1 - 4 * eps), grid * (1 + 4 * eps)])
    values = torch.cat([values, -values])
    values = values[values.abs() <= 448]
    pad = -values.numel() % 127
    body = torch.cat([values, torch.zeros(pad)]).view(-1, 127)
    x = torch.cat([torch.full((body.shape[0], 1), 448.0), body], dim=1).to(DEVICE)  # column 0: amax 448
    v, s, _, _ = triton_quant.activation_operands(x, 128)
    assert torch.equal(s[: x.shape[0], 0], torch.ones(x.shape[0], device=DEVICE))
    assert torch.equal(_bits(v[: x.shape[0], : x.shape[1]]), _bits(x.to(E4M3)))


def test_nan_and_inf_quantize_as_the_eager_path():
    """A NaN in a tile gives it scale 1 and keeps the NaN (the rest saturate at 448 as torch's cast does); an
    infinity gives scale inf, so its neighbours become 0 and itself NaN: the eager quantizers' results, bit for
    bit, so a diverging run shows NaN in its FP8 GEMMs as it would eagerly."""
    x = _awkward(260, 300, torch.float32)
    x[5, 7] = float("nan")
    x[140, 3] = float("inf")
    x[200, 260] = -float("inf")
    x[7, 140] = 1e6  # a large finite value next to nothing special
    v, s, v_t, s_t = triton_quant.activation_operands(x, 128)
    _same_operand(v, s, make_operand(x, "1x128", 128))
    _same_operand(v_t, s_t.t(), make_operand_t(x, "1x128", 128))
    w = x[:200, :256].clone()
    vw, sw = triton_quant.weight_operand(w, 128)
    _same_operand(vw, sw, make_operand(w, "128x128", 128))


@pytest.mark.parametrize("shape", [(165, 300), (256, 128), (3, 40, 260)])
def test_weight_kernel_writes_128x128_blocks_bit_for_bit(shape):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(*shape, generator=g) * 0.02).to(DEVICE, torch.bfloat16)
    v, s = triton_quant.weight_operand(w, 128)
    _same_operand(v, s, make_operand(w, "128x128", 128))


# ---- the torch backend's fused path ----------------------------------------------------------------------
@pytest.fixture
def blockwise_reference(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(nat, "blockwise_support", lambda device: ("reference", "reference kernel"))
        monkeypatch.setattr(nat, "_blockwise_call", reference_blockwise_kernel)


def _layers(fused: bool) -> tuple[Linear, GroupedLinear]:
    torch.manual_seed(0)
    dense, experts = Linear(300, 165), GroupedLinear(4, 96, 144)
    apply_fp8(torch.nn.ModuleDict({"d": dense, "e": experts}), ScaledMMFP8Backend("blockwise", fused=fused))
    return dense.to(DEVICE), experts.to(DEVICE)


def _step(dense: Linear, experts: GroupedLinear) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 300, generator=g).to(DEVICE).requires_grad_()
    rows = torch.tensor([37, 0, 130, 5])
    offsets = rows.cumsum(0).to(torch.int32).to(DEVICE)
    xe = torch.randn(int(rows.sum()), 96, generator=g).to(DEVICE).requires_grad_()
    y, ye = dense(x), experts(xe, offsets)
    torch.autograd.backward([y, ye], [torch.randn(y.shape, generator=g).to(DEVICE),
                                      torch.randn(ye.shape, generator=g).to(DEVICE)])
    return [y, ye, x.grad, xe.grad, dense.weight.grad, experts.weight.grad]


@needs_scaled_mm
def test_fused_backend_computes_what_the_eager_one_does(blockwise_reference, monkeypatch):
    """Forward, input- and weight-gradients of a linear layer and of ragged experts (one empty): the same bits
    with the Triton quantizer as with the eager one. Each activation and output-gradient is quantized once:
    its wgrad operand comes from the forward's or dgrad's pass."""
    calls = []
    real = triton_quant.activation_operands
    monkeypatch.setattr(triton_quant, "activation_operands", lambda t, align: calls.append(t.shape) or real(t, align))
    fused, eager = _step(*_layers(True)), _step(*_layers(False))
    for a, b in zip(fused, eager, strict=True):
        assert torch.equal(a, b)
    # x and dY of the linear layer, x and dY of each of the 3 non-empty experts: one pass each
    assert len(calls) == 2 + 2 * 3, calls


class DataWritingSGD(torch.optim.Optimizer):
    """Updates through `param.data`, as DeepSpeed's ZeRO copies its fp32 partitions back: no version bump."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@needs_scaled_mm
def test_weights_are_quantized_once_per_optimizer_step(blockwise_reference, monkeypatch):
    """The step's microbatches (and their dgrads) share the weight blocks; after an optimizer step, even one
    that writes through `param.data` and so bumps no version, the next forward quantizes afresh; so does
    `new_weights()` after such a write outside an optimizer."""
    dense, experts = _layers(True)
    calls = []
    real = triton_quant.weight_operand
    monkeypatch.setattr(triton_quant, "weight_operand", lambda w, align: calls.append(w.shape) or real(w, align))
    _step(dense, experts)
    _step(dense, experts)  # a second microbatch of the same step
    assert len(calls) == 2, calls
    versions = (dense.weight._version, experts.weight._version)
    DataWritingSGD([*dense.parameters(), *experts.parameters()], lr=0.1).step()
    assert (dense.weight._version, experts.weight._version) == versions  # only the hook can tell
    _step(dense, experts)
    assert len(calls) == 4, calls
    with torch.no_grad():
        dense.weight.data.mul_(0.5)
        experts.weight.data.mul_(0.5)
    nat.new_weights()
    got = _step(dense, experts)
    assert len(calls) == 6, calls
    eager_dense, eager_experts = _layers(False)
    eager_dense.load_state_dict(dense.state_dict())
    eager_experts.load_state_dict(experts.state_dict())
    want = _step(eager_dense, eager_experts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fused_quantizer_errors_are_one_line(monkeypatch):
    with pytest.raises(NativeFP8Unavailable, match="blockwise recipe, not current") as e:
        ScaledMMFP8Backend("current", fused=True)
    assert e.value.key == "precision.fp8.quantizer" and "\n" not in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA GPU" in triton_quant.problem("cpu")
    monkeypatch.setattr(triton_quant.importlib.util, "find_spec", lambda name: None)
    assert triton_quant.problem("cuda") == "Triton is not installed"

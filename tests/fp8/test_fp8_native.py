"""The torch FP8 backend (model/fp8/scaled_mm.py): real FP8 GEMMs through torch._scaled_mm.

On CPU (where torch._scaled_mm runs tensor-wise and row-wise scaled GEMMs): the GEMMs see exactly the
emulation's E4M3 values, so they agree with EmulatedFP8Backend to fp32 reassociation, and with fp32 to one
E4M3 rounding; grouped GEMMs are per expert; the blockwise operands and scale layouts are right (checked
through a reference kernel that reads them as cuBLAS documents); deferred weight-gradients and checkpoint
recompute keep the numerics; the weight cache cannot go stale; the errors are one line.
On an SM89+ GPU (marked gpu): the real kernels against the emulation and bf16, a model step.
Imports nothing beyond torch and the model package (the GPU check runs it without DeepSpeed or Hydra)."""

from __future__ import annotations

import pytest
import torch

from model.fp8 import scaled_mm as nat
from model.fp8.emulated import EmulatedFP8Backend
from model.fp8.factory import apply_fp8, make_fp8_backend
from model.fp8.numerics import quantize_dequantize
from model.fp8.scaled_mm import NativeFP8Unavailable, ScaledMMFP8Backend, check_native
from model.gemm import GroupedLinear, Linear
from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.fp8.fp8_steps import assert_same_step, fp8_step


def _cpu_scaled_mm() -> str | None:
    try:
        nat._device_ok("cpu")
    except NativeFP8Unavailable as e:
        return str(e)
    return None


CPU_REASON = _cpu_scaled_mm()
needs_cpu_op = pytest.mark.skipif(CPU_REASON is not None, reason=f"torch._scaled_mm on CPU: {CPU_REASON}")


def _cpu_rowwise() -> str | None:
    """Row-wise scales on CPU (the blockwise recipe's fallback there): torch 2.13's CPU kernel takes them,
    older ones (2.11) only tensor-wise scales."""
    if CPU_REASON is not None:
        return CPU_REASON
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError as e:
        return " ".join(str(e).split())[:120]
    return None


CPU_ROWWISE_REASON = _cpu_rowwise()
needs_cpu_rowwise = pytest.mark.skipif(CPU_ROWWISE_REASON is not None,
                                       reason=f"row-wise torch._scaled_mm on CPU: {CPU_ROWWISE_REASON}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def operands(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """x [T, in], w [out, in], g [T, out] with no dimension a multiple of 16 (padding is exercised)."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(200, 300, generator=g), torch.randn(165, 300, generator=g) * 0.02
    dy = torch.randn(200, 165, generator=g)
    return x.to(device, dtype), w.to(device, dtype), dy.to(device, dtype)


def gemms(b, x, w, g):
    return {"fprop": b.fprop(x, w), "dgrad": b.dgrad(g, w), "wgrad": b.wgrad(g, x)}


def exact(x, w, g):
    x, w, g = x.double(), w.double(), g.double()
    return {"fprop": x @ w.t(), "dgrad": g @ w, "wgrad": g.t() @ x}


_SCALED_MM = torch._scaled_mm


def strict_scaled_mm(a, b, scale_a, scale_b, **kw):
    """torch._scaled_mm with CUDA's argument rules checked (CPU's reference kernel accepts more): E4M3 operands,
    mat_a row-major, mat_b column-major, every dim a multiple of 16; fp32 scales, a single value each
    (tensor-wise) or [M, 1] and [1, N] with unit inner stride (row-wise)."""
    blockwise = scale_a.dim() == 2 and scale_a.shape[1] > 1  # the GPU probe's blockwise call: torch checks it
    if not blockwise:
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.is_contiguous() and b.t().is_contiguous(), (a.stride(), b.stride())
        assert a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
        assert scale_a.dtype == scale_b.dtype == torch.float32
    if not blockwise and (scale_a.numel() > 1 or scale_b.numel() > 1):
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
        assert scale_a.stride(1) == 1 and scale_b.stride(1) == 1 and scale_a.is_contiguous() and scale_b.is_contiguous()
    return _SCALED_MM(a, b, scale_a=scale_a, scale_b=scale_b, **kw)


@pytest.fixture(autouse=True)
def _cuda_rules_on_cpu(monkeypatch):
    monkeypatch.setattr(torch, "_scaled_mm", strict_scaled_mm)


# ---- CPU: numerics -----------------------------------------------------------------------------------------
@needs_cpu_op
def test_current_matches_the_emulation_and_fp32():
    """Per-tensor scaling: the same E4M3 values and scales as the emulation, so only the summation order
    differs (fp32 products of 4-bit mantissas are exact); one E4M3 rounding (~3%) from fp32."""
    x, w, g = operands()
    got = gemms(ScaledMMFP8Backend("current"), x, w, g)
    emu = gemms(EmulatedFP8Backend("current", scaled_mm=False), x, w, g)
    ref = exact(x, w, g)
    for name in got:
        assert got[name].shape == ref[name].shape and got[name].dtype == torch.float32
        assert rel(got[name], emu[name]) < 1e-6, name
        assert 0.01 < rel(got[name], ref[name]) < 0.06, name


@needs_cpu_op
@needs_cpu_rowwise
def test_blockwise_falls_back_to_rowwise_where_the_kernel_does_not_run():
    """On CPU torch has no blockwise-scaled GEMM: `blockwise` runs row-wise scaling (per row of the left operand
    and per column of the right, over the whole contraction), says so, and equals its own quantize-dequantize
    reference to fp32 reassociation. blockwise=True refuses instead, in one line."""
    x, w, g = operands()
    b = ScaledMMFP8Backend("blockwise")
    assert b.mode("cpu") == ("rowwise", None)
    assert "ROW-WISE" in b.describe("cpu") and "\n" not in b.describe("cpu")

    def rows(t):  # one scale per row, over the whole (contraction) row
        return quantize_dequantize(t, (1, t.shape[1]))

    want = {"fprop": rows(x) @ rows(w).t(), "dgrad": rows(g) @ rows(w.t()).t(), "wgrad": rows(g.t()) @ rows(x.t()).t()}
    got, ref = gemms(b, x, w, g), exact(x, w, g)
    for name in got:
        assert rel(got[name], want[name]) < 1e-6, name
        assert rel(got[name], ref[name]) < 0.06, name
    with pytest.raises(NativeFP8Unavailable, match="no blockwise-scaled FP8 GEMM") as e:
        ScaledMMFP8Backend("blockwise", blockwise=True).fprop(x, w)
    assert "\n" not in str(e.value)


def reference_blockwise_kernel(api, a, b, sa, sb, b_kind, out_dtype):
    """What cuBLAS's blockwise FP8 GEMM computes from the operands and scale layouts torch documents for it
    (test_scaled_matmul_cuda.py): a [M, K] row-major, b [K, N] column-major; sa [M, K/128] outer-dim-major;
    sb for 128x128 blocks [round_up(K/128, 4), N/128] K-major, for 1x128 tiles [N, K/128] outer-dim-major."""
    m, k = a.shape
    n, kb = b.shape[1], k // 128
    assert a.is_contiguous() and b.t().is_contiguous() and m % 128 == 0 and n % 128 == 0 and k % 128 == 0
    assert sa.shape == (m, kb) and sa.stride(0) == 1 and sa.dtype == torch.float32
    a_hp = (a.float().view(m, kb, 128) * sa[:, :, None]).view(m, k)
    bt = b.t().float()
    if b_kind == "128x128":
        assert sb.shape == (-(-kb // 4) * 4, n // 128) and sb.stride(0) == 1
        b_hp = (bt.view(n // 128, 128, kb, 128) * sb[:kb].t()[:, None, :, None]).view(n, k)
    else:
        assert sb.shape == (n, kb) and sb.stride(0) == 1
        b_hp = (bt.view(n, kb, 128) * sb[:, :, None]).view(n, k)
    return (a_hp @ b_hp.t()).to(out_dtype)


@pytest.fixture
def fake_blockwise_kernel(monkeypatch):
    """Make the blockwise path run on CPU through the reference kernel (the real one is tested on a GPU)."""
    monkeypatch.setattr(nat, "blockwise_support", lambda device: ("reference", "reference kernel"))
    monkeypatch.setattr(nat, "_blockwise_call", reference_blockwise_kernel)


@needs_cpu_op
def test_blockwise_operands_and_scale_layouts(fake_blockwise_kernel):
    """1x128 activations and output-gradients, 128x128 weight blocks (dgrad: the forward's, transposed), 1x128
    along tokens in wgrad, every dimension padded to 128: through a kernel that reads the layouts as cuBLAS
    does, the result is the emulated blockwise recipe's."""
    x, w, g = operands()
    b = ScaledMMFP8Backend("blockwise")
    assert b.mode("cpu") == ("blockwise", "reference")
    got = gemms(b, x, w, g)
    emu = gemms(EmulatedFP8Backend("blockwise", scaled_mm=False), x, w, g)
    for name in got:
        assert rel(got[name], emu[name]) < 1e-6, name


@needs_cpu_op
# per-tensor scaling has no blockwise kernel to fake
@pytest.mark.parametrize("recipe, fake_kernel", [("current", False), ("blockwise", False), ("blockwise", True)])
def test_grouped_gemms_are_per_expert(recipe, fake_kernel, request):
    """Ragged experts (one empty): the same as the emulation's grouped GEMMs (per-expert tensor scales, token
    tiles aligned to each expert's first row); the empty expert's weight-gradient is zero."""
    if recipe == "blockwise" and not fake_kernel and CPU_ROWWISE_REASON is not None:
        pytest.skip(f"row-wise torch._scaled_mm on CPU: {CPU_ROWWISE_REASON}")
    if fake_kernel:
        request.getfixturevalue("fake_blockwise_kernel")
    g0 = torch.Generator().manual_seed(1)
    rows = [37, 0, 130, 5]
    offsets = torch.tensor(rows).cumsum(0).to(torch.int32)
    x, g = torch.randn(sum(rows), 96, generator=g0), torch.randn(sum(rows), 144, generator=g0)
    w = torch.randn(len(rows), 144, 96, generator=g0) * 0.05
    b = ScaledMMFP8Backend(recipe)
    y, dx, dw = b.grouped_fprop(x, w, offsets), b.grouped_dgrad(g, w, offsets), b.grouped_wgrad(g, x, offsets, 4)
    if recipe == "current" or fake_kernel:
        em = EmulatedFP8Backend(recipe, scaled_mm=False)
        assert rel(y, em.grouped_fprop(x, w, offsets)) < 1e-6
        assert rel(dx, em.grouped_dgrad(g, w, offsets)) < 1e-6
        assert rel(dw, em.grouped_wgrad(g, x, offsets, 4)) < 1e-6
    start = 0
    for e, n in enumerate(rows):  # each expert alone through the 2-D GEMMs
        sl = slice(start, start + n)
        if n:
            torch.testing.assert_close(y[sl], b.fprop(x[sl], w[e]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dx[sl], b.dgrad(g[sl], w[e]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dw[e], b.wgrad(g[sl], x[sl]), rtol=1e-5, atol=1e-5)
        else:
            assert not dw[e].any()
        start += n


@needs_cpu_op
def test_fprop_requantizes_a_weight_changed_through_data():
    """fprop always quantizes the weight afresh (an optimizer writing through `param.data` bumps no version);
    dgrad reuses fprop's copy only for the very same, unchanged weight."""
    layer = Linear(64, 48)
    b = ScaledMMFP8Backend("current").for_layer("l", layer)
    x, g = torch.randn(32, 64), torch.randn(32, 48)
    b.fprop(x, layer.weight.detach())
    layer.weight.data.copy_(layer.weight.data * 3)  # no version bump
    fresh = ScaledMMFP8Backend("current")
    assert torch.equal(b.fprop(x, layer.weight), fresh.fprop(x, layer.weight))
    assert torch.equal(b.dgrad(g, layer.weight), fresh.dgrad(g, layer.weight))  # from the cache
    w2 = layer.weight.detach() * 2
    assert torch.equal(b.dgrad(g, w2), fresh.dgrad(g, w2))  # another tensor: no cache


@needs_cpu_op
@needs_cpu_rowwise
def test_layer_autograd_and_bf16():
    layer = Linear(64, 32)
    b = ScaledMMFP8Backend("blockwise")
    layer.backend = b
    x = torch.randn(4, 5, 64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    x2, g2 = x.detach().reshape(-1, 64), gy.reshape(-1, 32)
    assert torch.equal(y.reshape(-1, 32), b.fprop(x2, layer.weight.detach()))
    assert torch.equal(x.grad.reshape(-1, 64), b.dgrad(g2, layer.weight.detach()))
    assert torch.equal(layer.weight.grad, b.wgrad(g2, x2))
    xb, wb = torch.randn(8, 128, dtype=torch.bfloat16), torch.randn(16, 128, dtype=torch.bfloat16)
    assert ScaledMMFP8Backend("current").fprop(xb, wb).dtype == torch.bfloat16


@needs_cpu_op
@pytest.mark.parametrize("recipe", ["current", "blockwise"])
def test_model_deferred_weight_grads_and_recompute_keep_the_numerics(recipe):
    """apply_fp8 then defer_weight_grads (the pipeline's order), and activation checkpointing: the same loss
    and gradients as the plain FP8 run; and that run is close to the emulated recipe's."""
    if recipe == "blockwise" and CPU_ROWWISE_REASON is not None:
        pytest.skip(f"row-wise torch._scaled_mm on CPU: {CPU_ROWWISE_REASON}")
    cfg = tiny_config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(3))
    results = [fp8_step(lambda: ScaledMMFP8Backend(recipe), tokens, checkpointing, deferred)[:2]
               for checkpointing, deferred in ((False, False), (True, False), (False, True))]
    assert_same_step(results)
    (l0, g0), (l_emu, g_emu) = results[0], fp8_step(lambda: EmulatedFP8Backend(recipe), tokens, False, False)[:2]
    # current: the emulation's numbers (to reassociation); blockwise runs row-wise on CPU: close, not equal
    assert abs(float(l0 - l_emu)) < (1e-5 if recipe == "current" else 2e-3) * float(l_emu)
    flat = torch.cat([g.flatten() for g in g0.values()])
    flat_emu = torch.cat([g_emu[n].flatten() for n in g0])
    assert float(torch.nn.functional.cosine_similarity(flat, flat_emu, dim=0)) > 0.99


@pytest.mark.slow
def test_compiled_quantizer_equals_eager():
    """torch.compile of the quantizer (the GPU speed path) gives the eager quantizer's values and scales, and a
    new row count does not need another compile (dynamic shapes). About 20 s of compiling on CPU."""
    nat.COMPILE_ERROR = None
    for rows in (256, 384):
        x = torch.randn(rows, 384, dtype=torch.bfloat16)
        v, s = nat._quantize(x, 1, 128, True)
        if nat.COMPILE_ERROR is not None:
            pytest.skip(f"torch.compile unavailable: {nat.COMPILE_ERROR}")
        v2, s2 = nat.quantize_tiles(x, 1, 128)
        assert torch.equal(v.view(torch.uint8), v2.view(torch.uint8)) and torch.equal(s, s2)



_ISA_CHILD = r"""
import torch
from model.fp8 import scaled_mm as nat
from torch._inductor.cpu_vec_isa import pick_vec_isa
bad = []
for rows in (256, 384):
    x = torch.randn(rows, 384, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(rows))
    v, s = nat._quantize(x, 1, 128, True)
    v2, s2 = nat.quantize_tiles(x, 1, 128)
    if nat.COMPILE_ERROR is not None:
        bad.append(nat.COMPILE_ERROR.replace(" ", "_")[:80])
    elif not (torch.equal(v.view(torch.uint8), v2.view(torch.uint8)) and torch.equal(s, s2)):
        bad.append(f"rows={rows}:different_bytes_or_scales")
print(pick_vec_isa().bit_width(), " ".join(bad) or "ok")
"""


@pytest.mark.slow
def test_compiled_quantizer_ignores_an_inductor_cache_from_another_isa(tmp_path):
    """Inductor's FX graph cache is not keyed on the CPU vector ISA: a graph cached under AVX-512 was served under
    AVX2 (ATEN_CPU_CAPABILITY=avx2, or another machine sharing the cache dir) and gave wrong bytes, under
    ATEN_CPU_CAPABILITY=default a compile error. Populate one cache dir natively, then quantize under a narrower
    ISA: bit-equal to eager (scripts/repro_inductor_isa_cache.py is the torch-only repro). ~40 s on CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def child(capability):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path), PYTHONPATH=str(root))
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, cwd=root, capture_output=True, text=True,
                             timeout=400)
        assert out.returncode == 0, out.stderr[-2000:]
        width, result = out.stdout.strip().splitlines()[-1].split(" ", 1)
        return int(width), result

    width, result = child(None)
    if result.startswith("BackendCompilerFailed") or "Error" in result:
        pytest.skip(f"torch.compile unavailable: {result}")
    assert result == "ok"
    if width == 0:
        pytest.skip("no CPU vector ISA for inductor here: nothing to mix up")
    narrower = "avx2" if width == 512 and "avx2" in str(_valid_isas()) else "default"
    assert child(narrower) == ((256 if narrower == "avx2" else 0), "ok"), narrower


def _valid_isas():
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()]

# ---- errors and wiring ------------------------------------------------------------------------------------------
def test_errors_are_one_line():
    with pytest.raises(NativeFP8Unavailable) as e:
        check_native("blockwise", "cpu")
    assert "CUDA GPU" in e.value.problem and str(e.value).endswith("use precision.fp8.backend=emulated")
    assert e.value.key == "precision.fp8.backend" and "\n" not in str(e.value)
    for recipe in ("delayed", "mxfp8"):
        with pytest.raises(NativeFP8Unavailable) as e:
            check_native(recipe, "cuda")
        assert e.value.key == "precision.fp8.recipe" and "\n" not in str(e.value)
        with pytest.raises(NativeFP8Unavailable):
            ScaledMMFP8Backend(recipe)


def test_make_fp8_backend():
    from types import SimpleNamespace

    def cfg(backend, recipe="blockwise", enabled=True):
        return SimpleNamespace(enabled=enabled, backend=backend, recipe=recipe, amax_history=4)

    assert make_fp8_backend(cfg("torch", enabled=False)) is None
    assert isinstance(make_fp8_backend(cfg("emulated", "delayed")), EmulatedFP8Backend)
    b = make_fp8_backend(cfg("torch", "current"))
    assert isinstance(b, ScaledMMFP8Backend) and b.recipe == "current"
    with pytest.raises(ValueError, match="unknown backend"):
        make_fp8_backend(cfg("cuda"))


# ---- GPU: the real kernels ---------------------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        check_native("current", "cuda")
    except NativeFP8Unavailable as e:
        return str(e)
    return None


GPU_REASON = _gpu_reason()
needs_fp8_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"FP8 GPU: {GPU_REASON}")


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_blockwise_kernel_probe():
    """On Hopper with a CUDA >= 12.9 torch the DeepSeek blockwise kernel must be found; elsewhere the probe
    says why not in one line (and the backend runs row-wise)."""
    api, why = nat.blockwise_support(str(torch.device("cuda", torch.cuda.current_device())))
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    print(f"blockwise kernel: {api} ({why})")
    if torch.cuda.get_device_capability() == (9, 0) and cuda >= (12, 9):
        assert api is not None, why
    assert "\n" not in why


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["current", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gemms_match_the_emulation_and_fp32(recipe, dtype):
    x, w, g = operands(device="cuda", dtype=dtype)
    b = ScaledMMFP8Backend(recipe)
    mode, _ = b.mode("cuda")
    got, ref = gemms(b, x, w, g), exact(x, w, g)
    emu = gemms(EmulatedFP8Backend(recipe, scaled_mm=False), x, w, g)
    for name in got:
        assert got[name].dtype == dtype and got[name].shape == ref[name].shape
        assert rel(got[name], ref[name]) < 0.06, (name, mode)
        if mode != "rowwise":  # same E4M3 values; bf16 rounding, or the tensor cores' accumulation
            # (tensor-wise scales run on the row-wise kernel on CUDA, which writes bf16: bf16 rounding too)
            bf16_out = dtype == torch.bfloat16 or recipe == "current"
            assert rel(got[name], emu[name]) < (1e-2 if bf16_out else 1e-3), (name, mode)


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["current", "blockwise"])
def test_gpu_grouped_layer_and_compiled_quantizers(recipe):
    torch.manual_seed(0)
    layer = GroupedLinear(4, 512, 256).cuda().bfloat16()
    rows = [300, 0, 5, 211]
    offsets = torch.tensor(rows, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(rows), 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for compile in (False, True) if recipe == "blockwise" else (False,):  # compiling takes a while: one recipe
        layer.backend = ScaledMMFP8Backend(recipe, compile=compile).for_layer("experts", layer)
        y = layer(x, offsets)
        y.float().sum().backward()
        outs.append((y.detach(), x.grad.clone(), layer.weight.grad.clone()))
        assert not layer.weight.grad[1].any()  # the empty expert
        x.grad, layer.weight.grad = None, None
    start = 0
    for e, n in enumerate(rows):
        if n:
            want = x[start : start + n].detach().float() @ layer.weight[e].detach().float().t()
            assert rel(outs[0][0][start : start + n], want) < 0.06, e
        start += n
    if len(outs) == 2 and nat.COMPILE_ERROR is None:  # compiled quantizers: the same E4M3 values, to rounding
        for a, b in zip(*outs):
            assert rel(a, b) < 1e-2
    elif nat.COMPILE_ERROR is not None:
        print(f"torch.compile unavailable here: {nat.COMPILE_ERROR}")


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["current", "blockwise"])
def test_gpu_model_step_close_to_bf16_and_under_checkpointing(recipe):
    from model.config import ModelConfig

    cfg = dict(
        vocab_size=1024,
        hidden_size=512,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=1024,
        num_attention_heads=4,
        q_lora_rank=256,
        kv_lora_rank=384,
        qk_nope_head_dim=64,
        qk_rope_head_dim=128,
        v_head_dim=128,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=256,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=512,
        name="torch-fp8-probe",
    )
    tokens = torch.randint(0, 1024, (2, 258), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for name, fp8, ckpt in (("bf16", False, False), ("fp8", True, False), ("fp8-ckpt", True, True)):
        torch.manual_seed(0)
        model = DeepseekV3(ModelConfig(**cfg, activation_checkpointing=ckpt)).cuda().bfloat16().train()
        model.restore_router_precision()
        if fp8:
            apply_fp8(model, ScaledMMFP8Backend(recipe))
        out = model(tokens)
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "mlp.experts" in n)
        losses[name] = float(out.loss.detach())
    assert abs(losses["fp8"] - losses["bf16"]) < 0.01 * losses["bf16"]
    assert abs(losses["fp8-ckpt"] - losses["fp8"]) < 1e-3 * losses["fp8"]

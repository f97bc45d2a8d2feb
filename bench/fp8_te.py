"""fp8_te (GPU): training step time, peak memory and loss gap of FP8 vs bf16 on one GPU, plus GEMM-level timings.

A DeepSeek-V3-shaped model with GEMM dims of 1408 and more (hidden 4096, 32 heads of 128 + 128 rope, q_lora
1536, 16 routed experts of width 1408 + 1 shared, top-4, 4 layers + MTP: about 1.4B parameters) trains in
bf16 (parameters, AdamW states) for STEPS steps of BATCH x SEQ tokens on a learnable synthetic stream (a fixed
random Markov chain over the vocabulary), once per mode, from the same initial weights on the same batches:
- `bf16`: plain bf16 GEMMs (the reference);
- `te-<recipe>`: Transformer Engine (model/fp8/te.py), when it imports and supports the GPU;
- `torch-blockwise`, `torch-current`: real FP8 GEMMs through torch alone (model/fp8/scaled_mm.py,
  torch._scaled_mm; `blockwise` is DeepSeek's 1x128 / 128x128 scaling where torch's blockwise kernel runs,
  else row-wise scaling: each mode's `describe` says which), quantizers compiled unless --no-compile;
- `torch-blockwise-triton`: the same with the fused Triton quantizers (model/fp8/triton_quant.py), where the
  blockwise kernel runs;
- `emulated-blockwise`: the fp32 emulation (model/fp8/), the numerical reference for the loss gap (slow).
Per mode: median step time after WARMUP steps, tokens/s, peak allocated memory, final loss (mean of the last
TAIL steps), its relative gap to bf16 and the speedup over bf16. Before the model runs, a GEMM microbenchmark
(M=8192 tokens, K=N=4096 and 7168): bf16 matmul vs the FP8 GEMM alone, vs quantize + FP8 GEMM (eager and
compiled quantizers), and forward+backward of one linear layer, because the model-level speedup is diluted by
everything that stays bf16 (attention core, head, norms, router, optimizer).

Needs only torch with CUDA (no DeepSpeed, Hydra or Transformer Engine). Modes that would overrun the time
budget (--budget, default 210 s for everything) are cut short or skipped and say so in the JSON.

    python bench/fp8_te.py [--out PATH] [--steps N] [--no-emulated] [--no-compile] [--budget S]
    python bench/fp8_te.py --smoke --out /tmp/fp8_te.json   # seconds on CPU: a tiny model, tiny GEMMs
    python -m bench fp8_te                                  # the same as the first, into bench/results/

Output: --out, else $FP8_TE_OUT, else bench/results/fp8_te.json (smoke: only --out / $FP8_TE_OUT). FP8_TE_RECIPE
picks TE's recipe (default blockwise). Goal: at least 1.3x faster than bf16 with the loss within 1%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/fp8_te.py` from anywhere
    sys.path.insert(0, str(ROOT))

STEPS, WARMUP, TAIL = 30, 8, 5
BATCH, SEQ = 4, 2048
VOCAB = 32768
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=4096,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=11264,
    num_attention_heads=32,
    q_lora_rank=1536,
    kv_lora_rank=384,
    qk_nope_head_dim=128,
    qk_rope_head_dim=128,
    v_head_dim=128,
    n_routed_experts=16,
    n_shared_experts=1,
    moe_intermediate_size=1408,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    num_nextn_predict_layers=1,
    max_position_embeddings=4096,
    name="fp8-bench-1.4b",
)
GEMM_SHAPES = [(8192, 4096, 4096), (8192, 7168, 7168)]  # (M tokens, K in, N out)
GEMM_ITERS = 20
# --smoke: a model and GEMMs small enough for a CPU in seconds
SMOKE_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    intermediate_size=128,
    num_attention_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=64,
    name="fp8-bench-smoke",
)
SMOKE = dict(steps=4, warmup=1, tail=2, batch=2, seq=32, shape=SMOKE_SHAPE, gemm_shapes=[(64, 128, 96)], gemm_iters=2)
GOAL = 1.3
LOSS_GAP = 0.01  # 30 steps from scratch: FP8 within 1% of bf16
BUDGET_S = 210.0


# ---- data --------------------------------------------------------------------------------------------------
def synthetic_batches(n: int, batch: int, seq: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """[n, batch, seq + 2] token streams from a fixed sparse Markov chain (each token has 8 likely successors):
    learnable, so the loss falls within a few dozen steps. All n x batch streams advance together (one
    gather per position), so 60 x 4 x 2050 tokens take milliseconds."""
    g = torch.Generator(device="cpu").manual_seed(0)
    successors = torch.randint(0, vocab, (vocab, 8), generator=g)
    rows = n * batch
    choice = torch.randint(0, 8, (seq + 1, rows), generator=g)
    tok = torch.empty(seq + 2, rows, dtype=torch.long)
    tok[0] = torch.randint(0, vocab, (rows,), generator=g)
    for i in range(1, seq + 2):
        tok[i] = successors[tok[i - 1], choice[i - 1]]
    return tok.t().reshape(n, batch, seq + 2).to(device)


# ---- timing helpers --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `iters` calls after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t))
    return statistics.median(samples)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _try(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as e:  # a benchmark row that cannot run here says why instead of ending the run
        return None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ---- GEMM microbenchmark ---------------------------------------------------------------------------------------
def gemm_bench(
    shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype, iters: int, compile: bool
) -> list[dict[str, Any]]:
    """Per (M, K, N): ms and TFLOP/s of bf16 x @ W^T, of the FP8 GEMM alone (pre-quantized operands: tensor,
    row-wise, blockwise scaling; tensor with fast accumulation), of quantize + FP8 GEMM (eager, compiled), and
    forward+backward of one Linear (bf16 vs the torch FP8 backend); relative error of each FP8 path vs fp32."""
    out = []
    for m, k, n in shapes:
        row = gemm_row(m, k, n, device, dtype, iters, compile)
        out.append(row)
        print(f"gemm {m}x{k}x{n}: " + ", ".join(f"{k2} {v:.3f} ms" for k2, v in row["ms"].items()), flush=True)
        if row["errors"]:
            print(f"gemm {m}x{k}x{n} errors: {row['errors']}", flush=True)
    return out


def gemm_row(
    m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, iters: int, compile: bool
) -> dict[str, Any]:
    """One shape of `gemm_bench`."""
    from model.fp8 import scaled_mm as nat
    from model.gemm import Linear

    api = nat.blockwise_support(str(device))[0] if device.type == "cuda" else None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(dtype)
    gy = torch.randn(m, n, device=device, generator=g).to(dtype)
    ref = x.float() @ w.float().t()
    row: dict[str, Any] = {"M": m, "K": k, "N": n, "ms": {}, "tflops": {}, "rel_err": {}, "errors": {}}
    flop = 2 * m * k * n

    def add(name: str, fn: Callable[[], Any], flops: int = flop, check: bool = True) -> None:
        ms, err = _try(lambda: time_ms(fn, device, iters))
        if err is not None:
            row["errors"][name] = err
            return
        row["ms"][name] = ms
        row["tflops"][name] = flops / ms / 1e9
        if check:
            row["rel_err"][name] = _rel(fn(), ref)

    def quant_gemm(kind: str, comp: bool) -> Callable[[], torch.Tensor]:
        wk, align = ("128x128", 128) if kind == "1x128" else (kind, 16)
        return lambda: nat.scaled_mm(
            nat.make_operand(x, kind, align, comp), nat.make_operand(w, wk, align, comp), dtype, api
        )

    def quant_x(kind: str, comp: bool) -> Callable[[], Any]:
        return lambda: nat.make_operand(x, kind, 128 if kind == "1x128" else 16, comp)

    def gemm_only(a: Any, b: Any, fast: bool = False) -> Callable[[], torch.Tensor]:
        if fast:  # tensor-wise with fast (non-promoted) accumulation, as TE runs its forward GEMM
            return lambda: torch._scaled_mm(
                a.values,
                b.values.t(),
                scale_a=a.scale.reshape(()),
                scale_b=b.scale.reshape(()),
                out_dtype=dtype,
                use_fast_accum=True,
            )
        return lambda: nat.scaled_mm(a, b, dtype, api)

    def fwd_bwd(backend: Any) -> Callable[[], None]:
        layer = Linear(k, n).to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
        if backend is not None:
            layer.backend = backend.for_layer("probe", layer)
        xg = x.detach().requires_grad_(True)

        def step() -> None:
            layer(xg).backward(gy)
            layer.weight.grad = None
            xg.grad = None

        return step

    add("bf16", lambda: x @ w.t())
    kinds = ["tensor", "row"] + (["1x128"] if api is not None else [])
    for kind in kinds:
        wk, align = ("128x128", 128) if kind == "1x128" else (kind, 16)
        a, b = nat.make_operand(x, kind, align), nat.make_operand(w, wk, align)
        add(f"fp8_{kind}_gemm_only", gemm_only(a, b))
        if kind == "tensor":
            add("fp8_tensor_gemm_only_fast_accum", gemm_only(a, b, fast=True))
    for comp in (False, True) if compile else (False,):
        tag = "compiled" if comp else "eager"
        for kind in kinds:
            add(f"fp8_{kind}_quant_{tag}", quant_gemm(kind, comp))
            add(f"quantize_x_{kind}_{tag}", quant_x(kind, comp), flops=0, check=False)
    # one Linear, forward + backward (dgrad and wgrad): bf16 vs the torch FP8 backend
    add("linear_fwd_bwd_bf16", fwd_bwd(None), flops=3 * flop, check=False)
    for recipe in ("current", "blockwise"):
        add(
            f"linear_fwd_bwd_torch-{recipe}",
            fwd_bwd(nat.ScaledMMFP8Backend(recipe, compile=compile)),
            flops=3 * flop,
            check=False,
        )
    if api is not None:  # the Triton quantizers: one pass for both of an activation's operands
        try:
            nat.ScaledMMFP8Backend("blockwise", fused=True).mode(x.device)
            add("linear_fwd_bwd_torch-blockwise-triton", fwd_bwd(nat.ScaledMMFP8Backend("blockwise", fused=True)),
                flops=3 * flop, check=False)
        except nat.NativeFP8Unavailable as e:
            row.setdefault("skipped", {})["linear_fwd_bwd_torch-blockwise-triton"] = str(e)
    ms = row["ms"]
    row["speedup_vs_bf16"] = {name: ms["bf16"] / v for name, v in ms.items() if "bf16" in ms and name.startswith("fp8")}
    if "linear_fwd_bwd_bf16" in ms:
        row["speedup_vs_bf16"].update(
            {name: ms["linear_fwd_bwd_bf16"] / v for name, v in ms.items() if name.startswith("linear")}
        )
    return row


# ---- model training --------------------------------------------------------------------------------------------
def train(
    make_backend: Callable[[], Any] | None,
    batches: torch.Tensor,
    shape: dict,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    tail: int,
    deadline: float,
) -> dict[str, Any]:
    """Train a fresh model (seed 0) on `batches`; stops early (truncated) when the deadline would be missed."""
    from model.config import ModelConfig
    from model.fp8.factory import apply_fp8
    from model.transformer import DeepseekV3

    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV3(ModelConfig(**shape))
    model = model.to(device=device, dtype=dtype).train()
    model.restore_router_precision()  # fp32 bias, as the trainer keeps it
    backend = None
    if make_backend is not None:
        backend = make_backend()
        apply_fp8(model, backend)
    # lr 3e-4 after a 5-step linear warm-up: at 1e-3 from step 0 the 1.4B model's loss rose over the 30 steps
    # (H200 run), which makes a loss gap meaningless
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, all_dt, truncated = [], [], [], False
    begin = time.perf_counter()
    for step, tokens in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        out = model(tokens)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_router_biases()
        _sync(device)
        dt = time.perf_counter() - start
        all_dt.append(dt)
        if step >= warmup:
            times.append(dt)
        losses.append(float(out.lm_loss.detach()))
        left = len(batches) - step - 1
        # the first steps include compiling and autotuning: estimate from the faster of the last two
        if left and step >= 2 and time.perf_counter() + left * min(all_dt[-2:]) > deadline:
            truncated = True
            break
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # after the run: whether the compiled quantizers held up is known only now
    describe = "bf16 GEMMs" if dtype == torch.bfloat16 else f"{dtype} GEMMs"
    if backend is not None:
        describe = backend.describe(device) if hasattr(backend, "describe") else backend.name
    if not times:  # cut before the warmup ended: time the steps there are
        times = [(time.perf_counter() - begin) / len(losses)]
    step_s = statistics.median(times)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n_tail = min(tail, len(losses))
    return {
        "describe": describe,
        "step_s": step_s,
        "tokens_per_s": batches.shape[1] * batches.shape[2] / step_s,
        "peak_gib": peak,
        "first_loss": losses[0],
        "final_loss": sum(losses[-n_tail:]) / n_tail,
        "losses": losses,
        "steps_run": len(losses),
        "timed_steps": len(times),
        "truncated": truncated,
        "seconds": time.perf_counter() - begin,
    }


def fp8_modes(device: torch.device, compile: bool, emulated: bool, te_recipe: str) -> tuple[list, dict[str, str]]:
    """[(mode name, backend factory)] that can run here, and {mode: why skipped} for those that cannot."""
    from model.fp8.emulated import EmulatedFP8Backend
    from model.fp8.scaled_mm import NativeFP8Unavailable, ScaledMMFP8Backend

    modes: list[tuple[str, Callable[[], Any]]] = []
    skipped: dict[str, str] = {}
    if device.type == "cuda":
        try:
            from model.fp8.te import TEBackend, TEUnavailable, check_te

            check_te(te_recipe)
            modes.append((f"te-{te_recipe}", lambda: TEBackend(te_recipe)))
        except TEUnavailable as e:
            skipped[f"te-{te_recipe}"] = str(e)
    else:
        skipped[f"te-{te_recipe}"] = "Transformer Engine needs a CUDA GPU"
    for recipe in ("blockwise", "current"):
        probe = ScaledMMFP8Backend(recipe, compile=compile)
        try:
            probe.mode(device)
            modes.append((f"torch-{recipe}", lambda recipe=recipe: ScaledMMFP8Backend(recipe, compile=compile)))
        except NativeFP8Unavailable as e:
            skipped[f"torch-{recipe}"] = str(e)
    try:  # the fused Triton quantizers (precision.fp8.quantizer=triton): blockwise GEMMs on SM90 only
        ScaledMMFP8Backend("blockwise", fused=True).mode(device)
        modes.append(("torch-blockwise-triton", lambda: ScaledMMFP8Backend("blockwise", fused=True)))
    except NativeFP8Unavailable as e:
        skipped["torch-blockwise-triton"] = str(e)
    if emulated:
        modes.append(("emulated-blockwise", lambda: EmulatedFP8Backend("blockwise")))
    else:
        skipped["emulated-blockwise"] = "--no-emulated"
    return modes, skipped


def probe_blockwise_in_child(timeout: float = 120.0) -> str:
    """Probe torch's blockwise FP8 kernel in a child process first: a kernel that faulted here would leave
    this process's CUDA context unusable for the rest of the run. If the child does not come back cleanly,
    the blockwise kernel is switched off (FP8_TORCH_BLOCKWISE=0: the row-wise fallback runs instead)."""
    import subprocess

    from model.fp8.scaled_mm import BLOCKWISE_ENV

    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from model.fp8.scaled_mm import blockwise_support; "
        "print(blockwise_support(str(torch.device('cuda', torch.cuda.current_device()))))"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=timeout)
        ok, text = proc.returncode == 0, (proc.stdout.strip() or proc.stderr.strip()[-300:])
    except subprocess.TimeoutExpired:
        ok, text = False, f"timed out after {timeout:.0f} s"
    if not ok:
        os.environ[BLOCKWISE_ENV] = "0"
        return f"probe process failed ({text}); blockwise kernel off"
    return text


def bench(
    smoke: bool = False,
    out: str | Path | None = None,
    steps: int | None = None,
    emulated: bool = True,
    compile: bool = True,
    budget: float = BUDGET_S,
) -> dict[str, Any]:
    from bench.common import result
    from model.fp8 import scaled_mm

    t0 = time.perf_counter()
    deadline = t0 + budget
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    p = (
        SMOKE
        if smoke
        else dict(
            steps=STEPS,
            warmup=WARMUP,
            tail=TAIL,
            batch=BATCH,
            seq=SEQ,
            shape=SHAPE,
            gemm_shapes=GEMM_SHAPES,
            gemm_iters=GEMM_ITERS,
        )
    )
    n_steps = steps or p["steps"]
    compile = compile and cuda  # inductor on CPU needs a C++ toolchain and minutes; the smoke run stays eager
    te_recipe = os.environ.get("FP8_TE_RECIPE", "blockwise")
    print(
        f"fp8_te: {torch.__version__} on {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
        f"{'smoke' if smoke else 'full'} run, {n_steps} steps of {p['batch']} x {p['seq']}",
        flush=True,
    )

    if cuda:
        print(f"fp8_te: blockwise kernel probe: {probe_blockwise_in_child()}", flush=True)
    gemm = gemm_bench(p["gemm_shapes"], device, dtype, p["gemm_iters"], compile)

    batches = synthetic_batches(n_steps, p["batch"], p["seq"], p["shape"]["vocab_size"], device)
    modes, skipped = fp8_modes(device, compile, emulated, te_recipe)
    results: dict[str, dict[str, Any]] = {}
    for name, make in [("bf16", None), *modes]:
        if name != "bf16" and "bf16" in results and deadline - time.perf_counter() < 0.5 * results["bf16"]["seconds"]:
            skipped[name] = f"time budget ({budget:.0f} s) spent"
            continue
        res, err = _try(
            lambda make=make: train(make, batches, p["shape"], device, dtype, p["warmup"], p["tail"], deadline)
        )
        if err is not None:
            skipped[name] = err
            print(f"{name}: failed: {err}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[name] = res
        print(
            f"{name}: {res['step_s'] * 1e3:.1f} ms/step, peak {res['peak_gib']} GiB, loss {res['first_loss']:.3f} -> "
            f"{res['final_loss']:.4f} ({res['steps_run']} steps{', TRUNCATED' if res['truncated'] else ''}); "
            f"{res['describe']}",
            flush=True,
        )
    base = results.get("bf16")
    for res in results.values() if base is not None else []:
        res["speedup"] = base["step_s"] / res["step_s"]
        # a run cut short is compared with bf16 over the same steps (mean of the last TAIL it ran)
        n = min(res["steps_run"], base["steps_run"])
        k = min(p["tail"], n)
        mine, ref = sum(res["losses"][n - k : n]) / k, sum(base["losses"][n - k : n]) / k
        res["rel_loss_gap"] = abs(mine - ref) / ref
        res["loss_gap_steps"] = n
        if res["peak_gib"] and base["peak_gib"]:
            res["peak_memory_ratio"] = res["peak_gib"] / base["peak_gib"]
    order = [f"te-{te_recipe}", "torch-blockwise-triton", "torch-blockwise", "torch-current"]
    primary = next((n for n in order if n in results), None)
    ours = results[primary]["step_s"] if primary else float("nan")
    peer = base["step_s"] if base else float("nan")
    gap = results[primary].get("rel_loss_gap") if primary else None
    target = out if out is not None else os.environ.get("FP8_TE_OUT")
    if target is None and not smoke:
        target = ROOT / "bench" / "results" / "fp8_te.json"
    summary = dict(
        name="fp8_te",
        ours=ours,
        peer=peer,
        unit="s/step",
        goal=f">= {GOAL}x faster than bf16, loss within {LOSS_GAP}",
        repeats=results.get(primary, {}).get("timed_steps", 0),
        higher_is_better=False,
        primary=primary,
        modes=results,
        skipped=skipped,
        gemm=gemm,
        rel_loss_gap=gap,
        loss_gap_ok=None if gap is None else gap <= LOSS_GAP,
        goal_met=bool(gap is not None and gap <= LOSS_GAP and peer / ours >= GOAL),
        smoke=smoke,
        shape=p["shape"],
        batch=p["batch"],
        seq_len=p["seq"],
        steps=n_steps,
        warmup=p["warmup"],
        tail=p["tail"],
        compile=compile,
        compile_error=scaled_mm.COMPILE_ERROR,
        blockwise_kernel=scaled_mm.blockwise_support(str(device))[1],
        seconds=time.perf_counter() - t0,
    )
    if target is None:
        from bench.common import machine

        summary["ratio"] = peer / ours if ours else float("inf")
        summary["machine"] = machine()
        summary.pop("higher_is_better")
        res_out = summary
    else:
        res_out = result(**summary, path=target)
        print(f"fp8_te: wrote {target}")
    print(
        f"fp8_te: {primary} {res_out['ratio']:.2f}x bf16 step time, loss gap {gap}, "
        f"{time.perf_counter() - t0:.0f} s in all",
        flush=True,
    )
    return res_out


def run(repeats: int = 1) -> dict[str, Any]:
    """`python -m bench fp8_te`: the full run into bench/results/fp8_te.json (GPU only)."""
    if not torch.cuda.is_available():
        print("fp8_te: needs a CUDA GPU (SM89+ for FP8; Hopper for blockwise scaling); skipped")
        return {}
    return bench()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/fp8_te.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and GEMMs on CPU (seconds)")
    ap.add_argument("--out", help="result JSON path (default $FP8_TE_OUT, else bench/results/fp8_te.json)")
    ap.add_argument("--steps", type=int, help=f"training steps per mode (default {STEPS})")
    ap.add_argument("--no-emulated", action="store_true", help="skip the emulated-FP8 reference run")
    ap.add_argument("--no-compile", action="store_true", help="eager quantizers only")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("fp8_te: needs a CUDA GPU (use --smoke on CPU)", file=sys.stderr)
        return 2
    bench(
        smoke=args.smoke,
        out=args.out,
        steps=args.steps,
        emulated=not args.no_emulated,
        compile=not args.no_compile,
        budget=args.budget,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

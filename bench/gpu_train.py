"""gpu_train (GPU): training tokens/s and MFU on one GPU, ours vs torchtitan 0.3.0's DeepSeek-V3, both in bf16.

The model (SHAPE: hidden 2048, 16 heads of 128 + 64 rope, kv_lora 512, no q_lora, 8 layers of which 1 dense of
width 8192, 16 routed experts of width 2048 + 1 shared, top-4 in 4 groups keeping 2, vocab 32000; 1.79B
parameters, 4.5 GFLOP of model FLOPs per trained token at sequence 4096) is built once as ours and copied into
torchtitan's (bench/peers.py: its own layer builder, its SDPA inner attention instead of flex attention, the
same causal math). Both are cast to bf16 (our routers keep their fp32 bias, as the trainer does; torchtitan's
RoPE table stays complex64) and train with the same AdamW (lr 3e-4, betas 0.9 / 0.95, weight decay 0.1) on
BATCH x SEQ tokens of the same random batches, MTP and the sequence-wise balance loss off on both sides
(torchtitan's step: logits, then its trainer's loss, cross-entropy summed in fp32 / targets). A step = forward,
loss, backward, optimizer step, zero_grad.

Before timing, one step each on the same batch: the two losses must agree to BF16_LOSS_TOL (the mapping itself is
checked bit for bit in fp32 by `python -m bench model_step`). Then WARMUP steps each, then STEPS steps alternating
ours / theirs, each timed with CUDA events; medians quoted. Peak memory per side: its weights and AdamW state
plus the most its step allocates on top of what is resident (both sides share the device). MFU = model FLOPs
(model.info.training_flops_per_token: 6 x activated matmul parameters + causal attention, per token) x tokens /
step time / the GPU's dense bf16 peak (trainer/report/metrics.py; none for an unknown GPU). `ratio` = ours
tokens/s / torchtitan's (goal >= 1.0).

    python bench/gpu_train.py [--out PATH] [--steps N]
    python bench/gpu_train.py --smoke --out /tmp/gpu_train.json   # seconds on CPU: a tiny model, 2 steps
    python -m bench gpu_train                                     # into bench/results/gpu_train.json

torchtitan comes from the environment when it is installed there at the pinned version (the GPU script's wheel
directory brings it), else from build/peers (bench/peers.py, pip --no-deps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_train.py` from anywhere
    sys.path.insert(0, str(ROOT))

BATCH, SEQ = 2, 4096
STEPS, WARMUP = 10, 3
BF16_LOSS_TOL = 2e-3  # as bench/model_step.py: bf16 moves the loss ~2e-4 from fp32 on either side
SHAPE = dict(
    vocab_size=32000, hidden_size=2048, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=8192,
    num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=2048, num_experts_per_tok=4,
    n_group=4, topk_group=2, num_nextn_predict_layers=0, seq_aux_alpha=0.0, max_position_embeddings=SEQ,
    name="gpu-train-1.8b",
)
SMOKE_SHAPE = dict(SHAPE, vocab_size=512, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                   num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   n_routed_experts=8, moe_intermediate_size=32, max_position_embeddings=64, name="smoke")


def build(shape: dict[str, Any], device: torch.device,
          compile: bool = False) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    """(config, ours, torchtitan's) in bf16 on `device`, torchtitan's holding our initial weights; `compile`:
    each through torch.compile as its trainer does (ours `model.compile_regions`, torchtitan's whole blocks)."""
    from bench.peers import compile_torchtitan, copy_weights_to_torchtitan, torchtitan_model
    from model.config import ModelConfig
    from model.transformer import DeepseekV3

    cfg = ModelConfig(**shape, compile_regions=compile)
    torch.manual_seed(0)
    with torch.device(device):
        ours = DeepseekV3(cfg).train()
        with torch.no_grad():  # weights well above the 0.006 init: clear routing margins, as model_step
            for p in ours.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
        theirs = torchtitan_model(cfg).train()
    with torch.no_grad():
        copy_weights_to_torchtitan(ours, theirs)
    ours.to(torch.bfloat16)
    ours.restore_router_precision()
    for p in theirs.parameters():  # its parameters only: its RoPE table stays complex64
        p.data = p.data.to(torch.bfloat16)
    if compile:
        compile_torchtitan(theirs)
    return cfg, ours, theirs


def train_step(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss = loss_of(tokens)
        loss.backward()
        opt.step()
        # freed here, not at the next step's start: between steps each side holds only its weights and AdamW
        # state, so the other side's step peak does not include this side's gradients
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.optimizer = opt
    return step


def resident_gib(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    """Bytes of the weights and the optimizer state of one side, GiB."""
    tensors = [*model.parameters(), *model.buffers(),
               *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def steps_of(ours: torch.nn.Module, theirs: torch.nn.Module,
             compile: bool = False) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from bench.model_step import torchtitan_loss

    their_loss = torch.compile(torchtitan_loss) if compile else torchtitan_loss  # its compile.components: loss

    def ours_loss(tokens: torch.Tensor) -> torch.Tensor:
        return ours(tokens).loss

    def theirs_loss(tokens: torch.Tensor) -> torch.Tensor:
        return their_loss(theirs(tokens[:, :-1]), tokens[:, 1:].reshape(-1))

    return {"ours": train_step(ours, ours_loss), "torchtitan": train_step(theirs, theirs_loss)}


def timed(step: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, device: torch.device) -> float:
    """Seconds of one step: CUDA events on a GPU, the wall clock on CPU (smoke)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(tokens)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step(tokens)
    return time.perf_counter() - t0


def bench(shape: dict[str, Any], device: torch.device, batch: int, seq: int, steps: int, warmup: int,
          path: Path | None = None, compile: bool = False) -> dict[str, Any]:
    from bench.common import result
    from bench.peers import TORCHTITAN, torchtitan_moe_module
    from model.info import training_flops_per_token
    from trainer.report.metrics import peak_flops

    _, version = torchtitan_moe_module()
    cfg, ours, theirs = build(shape, device, compile)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    steps_fn = steps_of(ours, theirs, compile)
    # the self-check: the first step of each on the same batch (before either optimizer moved anything)
    first = {name: float(fn(batches[0])) for name, fn in steps_fn.items()}
    gap = abs(first["ours"] - first["torchtitan"]) / abs(first["torchtitan"])
    if not math.isfinite(gap) or gap > BF16_LOSS_TOL:
        raise AssertionError(f"gpu_train self-check: losses {first} differ by {gap:.3g} (relative) > {BF16_LOSS_TOL}")
    for i in range(warmup):
        for fn in steps_fn.values():
            fn(batches[i % len(batches)])
    seconds: dict[str, list[float]] = {name: [] for name in steps_fn}
    # peak memory of each side: its weights and AdamW state, plus what its step allocates on top of everything
    # resident (activations, gradients, temporaries); both models share the device, so the raw peak would count
    # the other side's state too
    models = {"ours": ours, "torchtitan": theirs}
    resident = {name: resident_gib(models[name], fn.optimizer) for name, fn in steps_fn.items()}
    step_peak: dict[str, float | None] = {}
    for name, fn in steps_fn.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        seconds[name].append(timed(fn, batches[0], device))
        step_peak[name] = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None
    peak = {k: (resident[k] + v if v is not None else None) for k, v in step_peak.items()}
    for i in range(1, steps):
        order = list(steps_fn.items()) if i % 2 else list(reversed(steps_fn.items()))
        for name, fn in order:
            seconds[name].append(timed(fn, batches[i % len(batches)], device))
    med = {name: statistics.median(s) for name, s in seconds.items()}
    tokens = batch * seq
    flops = training_flops_per_token(cfg, seq) * tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak_bf16 = peak_flops(name, "bf16")
    mfu = {k: flops / v / peak_bf16 for k, v in med.items()} if peak_bf16 else None
    tps = {k: tokens / v for k, v in med.items()}
    return result(
        "gpu_train_compiled" if compile else "gpu_train",
        ours=tps["ours"],
        peer=tps["torchtitan"],
        unit="tokens/s (bf16 training step incl. AdamW, one GPU)",
        goal=">= 1.0x torchtitan 0.3.0 DeepSeek-V3 at equal config (bf16); MFU of both",
        repeats=steps,
        path=path,
        seconds_median=med,
        seconds_all=seconds,
        peak_memory_gib=peak,
        memory_parts_gib={"weights_and_adamw": resident, "step_on_top": step_peak},
        model_flops_per_step=flops,
        mfu=mfu,
        peak_flops_bf16=peak_bf16,
        device=name or str(device),
        first_step_loss=first,
        self_check_loss_rel_diff=gap,
        compiled="ours: model.compile_regions; torchtitan: blocks (fullgraph) and loss, as its compile.enable"
        if compile else "no (eager on both sides)",
        params={"total": sum(p.numel() for p in ours.parameters()),
                "activated_flops_per_token": training_flops_per_token(cfg, seq)},
        shapes={**{k: v for k, v in shape.items() if k != "name"}, "preset": shape["name"], "batch": batch,
                "seq": seq, "dtype": "bfloat16"},
        torchtitan={"version": version, "pinned": TORCHTITAN,
                    "attention": "its ScaledDotProductAttention (causal SDPA) instead of flex attention",
                    "loss": "F.cross_entropy(logits.float(), reduction='sum') / targets, as its trainer"},
    )


def run(repeats: int = 1) -> dict[str, Any]:
    """`python -m bench gpu_train`: the full run into bench/results/gpu_train.json (GPU only)."""
    if not torch.cuda.is_available():
        print("gpu_train: needs a CUDA GPU; skipped")
        return {}
    from bench.peers import torchtitan_warnings_quiet

    with torchtitan_warnings_quiet():
        return bench(SHAPE, torch.device("cuda"), BATCH, SEQ, STEPS, WARMUP)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu_train.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 steps (seconds)")
    ap.add_argument("--out", help="result JSON path (default bench/results/gpu_train.json; smoke: required)")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per side (default {STEPS})")
    ap.add_argument("--compile", action="store_true",
                    help="both sides through torch.compile as their trainers do (the self-check step compiles)")
    args = ap.parse_args(argv)
    from bench.peers import torchtitan_warnings_quiet

    if args.smoke:
        if not args.out:
            print("error: --smoke needs --out (the smoke run does not overwrite bench/results)", file=sys.stderr)
            return 2
        with torchtitan_warnings_quiet():
            res = bench(SMOKE_SHAPE, torch.device("cpu"), 2, 32, 2, 1, Path(args.out), args.compile)
    elif not torch.cuda.is_available():
        print("error: gpu_train needs a CUDA GPU; run --smoke on CPU", file=sys.stderr)
        return 2
    else:
        with torchtitan_warnings_quiet():
            res = bench(SHAPE, torch.device("cuda"), BATCH, SEQ, args.steps, WARMUP,
                        Path(args.out) if args.out else None, args.compile)
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "seconds_all")}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

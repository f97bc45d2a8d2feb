"""fp8_te (GPU only): training step time and peak memory, Transformer Engine FP8 vs bf16, one Hopper GPU.

A DeepSeek-V3-shaped model with GEMM dims of 4096 and more (hidden 4096, 32 heads of 128 + 128 rope, q_lora
1536, 16 routed experts of width 1408 + 1 shared, top-4, 4 layers + MTP: about 1.4B parameters) trains in
bf16 (parameters, AdamW states) for STEPS steps on a learnable synthetic stream (a fixed random Markov chain
over the vocabulary), once with plain bf16 GEMMs and once with the FP8 layers (attention, dense MLP, shared
and routed experts) through TE's `blockwise` recipe (model/te_backend.py). Same initial weights, same
batches. Reported: median step time after WARMUP steps, peak allocated memory, and the relative gap of the
final loss (mean of the last TAIL steps). Budget: well under 10 minutes on one H100/H200.

`python -m bench fp8_te` (or `python bench/fp8_te.py`); FP8_TE_RECIPE picks another recipe (current,
delayed on SM89+; mxfp8 on Blackwell). Without a GPU or TE it prints why and writes nothing.
Goal: at least 1.3x faster than bf16.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import torch

STEPS, WARMUP, TAIL = 60, 10, 10
BATCH, SEQ = 4, 2048
VOCAB = 32768
SHAPE = dict(vocab_size=VOCAB, hidden_size=4096, num_hidden_layers=4, first_k_dense_replace=1,
             intermediate_size=11264, num_attention_heads=32, q_lora_rank=1536, kv_lora_rank=384,
             qk_nope_head_dim=128, qk_rope_head_dim=128, v_head_dim=128, n_routed_experts=16, n_shared_experts=1,
             moe_intermediate_size=1408, num_experts_per_tok=4, n_group=4, topk_group=2,
             num_nextn_predict_layers=1, max_position_embeddings=4096, name="fp8-bench-1.4b")
GOAL = 1.3
LOSS_GAP = 0.01  # 60 steps from scratch: FP8 within 1% of bf16


def synthetic_batches(n: int, device: torch.device) -> list[torch.Tensor]:
    """Token streams from a fixed sparse Markov chain (each token has 8 likely successors): learnable, so the
    loss falls within a few dozen steps."""
    g = torch.Generator(device="cpu").manual_seed(0)
    successors = torch.randint(0, VOCAB, (VOCAB, 8), generator=g)
    out = []
    for _ in range(n):
        tok = torch.empty(BATCH, SEQ + 2, dtype=torch.long)
        tok[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)
        choice = torch.randint(0, 8, (BATCH, SEQ + 1), generator=g)
        for i in range(1, SEQ + 2):
            tok[:, i] = successors[tok[:, i - 1], choice[:, i - 1]]
        out.append(tok.to(device))
    return out


def train(fp8: str | None, batches: list[torch.Tensor]) -> dict[str, Any]:
    from model.config import ModelConfig
    from model.fp8 import apply_fp8
    from model.transformer import DeepseekV3

    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**SHAPE)).cuda().bfloat16().train()
    for router in model.routers():  # fp32 bias, as the trainer keeps it
        router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
        router.step_counts.data = router.step_counts.data.double()
    if fp8 is not None:
        from model.te_backend import TEBackend

        apply_fp8(model, TEBackend(fp8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step, tokens in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(tokens)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_biases()
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
        losses.append(float(out.lm_loss))
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    torch.cuda.empty_cache()
    return {"step_s": statistics.median(times), "peak_gib": peak, "final_loss": sum(losses[-TAIL:]) / TAIL,
            "first_loss": losses[0], "tokens_per_s": BATCH * SEQ / statistics.median(times)}


def run(repeats: int = 1) -> dict[str, Any]:
    recipe = os.environ.get("FP8_TE_RECIPE", "blockwise")
    if not torch.cuda.is_available():
        print("fp8_te: needs a CUDA GPU (Hopper for the blockwise recipe); skipped")
        return {}
    from model.te_backend import TEUnavailable, check_te

    try:
        check_te(recipe)
    except TEUnavailable as e:
        print(f"fp8_te: {e}; skipped")
        return {}
    from bench.common import result

    batches = synthetic_batches(STEPS, torch.device("cuda"))
    bf16 = train(None, batches)
    print(f"bf16: {bf16}", flush=True)
    fp8 = train(recipe, batches)
    print(f"fp8 ({recipe}): {fp8}", flush=True)
    gap = abs(fp8["final_loss"] - bf16["final_loss"]) / bf16["final_loss"]
    out = result(
        "fp8_te", ours=fp8["step_s"], peer=bf16["step_s"], unit="s/step", goal=f">= {GOAL}x faster than bf16",
        repeats=STEPS - WARMUP, higher_is_better=False, recipe=recipe, shape=SHAPE, batch=BATCH, seq_len=SEQ,
        fp8=fp8, bf16=bf16, rel_loss_gap=gap, loss_gap_ok=gap <= LOSS_GAP,
        peak_memory_ratio=fp8["peak_gib"] / bf16["peak_gib"],
    )
    print(f"fp8_te: {out['ratio']:.2f}x bf16 speed, loss gap {gap:.4f} (limit {LOSS_GAP}), peak memory "
          f"{fp8['peak_gib']:.1f} vs {bf16['peak_gib']:.1f} GiB")
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = run()
    sys.exit(0 if res and res["loss_gap_ok"] else 1)

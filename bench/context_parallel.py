"""Context parallelism on this machine: step time and activation memory of cp=2 against cp=1, same sequence.

One sample of SEQ tokens through a small model (8 heads, MoE, MTP), forward and backward, fp32, one thread per
process: `cp=2` splits it over 2 gloo processes (Ulysses attention, parallel/context_parallel.py), `cp=1` runs it
whole in one process. Rounds alternate the two so machine noise hits both alike; each round's figure is the
median of STEPS steps. Memory, per token a rank holds: `kept_bytes_per_token_held`, the tensors autograd keeps
for the backward and what selective checkpoints cache (model/activation_memory.py, parameters left out; a
resident-set peak mostly measures the allocator's reuse of the previous step's memory), each keeping everything,
with the report's selective recompute
(`model.selective_recompute`: norms, MLA projections and RoPE redone in backward) and with whole-block
activation checkpointing (`model.activation_checkpointing`: each block keeps its input only).
`selective_recompute_step_cost`: the cp=1 step time with selective recompute over the one without.

`ours` = cp=2 step time, `peer` = cp=1 step time; `ratio` = cp=1 / cp=2 (2.0 would be perfect scaling; the
all-to-alls and the duplicated per-sample work take the rest). On 2 cores each cp rank has a core of its own.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.common import result
from parallel.spawn import run_ranks

SEQ, STEPS = 2048, 3
MODEL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=512,
             num_attention_heads=8, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=128, num_experts_per_tok=2,
             n_group=2, topk_group=1, num_nextn_predict_layers=1, max_position_embeddings=SEQ, name="bench-cp")


def _worker(rank: int, world: int, recompute: str) -> dict[str, Any]:
    import torch.distributed as dist

    from model.activation_memory import kept_for_backward
    from model.config import ModelConfig
    from model.sequence_shard import SequenceShard, shard_sequences
    from model.transformer import DeepseekV3
    from parallel.context_parallel import UlyssesExchange

    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**MODEL, activation_checkpointing=recompute == "full",
                                   selective_recompute=recompute == "selective")).train()
    if world > 1:
        shard_sequences(model, SequenceShard(rank, world, UlyssesExchange(dist.group.WORLD, world)))
    tokens = torch.randint(0, MODEL["vocab_size"], (1, SEQ + 2), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens).loss.backward()

    step()  # warm-up: allocator, kernels
    times = []
    for _ in range(STEPS):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    _, kept = kept_for_backward(lambda: model(tokens), model.parameters())
    return {"step_s": statistics.median(times), "kept_bytes": kept, "tokens": SEQ // world}


def run(repeats: int = 3) -> dict[str, Any]:
    rounds: dict[str, list[float]] = {"cp1": [], "cp2": [], "cp1_selective": []}
    for _ in range(repeats):
        rounds["cp1"].append(run_ranks(1, _worker, "none")[0]["step_s"])
        rounds["cp2"].append(max(r["step_s"] for r in run_ranks(2, _worker, "none")))
        rounds["cp1_selective"].append(run_ranks(1, _worker, "selective")[0]["step_s"])
    kept = {}
    for recompute, suffix in (("none", ""), ("selective", "_selective"), ("full", "_checkpointing")):
        for cp in (1, 2):
            reps = run_ranks(cp, _worker, recompute)
            kept[f"cp{cp}{suffix}"] = max(r["kept_bytes"] / r["tokens"] for r in reps)
    cp1, cp2 = statistics.median(rounds["cp1"]), statistics.median(rounds["cp2"])
    return result(
        "context_parallel", ours=cp2, peer=cp1, unit="s/step", higher_is_better=False, repeats=repeats,
        goal="cp=2 faster than cp=1 at the same sequence (ratio > 1; 2 is perfect scaling)",
        seq_len=SEQ, rounds=rounds, kept_bytes_per_token_held=kept,
        selective_recompute_step_cost=statistics.median(rounds["cp1_selective"]) / cp1,
        setup=f"one sample of {SEQ} tokens, {MODEL['num_hidden_layers']} layers + MTP, hidden {MODEL['hidden_size']},"
              f" {MODEL['num_attention_heads']} heads, fp32, 1 thread per process, gloo",
    )

"""activation_memory: bytes kept for the backward per token, BF16 vs the report's FP8 activation memory levers.

The `small` preset (conf/model/small.yaml) at sequence 1024, bf16 parameters, one sequence, no whole-block
activation checkpointing on any side. One training forward of each configuration, its saved tensors counted
once per storage (model.activation_memory.SavedTensorLedger: a saved-tensor hook keyed on the storage;
parameters left out, selective-checkpoint caches counted), by piece: the embedding, each decoder layer, the
head (final norm, MTP module, the head's input), and apart from all of them the vocabulary-wide tensors (the
cross-entropy's fp32 log-probabilities of the LM and MTP heads).

    baseline_bf16     BF16 as the trainer runs it by default: no recompute, no FP8
    bf16_selective    + the report's selective recompute (the RMSNorms and the MLA up-projections rerun in
                      backward; model.selective_recompute)
    fp8               + FP8 GEMMs (emulated backend, blockwise recipe) with FP8 activation caching: every FP8
                      linear keeps its weight-gradient GEMM's E4M3 input (1 byte a value and a scale per 128
                      tokens) and SwiGLU inputs are kept in E4M3 1x128 tiles (precision.fp8.swiglu_inputs_fp8)
    fp8_no_recompute  FP8 caching alone, without the selective recompute (what FP8 saves by itself)
    fp8_bf16_swiglu   fp8 with SwiGLU inputs kept in BF16 (the gradient check of the lossy E4M3 SwiGLU cache)
    fp8_chunked_head  fp8 + the heads' loss over token chunks without logits (model.chunked_head_loss)

The emulated backend keeps the E4M3 values and scales the torch backend (real FP8 GEMMs) keeps, without its
padding: the torch backend pads each operand to its GEMM's multiple (16; 128 for blockwise, per expert), up
to 127 rows more per expert. At ~128 tokens per expert (this size) that can nearly double the routed
experts' kept operands there; at thousands of tokens per expert (GPU batches) it is a few percent.
`fp8_over_baseline_bf16` = fp8's decoder-layer bytes per token / baseline_bf16's (goal <= 0.6).
Every configuration also runs its backward once: the relative difference of all its gradients to the BF16
baseline's (FP8 GEMMs' own error), and `swiglu_fp8_grad_rel_diff`, fp8 vs fp8_bf16_swiglu (what the lossy
E4M3 SwiGLU cache adds; the linear layers' cached E4M3 operands are exact, tested in tests/fp8).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import result

PRESET = Path(__file__).resolve().parent.parent / "conf" / "model" / "small.yaml"
SEQ = 1024
CONFIGS = {  # name -> (selective_recompute, fp8, SwiGLU inputs in E4M3, chunked head loss)
    "baseline_bf16": (False, False, False, False),
    "bf16_selective": (True, False, False, False),
    "fp8": (True, True, True, False),
    "fp8_no_recompute": (False, True, True, False),
    "fp8_bf16_swiglu": (True, True, False, False),
    "fp8_chunked_head": (True, True, True, True),
}


def _build(selective: bool, fp8: bool, swiglu_fp8: bool, chunked_head: bool) -> torch.nn.Module:
    from model.config import ModelConfig
    from model.fp8.emulated import EmulatedFP8Backend
    from model.fp8.factory import apply_fp8
    from model.transformer import DeepseekV3

    cfg = dataclasses.replace(ModelConfig.from_yaml(PRESET), selective_recompute=selective,
                              chunked_head_loss=chunked_head)
    torch.manual_seed(0)  # the same weights in every configuration
    model = DeepseekV3(cfg).to(torch.bfloat16).train()
    model.restore_router_precision()
    if fp8:
        apply_fp8(model, EmulatedFP8Backend("blockwise", fp8_swiglu_inputs=swiglu_fp8))
    return model


def _measure(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    """Bytes per token by piece for one forward, then its backward: (counts, loss, gradients)."""
    from model.activation_memory import SavedTensorLedger
    from model.transformer import MicroBatch

    cfg = model.cfg
    vocab = cfg.vocab_size
    ledger = SavedTensorLedger(model.parameters(),
                               classify=lambda t: "logits_loss" if t.dim() and t.shape[-1] == vocab else None)
    mb = MicroBatch(tokens=tokens, seq_len=SEQ)
    start = time.perf_counter()
    with ledger.recording():
        x = None
        for i, piece in enumerate(model.pieces()):
            name = "embedding" if i == 0 else "head" if i == len(model.pieces()) - 1 else f"layer{i - 1}"
            with ledger.section(name):
                x = piece(x, mb)
    loss = x + mb.balance_loss if mb.balance_losses else x
    forward_s = time.perf_counter() - start
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    per_token = {k: v / SEQ for k, v in ledger.bytes.items()}
    layers = {k: v for k, v in per_token.items() if k.startswith("layer")}
    moe = [f"layer{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    dense = [f"layer{i}" for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    counts = {
        "decoder_layers": sum(layers.values()),
        "moe_layer": per_token[moe[0]],
        "dense_layer": per_token[dense[0]] if dense else None,
        "head_and_mtp": per_token.get("head", 0.0),
        "logits_loss": per_token.get("logits_loss", 0.0),
        "embedding": per_token.get("embedding", 0.0),
        "checkpoint_caches": ledger.checkpoint_caches / SEQ,
        "total": ledger.total / SEQ,
    }
    return {"bytes_per_token": counts, "loss": float(loss), "grads": grads, "forward_s": forward_s}


def run(repeats: int = 1) -> dict[str, Any]:
    from model.config import ModelConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ModelConfig.from_yaml(PRESET)
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ + 1 + cfg.num_nextn_predict_layers),
                           generator=torch.Generator().manual_seed(1))
    runs: dict[str, dict[str, Any]] = {}
    for name, flags in CONFIGS.items():
        runs[name] = _measure(_build(*flags), tokens)
    base = runs["baseline_bf16"]
    out: dict[str, Any] = {}
    for name, r in runs.items():
        grad_diff = float((r["grads"] - base["grads"]).norm() / base["grads"].norm())
        out[name] = {"bytes_per_token": {k: (round(v, 1) if v is not None else None)
                                         for k, v in r["bytes_per_token"].items()},
                     "loss": r["loss"], "grad_rel_diff_vs_baseline": grad_diff}

    def ratio(name: str, key: str) -> float:
        return runs[name]["bytes_per_token"][key] / base["bytes_per_token"][key]

    ours = runs["fp8"]["bytes_per_token"]["decoder_layers"]
    peer = base["bytes_per_token"]["decoder_layers"]
    return result(
        "activation_memory",
        ours,
        peer,
        "bytes kept for backward per token, decoder layers (fp8 vs baseline_bf16)",
        "fp8_over_baseline_bf16 <= 0.6",
        1,
        higher_is_better=False,
        fp8_over_baseline_bf16=ratio("fp8", "decoder_layers"),
        fp8_over_baseline_bf16_moe_layer=ratio("fp8", "moe_layer"),
        fp8_over_baseline_bf16_whole_model=ratio("fp8", "total"),
        bf16_selective_over_baseline_bf16=ratio("bf16_selective", "decoder_layers"),
        fp8_over_bf16_selective=runs["fp8"]["bytes_per_token"]["decoder_layers"]
        / runs["bf16_selective"]["bytes_per_token"]["decoder_layers"],
        fp8_no_recompute_over_baseline_bf16=ratio("fp8_no_recompute", "decoder_layers"),
        fp8_chunked_head_over_baseline_bf16_whole_model=ratio("fp8_chunked_head", "total"),
        # what keeping SwiGLU inputs in E4M3 does to the gradients, next to what FP8 GEMMs do (vs BF16)
        swiglu_fp8_grad_rel_diff=float((runs["fp8"]["grads"] - runs["fp8_bf16_swiglu"]["grads"]).norm()
                                       / runs["fp8_bf16_swiglu"]["grads"].norm()),
        configs=out,
        shapes={"preset": "small", "seq": SEQ, "batch": 1, "dtype": "bf16", "fp8_backend": "emulated blockwise",
                "activation_checkpointing": False},
        note="counts are deterministic (repeats do not apply); saved tensors counted once per storage, "
             "parameters excluded; logits_loss = vocabulary-wide tensors of the LM and MTP heads, reported apart "
             "from decoder_layers and head_and_mtp; total = everything",
    )

"""fp8_emulated: final training loss of each emulated FP8 recipe relative to fp32, on CPU.

The tiny model (conf/model/tiny.yaml with two decoder layers, one dense and one MoE, plus its MTP block, and
the vocabulary fitted to the data) trains for STEPS steps on python_stdlib data, once in fp32 and once per
recipe with every GEMM of attention, dense MLPs and experts quantized as the recipe would (model/fp8/),
from the same initial weights on the same batches. The gap is |loss_fp8 - loss_fp32| / loss_fp32 of the
final training LM loss, each averaged over the last TAIL steps (the batches are the same in both runs, so
the average only removes step-to-step noise). The DeepSeek-V3 report's bar for its blockwise recipe is
0.25% against BF16.

Result JSON: the usual fields (ours = blockwise gap, peer = the 0.25% bar, ratio = bar / gap: above 1 is
within it) plus one entry per recipe, e.g. `"blockwise": {"rel_gap": 0.0012, "final_loss": 3.41}`, and the noise
floor: `fp32_seed_spread` (two fp32 runs from different initial weights) and `blockwise_rel_gap_seed_1` (the
blockwise gap from the second seed).
Data: $FP8_BENCH_DATA (a prepared data_prep directory), else the 20 stdlib modules of the tests prepared into a
temporary directory (512-token BPE, a few seconds). Threads: BENCH_THREADS (default 2).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import result
from model.config import ModelConfig
from model.fp8.emulated import EmulatedFP8Backend
from model.fp8.factory import apply_fp8
from model.fp8.numerics import RECIPES
from model.transformer import DeepseekV3

ROOT = Path(__file__).resolve().parents[1]
STEPS, TAIL = 300, 20
SEQ_LEN, MICRO_BATCH = 64, 8
# lr 5e-4: at the trainer's 3e-3 this model's trajectory is chaotic (two fp32 seeds end 17% apart, any
# perturbation moves the loss by 1-2%), which would hide FP8's effect. At 1e-3 fp32 seeds end within 0.2%, but
# the FP8 run is more sensitive: changing attention's rounding by ~1e-6 (SDPA's flash kernel instead of its
# math kernel) moved its final loss by 0.4% (gaps 0.50% / 0.36% for seeds 0 / 1, FP8 lower both times). At
# 5e-4 the gaps are 0.09% / 0.14%.
LR, WARMUP = 5e-4, 20
LAYERS = 2
GOAL = 0.0025  # the report: under 0.25% relative to BF16
# the trainer tests' corpus: small stable stdlib modules
MODULES = ["abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py", "opcode.py",
           "queue.py", "sched.py", "shlex.py", "stat.py", "textwrap.py", "graphlib.py", "glob.py",
           "genericpath.py", "calendar.py", "copy.py", "csv.py", "enum.py"]


def prepare_stdlib(out: Path, vocab: int = 512) -> Path:
    """A data_prep directory from a few stdlib modules (about 200 KB of source)."""
    from data_prep.config import PrepConfig, TokenizerConfig
    from data_prep.corpus import stdlib_root
    from data_prep.pipeline import prepare

    corpus = out.parent / (out.name + "-corpus")
    corpus.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        shutil.copyfile(stdlib_root() / name, corpus / name)
    prepare(PrepConfig(corpus=str(corpus), out_dir=str(out), val_fraction=0.2, shard_tokens=16384, num_workers=0,
                       progress=False, tokenizer=TokenizerConfig(vocab_size=vocab)))
    return out


def tiny_model_config(vocab_size: int, **overrides: Any) -> ModelConfig:
    fields = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    return ModelConfig(**{**fields, "vocab_size": vocab_size, **overrides})


def train_losses(
    data_dir: Path | str,
    recipe: str | None,
    steps: int = STEPS,
    seq_len: int = SEQ_LEN,
    micro_batch: int = MICRO_BATCH,
    seed: int = 0,
    lr: float = LR,
    **model_overrides: Any,
) -> list[float]:
    """Training LM loss per step of the tiny model, fp32 (recipe None) or with emulated FP8 GEMMs. AdamW with
    the report's betas and weight decay, linear warmup, router bias update every step, one process."""
    from data_prep.reader import TokenStream

    stream = TokenStream([str(data_dir)], None, seq_len, 1, micro_batch, micro_batch, 0, 1, seed=1)
    cfg = tiny_model_config(stream.vocab_size, **{"num_hidden_layers": LAYERS, **model_overrides})
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).train()
    if recipe is not None:
        apply_fp8(model, EmulatedFP8Backend(recipe))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP)
        batch = next(stream)
        out = model(batch["tokens"], batch["loss_mask"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_biases()
        losses.append(float(out.lm_loss.detach()))
    return losses


def final_loss(losses: list[float], tail: int = TAIL) -> float:
    return sum(losses[-tail:]) / len(losses[-tail:])


def rel_gap(losses: list[float], reference: list[float], tail: int = TAIL) -> float:
    ref = final_loss(reference, tail)
    return abs(final_loss(losses, tail) - ref) / ref


def _data_dir(tmp: Path) -> Path:
    if os.environ.get("FP8_BENCH_DATA"):
        return Path(os.environ["FP8_BENCH_DATA"])
    return prepare_stdlib(tmp / "stdlib")  # the test's corpus, so the table and the test measure the same


def run(repeats: int = 1) -> dict[str, Any]:
    """One training run per recipe (training is deterministic on CPU: repeats would give the same numbers)."""
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = _data_dir(Path(tmp))
            start = time.perf_counter()
            reference = train_losses(data, None)
            table: dict[str, dict[str, float]] = {"fp32": {"final_loss": final_loss(reference)}}
            for recipe in RECIPES:
                losses = train_losses(data, recipe)
                table[recipe] = {"rel_gap": rel_gap(losses, reference), "final_loss": final_loss(losses)}
                print(f"{recipe}: {json.dumps(table[recipe])}", flush=True)
            # the noise floor: a second seed (other initial weights, same batches) for fp32 and blockwise
            reference_1 = train_losses(data, None, seed=1)
            seeds = {"fp32_seed_spread": rel_gap(reference_1, reference),
                     "blockwise_rel_gap_seed_1": rel_gap(train_losses(data, "blockwise", seed=1), reference_1)}
            print(json.dumps(seeds), flush=True)
            seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    gap = table["blockwise"]["rel_gap"]
    return result(
        "fp8_emulated", ours=gap, peer=GOAL, unit="relative final-loss gap vs fp32 (blockwise)",
        goal=f"blockwise rel_gap <= {GOAL} (DeepSeek-V3 report: 0.25% vs BF16)", repeats=1,
        higher_is_better=False, steps=STEPS, tail=TAIL, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, lr=LR, layers=LAYERS,
        data=str(data), seconds=seconds, **seeds, **table,
    )

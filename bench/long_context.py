"""long_context: passkey retrieval at L, then at 4L before and after a YaRN extension phase trained with cp=2.

The long-context recipe of docs/long_context.md, shrunk to this machine, through the real trainer:

1. base training at L = 64 tokens: the `tiny` model on 2 ranks (dp=2), `data.mode=pad`, the stdlib corpus
   blended 1:7 with passkey documents of 30-66 tokens (data_prep/passkey.py, a Megatron pair in a temp dir);
2. passkey accuracy of that checkpoint at L, and at 4L as it is (`passkey_before`) and with YaRN switched on
   untrained (`passkey_before_yarn`);
3. the extension phase: a new run from the base checkpoint (`train.init_from`) at 4L = 256 tokens with YaRN
   (factor 4 over the original 64), `parallel.cp=2` on the same 2 ranks, passkey documents of 64-258 tokens
   blended 1:7 with the corpus again, constant learning rate (the report's phases use one);
4. passkey accuracy at 4L after it (`passkey_after`).

Accuracy: the share of N_EVAL held-out documents (a seed no training set uses, needle depth uniform) whose key
the model's greedy next token after "... The pass key is" gets right; chance is 1 / number of keys (~1/30).
The model's `initializer_range` is 0.06, not the tiny preset's 0.006: DeepSeek-V3's value is sized for a
7168-wide model, and at width 128 the chained MLA projections make every attention score ~0 at init, so a
content lookup is not learned in a short run (measured in a single-process prototype: nothing by step 800 at
0.006; learned by step ~300 at 0.06).

`ours` = passkey_after, `peer` = passkey_before floored at chance (both at 4L), `ratio` = ours / peer.
Run: `python -m bench long_context` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
L, LONG = 64, 256
BASE_STEPS, EXT_STEPS = 800, 150
N_EVAL, EVAL_SEED = 256, 99
CORPUS = ROOT / "data" / "python_stdlib"
COMMON = [
    "model=tiny", "model.initializer_range=0.06", f"model.max_position_embeddings={LONG}",
    "parallel=dp", "data.mode=pad", "data.weights=[1,7]", "train.eval_batches=0",
    "train.global_batch_size=16", "train.micro_batch_size=8", "logging.wandb.mode=disabled",
    "logging.progress=false", "checkpoint.interval=0", "checkpoint.keep_last=1",
]


def _train(tmp: Path, name: str, overrides: list[str]) -> tuple[Path, float]:
    """Run the trainer on 2 CPU ranks; (its final checkpoint, seconds)."""
    from parallel.spawn import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
           *COMMON, f"name={name}", f"run_dir={tmp / name}", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    seconds = time.perf_counter() - start
    from trainer.checkpoint import find_latest

    ckpt = find_latest(tmp / name / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"{name}: the run left no checkpoint")
    return ckpt, seconds


def passkey_accuracy(model, fmt, length: int, count: int = N_EVAL, seed: int = EVAL_SEED) -> float:
    """Share of `count` documents of `length` tokens whose key is the model's greedy answer."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    docs = [fmt.document(rng, length) for _ in range(count)]
    hits = 0
    with torch.no_grad():
        for lo in range(0, count, 32):
            chunk = docs[lo : lo + 32]
            prompts = torch.tensor(np.stack([ids[:-2] for ids, _ in chunk]))  # up to "The pass key is"
            answers = model.logits(prompts)[:, -1].argmax(-1)
            hits += sum(int(a) == key for a, (_, key) in zip(answers.tolist(), chunk))
    return hits / count


def _with_yarn(model, factor: float):
    """The same weights under YaRN scaling (what the extension starts from)."""
    from model.config import ModelConfig
    from model.transformer import DeepseekV3

    cfg = ModelConfig.from_dict({**model.cfg.to_dict(), "rope_scaling_type": "yarn", "rope_factor": factor,
                                 "rope_original_max_position_embeddings": L})
    yarn = DeepseekV3(cfg)
    yarn.load_state_dict(model.state_dict())
    return yarn.eval()


def run(repeats: int = 1) -> dict:
    """One base run and one extension (each takes minutes; `repeats` is not used: the result is the run's)."""
    import torch

    from bench.common import result
    from bench.train_e2e import _ensure_data
    from data_prep.passkey import PasskeyFormat, write_passkey_corpus
    from trainer.export_hf import load_model

    _ensure_data()
    torch.set_num_threads(2)
    fmt = PasskeyFormat.from_prepared(CORPUS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base_docs = write_passkey_corpus(tmp / "passkey_base", fmt, 20000, fmt.overhead, L + 2, seed=1)
        long_docs = write_passkey_corpus(tmp / "passkey_long", fmt, 4000, L, LONG + 2, seed=2)
        base, base_s = _train(tmp, "base", [
            f"train.seq_len={L}", f"train.steps={BASE_STEPS}", "optim.lr=2e-3", "optim.min_lr=2e-4",
            f"data.dirs=[{CORPUS},{base_docs}]",
        ])
        model = load_model(base)
        at_l = passkey_accuracy(model, fmt, L)
        before = passkey_accuracy(model, fmt, LONG)
        before_yarn = passkey_accuracy(_with_yarn(model, LONG / L), fmt, LONG)
        ext, ext_s = _train(tmp, "extend", [
            f"train.init_from={base}", f"train.seq_len={LONG}", f"train.steps={EXT_STEPS}", "parallel.cp=2",
            "model.rope_scaling_type=yarn", f"model.rope_factor={LONG / L}",
            f"model.rope_original_max_position_embeddings={L}", "optim.schedule=constant", "optim.lr=1e-3",
            "optim.warmup_steps=0", f"data.dirs=[{CORPUS},{long_docs}]",
        ])
        after = passkey_accuracy(load_model(ext), fmt, LONG)
    chance = 1.0 / len(fmt.keys)
    res = result(
        "long_context", ours=after, peer=max(before, chance),
        unit="passkey accuracy at 4L (after vs before extension)", goal="passkey_after > passkey_before", repeats=1,
        passkey_at_L=at_l, passkey_before=before, passkey_before_yarn=before_yarn, passkey_after=after, cp=2,
        L=L, long=LONG, chance=chance, eval_documents=N_EVAL, base_steps=BASE_STEPS, extension_steps=EXT_STEPS,
        base_seconds=base_s, extension_seconds=ext_s,
        setup="tiny model (initializer_range 0.06), dp=2 base at L then YaRN x4 with cp=2 at 4L, data.mode=pad, "
              "stdlib corpus : passkey documents = 1 : 7, fp32, 2 CPU ranks",
    )
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    return res


if __name__ == "__main__":
    run()

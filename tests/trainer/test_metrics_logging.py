"""Metrics (FLOPs, MFU, peak table, MaxVio, throughput) and the rank-0 RunLogger (JSONL, wandb, plots)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import ModelConfig
from model.info import (
    activated_params_breakdown,
    activated_params_per_token,
    attention_flops_per_token,
    training_flops_per_token,
)
from trainer.report.metrics import (
    PEAK_FLOPS,
    Throughput,
    expert_load_stats,
    gpu_key,
    max_violation,
    mfu,
    peak_flops,
)
from trainer.report.run_logger import RunLogger, redact_secrets

ROOT = Path(__file__).resolve().parents[2]


def _hand_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=32, hidden_size=8, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=16,
        num_attention_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2,
        v_head_dim=4, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=2, num_experts_per_tok=2,
        n_group=1, topk_group=1, num_nextn_predict_layers=1, max_position_embeddings=64,
    )
    base.update(overrides)
    return ModelConfig(**base)


# ---- FLOPs ----------------------------------------------------------------------------------------------


def test_flops_per_token_hand_computed():
    cfg = _hand_config()
    # qk_head_dim = 4 + 2 = 6. Attention matmul params of one layer:
    #   q_a 8*4 = 32, q_b 4*(2 heads*6) = 48, kv_a 8*(4+2) = 48, kv_b 4*2*(4+4) = 64, o 2*4*8 = 64  -> 256
    # layer 0 dense SwiGLU: 3*8*16 = 384
    # layers 1, 2 MoE: router 8*4 = 32, shared 1*3*8*2 = 48, routed top-2: 2*48 = 96            -> 176 each
    # head 8*32 = 256 (embedding lookup: not counted)
    # main model: 3*256 + 384 + 2*176 + 256 = 1760
    # MTP module (layer 3, MoE): eh_proj 2*8*8 = 128 + 256 + 176 + head again 256              -> 816
    # N = 1760 + 816 = 2576 -> 6N = 15456
    # attention scores, seq 10: fwd per layer 2*2*(6+4)*10/2 = 200, x3 fwd+bwd = 600, 4 layers -> 2400
    assert activated_params_per_token(cfg, include_mtp=False) == 1760
    assert activated_params_per_token(cfg) == 2576
    assert attention_flops_per_token(cfg, 10) == 2400
    assert training_flops_per_token(cfg, 10) == 15456 + 2400

    # plain q projection, no MTP: q 8*12 = 96 -> attention 96+48+64+64 = 272 per layer
    # N = 3*272 + 384 + 2*176 + 256 = 1808; 6N = 10848; attention 3 layers * 600 = 1800
    plain = _hand_config(q_lora_rank=None, num_nextn_predict_layers=0)
    assert training_flops_per_token(plain, 10) == 10848 + 1800


def test_dsv3_671b_activated_params_and_flops():
    cfg = ModelConfig.from_yaml(ROOT / "conf/model/dsv3_671b.yaml")
    parts = activated_params_breakdown(cfg)
    main = activated_params_per_token(cfg, include_mtp=False)
    # The report's "37B activated": 36.62B in matmuls + 0.93B embedding table = 37.55B.
    assert 36.0e9 < main < 38.0e9
    assert main == 36_624_596_992
    assert 37.0e9 < main + cfg.vocab_size * cfg.hidden_size < 38.0e9
    assert parts["mtp"] == 1_614_741_504  # eh_proj + one MoE block + the shared head again
    n = activated_params_per_token(cfg)
    assert n == 38_239_338_496
    # seq 4096: 6 x 38.24B = 229.4 GFLOP + attention 3*62*128*(192+128)*4096 = 31.2 GFLOP -> 260.6 GFLOP/token
    attn = 3 * 62 * 128 * (192 + 128) * 4096
    assert attention_flops_per_token(cfg, 4096) == attn == 31_205_621_760
    flops = training_flops_per_token(cfg, 4096)
    assert flops == 6 * n + attn
    assert flops == pytest.approx(260.64e9, rel=1e-4)


# ---- peak table and MFU ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100_sxm"),
        ("NVIDIA H100 PCIe", "h100_pcie"),
        ("NVIDIA H100 NVL", "h100_nvl"),
        ("NVIDIA H800", "h800"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200_nvl"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA H20", "h20"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA A800-SXM4-80GB", "a800"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA B200", "b200"),
        ("NVIDIA GB200", "gb200"),
        ("AMD Instinct MI300X", "mi300x"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("h100_sxm", "h100_sxm"),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce RTX 4090 D", None),
        ("Some Future Accelerator", None),
        ("cpu", None),
        (None, None),
    ],
)
def test_gpu_name_matching(name, key):
    assert gpu_key(name) == key


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.5e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "torch.bfloat16", None) == 989.5e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8", None) == 1979e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp8", None) is None  # no FP8 on Ampere
    assert peak_flops("Unknown Accelerator 9000", "bf16", None) is None
    assert peak_flops(None, "bf16", None) is None  # CPU
    assert peak_flops(None, "bf16", 1.5e12) == 1.5e12  # override wins, even on CPU
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", 5e14) == 5e14
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H100 80GB HBM3", "int4", None)
    # every entry: dense numbers, ordered fp8 >= bf16 >= fp32
    for key, row in PEAK_FLOPS.items():
        assert row["fp32"] <= row.get("bf16", row["fp16"]) <= row.get("fp8", math.inf), key


def test_mfu():
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(8000.0, 6e9, 1e13, num_devices=8) == pytest.approx(0.6)
    assert mfu(1000.0, 6e9, None) is None


# ---- expert load, throughput, memory ----------------------------------------------------------------


def test_max_violation():
    assert max_violation(np.array([1, 1, 1, 1])) == 0.0
    assert max_violation(torch.tensor([4, 0, 0, 0])) == pytest.approx(3.0)  # max 4 / mean 1 - 1
    assert max_violation([3, 1, 2, 2]) == pytest.approx(0.5)  # 3 / 2 - 1
    assert max_violation(np.zeros(8)) == 0.0
    stats = expert_load_stats({3: torch.tensor([4, 0, 0, 0]), 1: np.array([3, 1, 2, 2])})
    assert stats == {"maxvio/layer_1": pytest.approx(0.5), "maxvio/layer_3": pytest.approx(3.0),
                     "maxvio/mean": pytest.approx(1.75)}
    assert expert_load_stats({}) == {}


def test_throughput_window():
    t = Throughput(window=2)
    assert t.tokens_per_s == 0.0
    t.update(1000, 10.0)  # slow warm-up step, ages out of the window
    t.update(1000, 1.0)
    t.update(3000, 1.0)
    assert t.tokens_per_s == pytest.approx(2000.0)
    assert t.total_tokens == 5000


PEAK_PROBE = """
import json, torch
from trainer.report.metrics import peak_memory_bytes
torch.ones(1024).sum()  # torch's first op (thread pool, allocator) before the baseline
before = peak_memory_bytes()
buffer = torch.ones({n} // 4)  # every page written: all of it resident
print(json.dumps({{"before": before, "after": peak_memory_bytes()}}))
"""
# On Linux a process's ru_maxrss starts at the high-water mark of the memory image its exec replaced, and
# subprocess uses vfork: a direct child of pytest would start at pytest's own peak. A small intermediate
# interpreter (-S: no site imports) starts the probe, so the probe's baseline is its own.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def test_peak_memory_bytes_sees_a_touched_buffer():
    """A fresh process allocates and writes 200 MiB: the reported peak rises by that much, within 8 MiB.

    On CPU the peak is ru_maxrss, a high-water mark. It can rise by less than the buffer only by the gap between
    the process's earlier peak and its resident set just before the allocation (memory the imports touched and
    released: under 1 MiB in a fresh process) plus KiB rounding, and by more only by what torch allocates
    besides the buffer (a few pages). 8 MiB covers both with room; a function that reported the virtual size,
    another process's peak or a constant would miss the window."""
    n = 200 * 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-S", "-c", LAUNCHER, sys.executable, "-c", PEAK_PROBE.format(n=n)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["before"] > 10 * 2**20  # the process holds torch: well over 10 MiB resident
    assert n - 8 * 2**20 <= peak["after"] - peak["before"] <= n + 8 * 2**20, peak


# ---- RunLogger ----------------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def _train(logger: RunLogger, steps: range, eval_every: int = 3) -> None:
    for s in steps:
        loss = 5.0 / s + 2.0
        logger.log(s, {"loss": loss + 0.3, "lm_loss": loss, "mtp_loss": loss + 0.5, "lr": 1e-3,
                       "tokens_per_s": torch.tensor(1234.5), "mfu": np.float32(0.25)})
        logger.progress(s, {"loss": loss, "tok/s": 1234.5})
        if s % eval_every == 0:
            logger.log(s, {"lm_loss": loss + 0.1}, kind="eval")


CONFIG = {
    "run_marker": "marker-5d1e",
    "optim": {"lr": 1e-3},
    "wandb": {"project": "p", "api_key": "SECRETVALUE-1", "entity": None},
    "hub": [{"HF_TOKEN": "SECRETVALUE-2", "repo": "r"}],
    "db": {"Password": "SECRETVALUE-3", "client_secret": "SECRETVALUE-4"},
}


def test_redact_secrets():
    assert redact_secrets(CONFIG) == {
        "run_marker": "marker-5d1e", "optim": {"lr": 1e-3}, "wandb": {"project": "p", "entity": None},
        "hub": [{"repo": "r"}], "db": {},
    }


def test_run_logger_offline_wandb_jsonl_plots_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    logger = RunLogger(run_dir, CONFIG, rank=0, wandb_mode="offline", run_name="t", total_steps=12)
    first_id = logger.wandb_run_id
    assert first_id
    _train(logger, range(1, 11))  # the "crashed" run got to step 10; its checkpoint is at step 6
    logger.finish(None)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    for r in train_rows:
        assert set(r) == {"step", "time", "kind", "train/loss", "train/lm_loss", "train/mtp_loss", "train/lr",
                          "train/tokens_per_s", "train/mfu"}
        assert r["train/tokens_per_s"] == 1234.5 and r["train/mfu"] == pytest.approx(0.25)
    assert [(r["step"], set(r) - {"time"}) for r in rows if r["kind"] == "eval"] == [
        (3, {"step", "kind", "eval/lm_loss"}), (6, {"step", "kind", "eval/lm_loss"}),
        (9, {"step", "kind", "eval/lm_loss"})]

    # wandb offline run: the config went in without any secret
    wandb_files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    run_files = list((run_dir / "wandb").glob(f"offline-run-*-{first_id}/run-{first_id}.wandb"))
    assert len(run_files) == 1
    assert b"marker-5d1e" in run_files[0].read_bytes()
    for p in wandb_files:
        data = p.read_bytes()
        assert b"api_key" not in data and b"HF_TOKEN" not in data and b"SECRETVALUE" not in data, p

    # resume from the step-6 checkpoint: the same wandb run, rows 7..10 of the crashed run replaced
    logger = RunLogger(run_dir, CONFIG, rank=0, wandb_mode="offline", run_name="t", resume_id=first_id,
                       total_steps=12)
    assert logger.wandb_run_id == first_id
    _train(logger, range(7, 13))
    counts = {layer: torch.randint(0, 100, (16,)) for layer in range(1, 5)}
    counts[2][3] = 400  # one hot expert, so the heatmap has something to show
    logger.finish(counts)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["kind"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per (step, kind)
    assert [s for s, k in keys if k == "train"] == list(range(1, 13))
    assert [s for s, k in keys if k == "eval"] == [3, 6, 9, 12]
    _assert_png(run_dir / "loss_curve.png")
    _assert_png(run_dir / "expert_load.png")
    media = list((run_dir / "wandb").rglob("media/images/**/*.png"))
    assert any("loss_curve" in p.name for p in media) and any("expert_load" in p.name for p in media)


def test_resume_truncation_without_wandb(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "time": 0.0, "kind": "train", "train/loss": 1.0}) for s in range(1, 9)]
    path.write_text("\n".join(lines) + '\n{"step": 9, "ti')  # torn last line from a crash
    # explicit resume_step: cut at construction
    logger = RunLogger(tmp_path, {}, rank=0, wandb_mode="disabled", resume_step=6, show_progress=False)
    assert logger.wandb_run_id is None
    assert [r["step"] for r in logger.rows] == [1, 2, 3, 4, 5]
    logger.log(6, {"loss": float("nan")})
    logger.finish()
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # strict JSON: NaN became null
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["train/loss"] is None
    # implicit: the first log call's step is the cut
    logger = RunLogger(tmp_path, {}, rank=0, wandb_mode="disabled", show_progress=False)
    logger.log(3, {"loss": 0.5})
    logger.log(4, {"loss": 0.4})
    logger.finish()
    assert [r["step"] for r in logger.rows] == [1, 2, 3, 4]
    assert (tmp_path / "loss_curve.png").is_file() and not (tmp_path / "expert_load.png").exists()


def test_nonzero_rank_writes_nothing(tmp_path):
    import wandb

    run_dir = tmp_path / "rank1"
    logger = RunLogger(run_dir, CONFIG, rank=1, wandb_mode="offline", total_steps=10)
    _train(logger, range(1, 4))
    logger.write("hello")
    logger.finish({1: np.ones(4)})
    assert logger.wandb_run_id is None and wandb.run is None
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []

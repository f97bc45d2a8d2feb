"""The capacity planner against hand-computed cases, and the DeepSeek-V3 setup against the report."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.info import training_flops_per_token
from tests.cluster.conftest import ROOT
from trainer.cluster import plan as P

IDEAL = [  # every kernel at its peak, no communication, no losses: what is left is arithmetic
    "efficiency.gemm=1", "efficiency.bf16_gemm=1", "efficiency.attention=1", "efficiency.comm_sms=0",
    "efficiency.elementwise_bytes=0", "efficiency.expert_imbalance=1", "efficiency.goodput=1", "efficiency.hbm=1",
    "efficiency.reserve_gib=0", "precision.gemm=bf16",
]


def _tiny(*extra: str) -> P.Plan:
    cfg = P.parse_args(["model=tiny", "gpus=2", "gpus_per_node=2", "gpu=h100", "parallel.pp=2", "parallel.ep=1",
                        "train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2", *IDEAL, *extra])
    return P.plan(cfg)


def _model_params(name: str) -> int:
    from model.transformer import DeepseekV3

    with torch.device("meta"):
        return sum(p.numel() for p in DeepseekV3(P.load_model_config(name)).parameters())


def test_memory_by_hand_dualpipe_pp2():
    # DualPipe at pp=2: each rank holds both stages, i.e. every parameter (Table 2: 2x parameters); dp=1, so
    # ZeRO-1 shards nothing: weights 2 B, gradients 4 B, master 4 B + two BF16 moments 2 B each = 8 B
    pl = _tiny()
    n = _model_params("tiny")
    assert pl.memory["weights"] == 2 * n and pl.memory["gradients"] == 4 * n and pl.memory["optimizer"] == 8 * n
    assert pl.pipeline["peak_activations"] == 3  # pp + 1


def test_step_time_by_hand_dualpipe_pp2():
    # 4 microbatches; each rank runs all of them through one of its two stages (half the model on average), so
    # its busy time is 4 x (model training FLOPs per microbatch) / 2 / peak, and DualPipe's bubble at pp=2 is
    # (pp/2 - 1)(...) = 0. FLOPs: 6N + attention (trainer.report.metrics) + the recomputed MLA up-projections.
    pl = _tiny()
    cfg = P.load_model_config("tiny")
    up = cfg.q_lora_rank * cfg.num_attention_heads * cfg.qk_head_dim + \
        cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_token = training_flops_per_token(cfg, 128) + 2 * up * layers
    peak = P.GPUS["h100"].bf16_tflops * 1e12
    assert pl.microbatches == 4 and pl.pipeline["bubble"] == pytest.approx(0, abs=1e-12)
    assert pl.step["pipeline"] == pytest.approx(4 * 2 * 128 * per_token / 2 / peak, rel=1e-9)
    assert pl.step["grad_sync"] == 0  # dp = 1: nothing to reduce
    # the optimizer update reads and writes master, moments, gradient and weight (4 + 2x2 + 4 + 2 B) per param
    n = _model_params("tiny")
    assert pl.step["optimizer"] == pytest.approx(n * 2 * 14 / (P.GPUS["h100"].hbm_tbps * 1e12), rel=1e-9)
    tokens_per_s = 8 * 128 / pl.step["total"]
    assert pl.tokens_per_s == pytest.approx(tokens_per_s)
    assert pl.gpu_hours_per_trillion == pytest.approx(2 * 1e12 / tokens_per_s / 3600)


def test_zero1_shards_optimizer_state_over_dp_and_expert_dp():
    # pp=2, 8 GPUs -> dp=4, ep=2 -> expert-data-parallel 2: dense states / 4, expert states / 2; experts / ep
    pl = _tiny("gpus=8", "gpus_per_node=8", "parallel.ep=2", "train.global_batch_size=32")
    dense, experts = pl.params["rank_dense"], pl.params["rank_experts"]
    assert pl.memory["optimizer"] == pytest.approx((dense / 4 + experts / 2) * 8)
    assert pl.memory["weights"] == pytest.approx((dense + experts) * 2)
    tiny = P.inventory(P.load_model_config("tiny"))
    assert experts == pytest.approx(sum(u.experts for u in tiny.values()) / 2)  # both stages held, ep=2


def test_all_to_all_volume_by_hand():
    # ep=8 over 2 nodes of 4 GPUs: a token reaches min(topk_group, 2) nodes, its own with probability 1/2, so
    # topk_group / 2 remote nodes over IB; over NVLink, top-k copies, 3 in 4 on another GPU of the node;
    # forward + backward, each an FP8 dispatch (+ fp32 scales per 128) and a BF16 combine
    cfg = P.load_model_config("tiny")
    pl = _tiny("gpus=16", "gpus_per_node=4", "parallel.ep=8", "train.global_batch_size=64")
    remote = min(cfg.topk_group, 2) * (1 - 1 / 2)
    per_copy = cfg.hidden_size * (1 + 4 / 128 + 2)
    assert pl.a2a["remote_nodes"] == pytest.approx(remote)
    assert pl.a2a["ib_per_token_layer"] == pytest.approx(2 * remote * per_copy)
    assert pl.a2a["nvlink_per_token_layer"] == pytest.approx(2 * cfg.num_experts_per_tok * 3 / 4 * per_copy)
    # and the DeepSeek-V3 figure of docs/cluster.md: 3.5 remote nodes x 7168 x 3.03 B x 2 = 152 KB
    assert 2 * 3.5 * 7168 * (1 + 4 / 128 + 2) == pytest.approx(152_096)


def test_balanced_split_evens_out_pipeline_ranks():
    # 10 equal layers, 4 stages, the last stage also holds work worth 2 layers, DualPipe pairs (0,3), (1,2)
    layers = P.balanced_stage_layers([1.0] * 10, [0, 0, 0, 2.0], P.rank_stages("dualpipe", 4))
    sizes = [len(s) for s in layers]
    assert sum(sizes) == 10 and sizes[0] + sizes[3] + 2 == sizes[1] + sizes[2]
    assert [i for s in layers for i in s] == list(range(10))  # contiguous, in order
    assert P.stage_layers(61, 16)[0] == [0, 1, 2] and len(P.stage_layers(61, 16)[7]) == 4


def test_deepseek_v3_setup_within_25_percent_of_the_report():
    pl = P.plan(P.parse_args(["model=dsv3_671b", "parallel.pp=16", "parallel.ep=64", "gpus=2048", "gpu=h800"]))
    ratio = pl.gpu_hours_per_trillion / P.REPORT["gpu_hours_per_trillion"]
    assert 0.75 <= ratio <= 1.25, ratio
    assert sum(pl.memory.values()) <= 80 * P.GIB and not pl.notes  # it fits on an 80 GB H800
    assert pl.microbatches == 120 and pl.pipeline["peak_activations"] == 17  # 15360 / 128; PP + 1
    assert pl.params["total"] == pytest.approx(671.0e9, rel=1e-3)


def test_cli_prints_the_line_and_rejects_bad_keys():
    out = subprocess.run([sys.executable, "-m", "trainer.plan", "model=dsv3_671b", "parallel.pp=16", "parallel.ep=64",
                          "gpus=2048", "gpu=h800"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("GPU-hours per trillion tokens: "))
    assert 135_000 <= int(line.split(": ")[1].replace(",", "")) <= 225_000
    assert "planner / report" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "trainer.plan", "gpu=a100x"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: gpu: unknown GPU 'a100x'; choose one of h800, h100, " \
        "h200, b200"


def _v3(*extra: str) -> P.Plan:
    return P.plan(P.parse_args(["model=dsv3_671b", "gpus=2048", "gpu=h800", "parallel.pp=16", "parallel.ep=64",
                                *extra]))


def test_context_parallelism_and_recompute_in_the_plan():
    # 32K with cp=8: a GPU holds 4096 positions of each microbatch, as at 4K without cp, and ZeRO-1 spans the same
    # 128 GPUs of a stage, so the optimizer share is unchanged
    base = _v3("train.seq_len=4096", "train.global_batch_size=15360")
    long = _v3("train.seq_len=32768", "train.global_batch_size=1920", "parallel.cp=8")
    full = _v3("train.seq_len=32768", "train.global_batch_size=1920", "parallel.cp=8", "train.recompute=full")
    assert (long.dp, long.microbatches) == (16, base.microbatches)
    state = long.cfg.precision.master_bytes + 2 * long.cfg.precision.moment_bytes
    zero = long.dp * 8  # dp x cp
    assert long.memory["optimizer"] == pytest.approx(
        (long.params["rank_dense"] / zero + long.params["rank_experts"] / (zero // 64)) * state)
    # full recompute keeps a block's input only (2 h bytes per token instead of ~30 h) and pays a second forward
    assert full.memory["activations"] < long.memory["activations"] / 5
    assert full.costs["b_compute"] > long.costs["b_compute"]
    # attention grows with the sequence: the same tokens per step take longer at 32K
    assert long.step["total"] > base.step["total"]


@pytest.mark.parametrize("extra, key", [
    (["parallel.cp=3"], "gpus:"),
    (["parallel.cp=2", "train.seq_len=4095"], "parallel.cp:"),
    (["parallel.cp=256", "train.seq_len=65536", "train.global_batch_size=16", "parallel.pp=8", "parallel.ep=1"],
     "parallel.cp:"),  # 128 heads
    (["train.recompute=some"], "train.recompute:"),
])
def test_context_parallel_plan_mistakes_are_one_line(extra, key):
    from trainer.errors import UserError, user_error_line

    with pytest.raises(UserError) as info:
        _v3(*extra)
    assert user_error_line(info.value).startswith(key), user_error_line(info.value)

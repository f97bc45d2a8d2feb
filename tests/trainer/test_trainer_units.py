"""Single-process pieces of the trainer: argv, LR schedules, the DeepSpeed config, optimizer groups,
checkpoint discovery and RNG state, the config hash."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from trainer.checkpoint import (
    META_FILE,
    find_latest,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    tag_for,
)
from trainer.config import JobConfig, OptimConfig, config_hash, launch_id
from trainer.distributed import prepare_argv
from trainer.ds_config import build_ds_config
from trainer.lr_schedule import lr_multiplier, make_lr_lambda
from trainer.optim import param_groups
from trainer.validate import Layout


def test_prepare_argv_strips_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["trainer.train", "--local_rank=1", "train.steps=3"]
    assert prepare_argv(argv) == ["trainer.train", "train.steps=3"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert prepare_argv(["x", "--local_rank", "0", "-m", "a=1,2"]) == ["x", "-m", "a=1,2"]
    assert prepare_argv(["x", "b=2", "--multirun", "a=1,2", "--local_rank=0"]) == ["x", "--multirun", "b=2", "a=1,2"]


def test_lr_schedules():
    # warmup: step index 0..3 of 4 warmup steps -> 1/4 .. 4/4 of the peak
    assert [lr_multiplier(i, "constant", 4, 100, 0.1, 0.2) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(99, "constant", 4, 100, 0.1, 0.2) == 1.0
    # cosine from the peak at the end of warmup to min_lr at the last step
    assert lr_multiplier(4, "cosine", 4, 104, 0.1, 0.2) == pytest.approx(1.0)
    assert lr_multiplier(54, "cosine", 4, 104, 0.1, 0.2) == pytest.approx(0.55)
    assert lr_multiplier(104, "cosine", 4, 104, 0.1, 0.2) == pytest.approx(0.1)
    # warmup-stable-decay: flat until the last 20%, then cosine to min_lr
    assert lr_multiplier(79, "wsd", 4, 100, 0.1, 0.2) == 1.0
    assert lr_multiplier(90, "wsd", 4, 100, 0.1, 0.2) == pytest.approx(0.55)
    assert lr_multiplier(100, "wsd", 4, 100, 0.1, 0.2) == pytest.approx(0.1)
    fn = make_lr_lambda(OptimConfig(lr=1.0, min_lr=0.5, schedule="cosine", warmup_steps=0), total_steps=10)
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), fn)
    assert sched.state_dict()["lr_lambdas"] == [None]  # the schedule itself is not checkpointed


def _layout(dtype: str = "fp32", device: str = "cpu") -> Layout:
    return Layout(world_size=2, pp=1, dp=2, ep=1, micro_batch_size=2, grad_accum=3, global_batch_size=12,
                  dtype=dtype, device=device, data_vocab_size=512)


def test_ds_config_generated_from_the_job_config():
    cfg = JobConfig()
    cfg.optim.grad_clip = 0.5
    ds = build_ds_config(cfg, _layout())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        12, 2, 3)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 50_000_000}
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"] == {"enabled": False} and "data_types" not in ds
    gpu = build_ds_config(cfg, _layout("bf16", "cuda"))
    assert gpu["bf16"] == {"enabled": True} and gpu["data_types"] == {"grad_accum_dtype": "fp32"}
    assert gpu["optimizer"]["params"]["torch_adam"] is False
    # the pass-through section is merged last and deeply
    cfg.deepspeed = {"zero_optimization": {"reduce_bucket_size": 1234}, "comms_logger": {"enabled": True}}
    merged = build_ds_config(cfg, _layout())
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1234}
    assert merged["comms_logger"] == {"enabled": True}


def test_no_weight_decay_on_norms_biases_and_router_bias():
    from model.transformer import DeepseekV3

    model = DeepseekV3(tiny_config())
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert no_decay and all("norm" in n for n in no_decay)
    assert any("gate.weight" in n for n in decay) and any("experts" in n for n in decay)
    assert "embed.embed_tokens.weight" in decay
    assert not any("e_score_correction_bias" in n for n in names.values())  # a buffer, never optimized
    assert len(no_decay) + len(decay) == len(names)


def _fake_checkpoint(root, step: int, complete: bool = True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / META_FILE).write_text(json.dumps({"step": step}))
    return d


def test_find_latest_skips_torn_checkpoints(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    assert find_latest(ckpts) is None
    _fake_checkpoint(ckpts, 4)
    _fake_checkpoint(ckpts, 8)
    torn = _fake_checkpoint(ckpts, 12, complete=False)
    (ckpts / ".tmp-step00000016").mkdir()
    (ckpts / "latest").write_text("step00000008")
    assert find_latest(ckpts).name == "step00000008"
    (ckpts / "latest").write_text(torn.name)  # `latest` naming a torn checkpoint: fall back to the newest complete
    assert find_latest(ckpts).name == "step00000008"
    (ckpts / "latest").unlink()
    assert find_latest(ckpts).name == "step00000008"
    assert resolve_checkpoint(tmp_path / "run").name == "step00000008"
    assert resolve_checkpoint(ckpts / "step00000004").name == "step00000004"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nothing")


def test_rng_state_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_config_hash_ignores_logging_and_paths():
    from dataclasses import asdict

    base = asdict(JobConfig())
    moved = {**base, "run_dir": "elsewhere", "logging": {**base["logging"], "progress": False}}
    assert config_hash(moved) == config_hash(base)
    changed = {**base, "optim": {**base["optim"], "lr": 1.0}}
    assert config_hash(changed) != config_hash(base)


def test_launch_id_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("DSV3_LAUNCH_ID", "sweep-42")
    assert launch_id() == "sweep-42"

"""Config schema and cross-field validation: every rule gives one line naming the key, and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.trainer.conftest import MODEL, ROOT, TRAIN
from trainer.config import JobConfig, register_configs
from trainer.errors import UserError, user_error_line
from trainer.validate import validate


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def job(data: Path, *overrides: str) -> JobConfig:
    return OmegaConf.to_object(composed(*MODEL, *TRAIN, f"data.dirs=[{data}]", *overrides))


def check(data: Path, world_size: int, *overrides: str) -> str:
    """The one-line message of the first violated rule."""
    with pytest.raises(Exception) as info:
        validate(job(data, *overrides), world_size=world_size, device="cpu")
    line = user_error_line(info.value)
    assert line is not None, f"not a user error: {info.value!r}"
    assert "\n" not in line
    return line


def test_default_config_composes_and_validates(tiny_data):
    # the default job: DualPipe over its 2 ranks
    layout = validate(job(tiny_data), world_size=2, device="cpu")
    assert (layout.dp, layout.pp, layout.ep, layout.grad_accum, layout.dtype) == (1, 2, 1, 4, "fp32")
    assert layout.data_vocab_size == 512
    dp = validate(job(tiny_data, "parallel=dp"), world_size=2, device="cpu")
    assert (dp.dp, dp.pp, dp.grad_accum) == (2, 1, 2)
    assert validate(job(tiny_data, "parallel=dp", "train.grad_accum=4"), world_size=1, device="cpu").grad_accum == 4


@pytest.mark.parametrize(
    "world, overrides, key, words",
    [
        (4, ["parallel=dp", "parallel.dp=3"], "parallel.dp:", "pp x dp"),
        (3, ["parallel.pp=2"], "parallel.pp:", "not a multiple of pp=2"),
        (4, ["parallel=dp", "parallel.ep=3"], "parallel.ep:", "does not divide dp=4"),
        (1, ["parallel=dp", "train.global_batch_size=9"], "train.global_batch_size:", "micro_batch_size x dp"),
        (2, ["parallel=dp", "train.grad_accum=3"], "train.grad_accum:", "accumulation"),
        (8, ["parallel.schedule=dualpipe", "parallel.pp=4", "train.micro_batch_size=1",
             "train.global_batch_size=8"], "train.global_batch_size:", "DualPipe needs >= 2 x pp = 8"),
        (1, ["parallel=dp", "train.seq_len=65"], "train.seq_len:", "max_position_embeddings=64"),
        (1, ["parallel=dp", "model.vocab_size=300"], "model.vocab_size:", "tokenizer has 512 tokens"),
        (1, ["parallel=dp", "data.dirs=[/nonexistent/data]"], "data.dirs:", "does not exist"),
        (3, ["parallel.pp=3", "train.global_batch_size=12"], "parallel.pp:", "even pp"),
        (2, ["model.num_hidden_layers=3"], "parallel.pp:", "do not split"),
        (2, ["parallel=dualpipev", "model.num_hidden_layers=2"], "parallel.pp:", "do not split"),
        (2, ["parallel=dp", "parallel.pp=2"], "parallel.pp:", "needs a pipeline schedule"),
        (2, ["parallel=dp", "parallel.ep=2", "parallel.zero_stage=0"], "parallel.ep:", "needs the ZeRO-1 optimizer"),
        (4, ["parallel=1f1b", "parallel.ep=2", "train.global_batch_size=16"], "parallel.ep:",
         "every pipeline stage needs a MoE layer"),  # 2 layers: stage 0 holds the dense one alone
        (4, ["parallel=dp", "parallel.ep=4", "parallel.ep_ranks_per_node=1", "train.global_batch_size=16"],
         "parallel.ep_ranks_per_node:", "n_group=2 is not a multiple"),
        (1, ["parallel=dp", "optim.warmup_steps=1000"], "optim.warmup_steps:", "train.steps"),
        (1, ["parallel=dp", "optim.schedule=linear"], "optim.schedule:", "unknown schedule"),
        (1, ["parallel=dp", "precision.dtype=fp8"], "precision.dtype:", "unknown dtype"),
        (1, ["parallel=dp", "+deepspeed.scheduler={type: WarmupLR}"], "deepspeed.scheduler:", "optim.schedule"),
        (1, ["parallel=dp", "model.n_group=3"], "model.n_routed_experts:", "n_group=3"),
        (1, ["parallel=dp", "data.mode=pad", "data.document_mask=true"], "data.document_mask:", "data.mode=pad"),
        (1, ["parallel=dp", "data.restart_positions=true"], "data.restart_positions:", "document_mask=true"),
        (2, ["parallel=dp", "parallel.cp=2", "train.seq_len=31"], "parallel.cp:", "does not split into cp=2"),
        (4, ["parallel=dp", "parallel.cp=4"], "parallel.cp:", "num_attention_heads=2 do not split"),
        (4, ["parallel=1f1b", "parallel.cp=2"], "parallel.cp:", "not 1f1b"),
        (3, ["parallel=dp", "parallel.cp=2"], "parallel.cp:", "not a multiple of pp=1 x cp=2"),
        (2, ["parallel=dp", "parallel.cp=0"], "parallel.cp:", "must be >= 1"),
        (2, ["parallel.network.model=infiniband"], "parallel.network.model:", "unknown network model"),
        (2, ["parallel.network.clock=cpu"], "parallel.network.clock:", "unknown clock"),
        (2, ["parallel=dp", "parallel.ep=2", "parallel.ep_dispatch=two_hop"], "parallel.ep_dispatch:",
         "two_hop needs expert parallelism over nodes"),
        (2, ["parallel=dp", "parallel.ep_dispatch=three_hop"], "parallel.ep_dispatch:", "unknown dispatch"),
        (2, ["parallel.network.model=ib_nvlink", "parallel.network.inter_node_gbs=0"],
         "parallel.network.inter_node_gbs:", "must be positive"),
        (2, ["parallel.network.model=ib_nvlink", "parallel.network.latency_us=-1"], "parallel.network.latency_us:",
         "must be >= 0"),
        (2, ["parallel.network.model=ib_nvlink", "parallel.network.ranks_per_node=0"],
         "parallel.network.ranks_per_node:", "must be >= 1"),
    ],
)
def test_validation_rules(tiny_data, world, overrides, key, words):
    line = check(tiny_data, world, *overrides)
    assert line.startswith(key), line
    assert words in line, line
    assert ";" in line  # problem; fix


def test_pipeline_layouts_validate(tiny_data):
    layout = validate(job(tiny_data, "parallel.schedule=dualpipe", "parallel.pp=2", "train.micro_batch_size=1",
                          "train.global_batch_size=8"), world_size=4, device="cpu")
    assert (layout.pp, layout.dp, layout.grad_accum) == (2, 2, 4)
    v = validate(job(tiny_data, "parallel=dualpipev", "model.num_hidden_layers=4"), world_size=2, device="cpu")
    assert (v.pp, v.dp) == (2, 1)
    one = validate(job(tiny_data, "parallel=1f1b"), world_size=2, device="cpu")
    assert (one.pp, one.dp) == (2, 1)
    ep = validate(job(tiny_data, "parallel=1f1b", "parallel.ep=2", "model.num_hidden_layers=4",
                      "train.global_batch_size=16"), world_size=4, device="cpu")
    assert (ep.pp, ep.dp, ep.ep) == (2, 2, 2)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.foo=1", "train.foo:", "unknown key"),
        ("foo=1", "foo:", "unknown key"),
        ("train.steps=abc", "train.steps:", "could not be converted to Integer"),
        ("optim.betas=notalist", "optim.betas:", ""),
        ("model.hidden_size=1.5", "model.hidden_size:", "Integer"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(override, key, words):
    with pytest.raises(Exception) as info:
        composed(override)
    line = user_error_line(info.value)
    assert line is not None and line.startswith(key) and words in line, line


def test_user_error_format():
    e = UserError("train.steps", "must be >= 1, got 0", "set train.steps to the number of steps")
    assert str(e) == "train.steps: must be >= 1, got 0; set train.steps to the number of steps"


@pytest.mark.parametrize("override", ["train.foo=1", "train.steps=abc", "train.seq_len=100000", "model=nope"])
def test_cli_prints_one_line_and_exits_2(override, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.train", override, f"run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_expert_parallel_layouts_that_validate(tiny_data):
    """ep inside a DualPipe stage's data group, with FP8 dispatch and node-limited routing (2 nodes of 1 EP rank,
    the model's 2 router groups one per node)."""
    layout = validate(job(tiny_data, "parallel=dualpipe", "parallel.ep=2", "train.global_batch_size=16",
                          "precision=fp8", "precision.fp8.backend=emulated", "precision.fp8.dispatch=true",
                          "parallel.ep_ranks_per_node=1"), world_size=4, device="cpu")
    assert (layout.pp, layout.dp, layout.ep) == (2, 2, 2)


@pytest.mark.parametrize("phase, seq, batch", [("long_32k", 32768, 1920), ("long_128k", 131072, 480)])
def test_context_extension_phases_compose_and_validate(tiny_data, phase, seq, batch):
    # the report's two YaRN phases as presets over any model (here the tiny one), on two ranks splitting sequences
    cfg = OmegaConf.to_object(composed(f"+phase={phase}", "parallel=dp", "parallel.cp=2", f"data.dirs=[{tiny_data}]"))
    layout = validate(cfg, world_size=2, device="cpu")
    assert (cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.steps) == (seq, batch, 1000)
    assert (cfg.optim.schedule, cfg.optim.lr, cfg.optim.warmup_steps) == ("constant", 7.3e-6, 0)
    model = cfg.model
    assert (model.rope_scaling_type, model.rope_factor, model.max_position_embeddings) == ("yarn", 40.0, seq)
    assert (layout.dp, layout.cp) == (1, 2)


@pytest.mark.parametrize("rank, shared, printed", [("0", True, True), ("1", True, False), ("1", False, True)])
def test_who_prints_a_user_error_before_the_process_group(monkeypatch, capsys, rank, shared, printed):
    # a config mistake is every rank's: rank 0 says it; anything else (a rank's own shards, its node's disk) is
    # printed by each rank that hits it
    from trainer.errors import fail

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as info:
        fail("data.dirs: a problem; a fix", same_on_every_rank=shared)
    assert info.value.code == 2
    assert (capsys.readouterr().err == "error: data.dirs: a problem; a fix\n") == printed


def test_the_modelled_network_is_refused_on_gpus(tiny_data):
    with pytest.raises(UserError) as info:
        validate(job(tiny_data, "parallel.network.model=ib_nvlink"), world_size=2, device="cuda")
    assert user_error_line(info.value).startswith("parallel.network.model:")


def test_compiled_regions_without_a_compiler_are_refused(tiny_data, monkeypatch):
    from torch._inductor import config

    assert validate(job(tiny_data, "model.compile_regions=true"), world_size=2, device="cpu").pp == 2
    monkeypatch.setattr(config.cpp, "cxx", ("/nonexistent/c++",))  # inductor's compiler search finds nothing
    line = check(tiny_data, 2, "model.compile_regions=true")
    assert line.startswith("model.compile_regions:") and "C++ compiler" in line and "=false" in line, line

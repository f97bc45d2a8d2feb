"""FP8 configuration: precision=fp8 composes, every rule gives one line, TE's absence is one clear error,
the generated DeepSpeed config and engine pieces follow the switches."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.config import ModelConfig
from model.fp8.te import TEUnavailable, check_te, import_te, shape_problems
from tests.trainer.conftest import ROOT, base_overrides
from tests.trainer.test_config_validation import check, job
from trainer.validate import validate


def test_precision_fp8_composes(tiny_data):
    cfg = job(tiny_data, "parallel=dp", "precision=fp8")
    f = cfg.precision.fp8
    assert (f.enabled, f.backend, f.recipe, f.dispatch) == (True, "te", "blockwise", False)
    assert not job(tiny_data, "parallel=dp").precision.fp8.enabled
    layout = validate(job(tiny_data, "parallel=dp", "precision=fp8", "precision.fp8.backend=emulated",
                          "precision.fp8.recipe=mxfp8"), world_size=1, device="cpu")
    assert layout.dtype == "fp32"
    validate(job(tiny_data, "precision=fp8", "precision.fp8.backend=emulated"), world_size=2, device="cpu")


@pytest.mark.parametrize(
    "world, overrides, key, words",
    [
        (1, ["parallel=dp", "precision=fp8"], "precision.fp8.backend:", "use precision.fp8.backend=emulated"),
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.backend=tex"], "precision.fp8.backend:", "unknown"),
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.recipe=nvfp4"], "precision.fp8.recipe:", "unknown"),
        (1, ["parallel=dp", "precision.fp8.dispatch=true"], "precision.fp8.dispatch:", "needs FP8 training"),
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.backend=emulated", "precision.fp8.dispatch=true"],
         "precision.fp8.dispatch:", "parallel.ep=1"),
        (2, ["parallel=1f1b", "precision=fp8", "precision.fp8.backend=emulated"], "precision.fp8.enabled:", "1f1b"),
        (1, ["parallel=dp", "precision.adam_moments_dtype=fp16"], "precision.adam_moments_dtype:", "unknown"),
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.amax_history=0"], "precision.fp8.amax_history:", ">= 1"),
        # the torch backend (real FP8 GEMMs through torch._scaled_mm): a CUDA GPU, blockwise or current only
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.backend=torch"], "precision.fp8.backend:",
         "needs a CUDA GPU with FP8 tensor cores (SM89+) and none is visible; use precision.fp8.backend=emulated"),
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.backend=torch", "precision.fp8.recipe=delayed"],
         "precision.fp8.recipe:", "not implemented by the torch backend"),
        # the torch backend's quantizers: known names, that backend only
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.backend=torch", "precision.fp8.quantizer=cuda"],
         "precision.fp8.quantizer:", "unknown quantizer"),
        (1, ["parallel=dp", "precision=fp8", "precision.fp8.backend=emulated", "precision.fp8.quantizer=triton"],
         "precision.fp8.quantizer:", "set precision.fp8.backend=torch"),
    ],
)
def test_fp8_validation_rules(tiny_data, world, overrides, key, words):
    line = check(tiny_data, world, *overrides)
    assert line.startswith(key), line
    assert words in line, line


def test_te_on_this_machine_is_one_line(tiny_data, tmp_path):
    """`precision=fp8` asks for Transformer Engine: without a CUDA GPU (or without TE) the trainer stops with
    one line that names the key and the emulated fallback, exit code 2, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "trainer.train",
                           *base_overrides(tiny_data, tmp_path / "run", "parallel=dp", "precision=fp8")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: precision.fp8.backend: ") and lines[0].endswith(
        "use precision.fp8.backend=emulated"), lines[0]
    assert not (tmp_path / "run").exists()


class _Raise:
    """A meta-path finder that makes `import transformer_engine` fail as it does on a machine without CUDA."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformer_engine":
            raise self.exc
        return None


@pytest.mark.parametrize("exc, words", [(RuntimeError("CUDA driver not found\nmore"), "cannot load (CUDA driver"),
                                        (ImportError("No module named 'transformer_engine'"), "not installed")])
def test_import_te_turns_both_failures_into_one_line(monkeypatch, exc, words):
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Raise(exc), *sys.meta_path])
    with pytest.raises(TEUnavailable) as info:
        import_te()
    msg = str(info.value)
    assert words in msg and "\n" not in msg and msg.endswith("use precision.fp8.backend=emulated")


def test_check_te_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(TEUnavailable, match="needs a CUDA GPU"):
        check_te("blockwise")
    with pytest.raises(TEUnavailable, match="unknown recipe"):
        check_te("fp4")


def test_te_shape_rules():
    tiny = ModelConfig(name="x")  # hidden 128, q_lora 64, kv_lora 32, moe 64 ...
    problems = shape_problems(tiny, "blockwise", 8 * 128)
    assert any(p.startswith("model.q_lora_rank=64") for p in problems)
    assert any("kv_lora_rank + qk_rope_head_dim=48" in p for p in problems)
    assert shape_problems(tiny, "current", 8 * 128) == []  # every dim a multiple of 16
    assert shape_problems(tiny, "current", 12) == [
        "train.micro_batch_size x train.seq_len = 12 tokens is not a multiple of 8"]
    big = ModelConfig(hidden_size=4096, q_lora_rank=1536, kv_lora_rank=384, qk_rope_head_dim=128,
                      qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=32, intermediate_size=11264,
                      moe_intermediate_size=1408, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                      topk_group=1, name="big")
    assert shape_problems(big, "blockwise", 4096) == []
    from bench.fp8_te import BATCH, SEQ, SHAPE  # the GPU benchmark's model passes TE's rules

    assert shape_problems(ModelConfig(**SHAPE), "blockwise", BATCH * SEQ) == []


def test_ds_config_and_client_optimizer_follow_bf16_moments(tiny_data):
    from trainer.ds_config import build_ds_config
    from trainer.optim import BF16MomentsAdamW, client_optimizer

    cfg = job(tiny_data, "parallel=dp", "precision.adam_moments_dtype=bf16")
    layout = validate(cfg, world_size=1, device="cpu")
    ds = build_ds_config(cfg, layout)
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    import torch

    opt = client_optimizer(cfg)([{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}])
    assert isinstance(opt, BF16MomentsAdamW) and opt.defaults["lr"] == cfg.optim.lr
    plain = job(tiny_data, "parallel=dp")
    assert client_optimizer(plain) is None and "optimizer" in build_ds_config(plain, layout)


def test_rank_model_gets_fp8_before_deepspeed(tiny_data):
    """The rank model the trainer builds (parallel/rank_model.py): the emulated backend the config names on the
    FP8 layers, the head left in high precision."""
    from model.fp8.emulated import EmulatedFP8Backend
    from model.fp8.factory import make_fp8_backend
    from parallel.rank_model import build_rank_model
    from parallel.step_schedule import PipelineSpec
    from parallel.topology import PipelineTopology

    cfg = job(tiny_data, "parallel=dp", "precision=fp8", "precision.fp8.backend=emulated",
              "precision.fp8.recipe=current")
    layout = validate(cfg, world_size=1, device="cpu")
    spec = PipelineSpec(name="none", topo=PipelineTopology(pp=1, dp=1, rank=0), microbatches=layout.grad_accum,
                        micro_batch_size=layout.micro_batch_size, seq_len=cfg.train.seq_len, ds_config={})
    model = build_rank_model(cfg.model, spec, make_fp8_backend(cfg.precision.fp8))
    backend = model.layers[0].block.self_attn.o_proj.backend
    assert isinstance(backend, EmulatedFP8Backend) and backend.recipe == "current"
    assert not isinstance(model.head.lm_head.backend, EmulatedFP8Backend)



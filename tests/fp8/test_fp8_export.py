"""FP8 export in DeepSeek-V3's release format: float8_e4m3fn GEMM weights with a `weight_scale_inv` per
128x128 block, embedding / head / norms / router / MTP projection unquantized; read back by our import and
by transformers (which dequantizes it to bf16 on a machine without an SM89+ GPU)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.fp8.factory import fp8_layers
from model.fp8.numerics import quantize_dequantize
from model.hf import FP8_QUANT_CONFIG, SAFE_NAME, export_hf, hf_name, import_hf
from tests.conftest import layout_free_checkpoint
from tests.model.test_hf_parity import ids, random_model, tiny_cfg

# every quantized weight dimension <= 128 or a multiple of 128 (what transformers' CPU dequantizer reads):
# q_b out 4 x 32 = 128, kv_b out 4 x 32 = 128, dense FFN 256, experts 64
CFG = dict(hidden_size=128, q_lora_rank=128, kv_lora_rank=112, qk_nope_head_dim=16, qk_rope_head_dim=16,
           v_head_dim=16, intermediate_size=256, moe_intermediate_size=64)


@torch.no_grad()
def checkpoint_model(cfg):
    """The fp32 model an FP8 checkpoint describes: every FP8 weight (per HF tensor) through 128x128 blocks,
    the rest rounded to bf16, the router in fp32."""
    model = random_model(cfg)
    state = model.state_dict()
    fp8_keys = {f"{name}.weight" for name in fp8_layers(model)}
    for key, w in state.items():
        if key not in fp8_keys:
            if "mlp.gate." not in key:
                w.copy_(w.bfloat16().float())
        elif w.dim() == 3:  # stacked experts: gate and up are separate HF tensors, each with its own blocks
            halves = [w[:, : w.shape[1] // 2], w[:, w.shape[1] // 2 :]] if "gate_up" in key else [w]
            w.copy_(torch.cat([torch.stack([quantize_dequantize(h[e], (128, 128)) for e in range(w.shape[0])])
                               for h in halves], dim=1))
        else:
            w.copy_(quantize_dequantize(w, (128, 128)))
    for router in model.routers():  # export shifts the bias by its minimum (routing unchanged)
        router.e_score_correction_bias.sub_(router.e_score_correction_bias.min())
    return model


def test_fp8_export_layout_and_our_import(tmp_path: Path):
    cfg = tiny_cfg(**CFG)
    model = random_model(cfg)
    export_hf(model, tmp_path, dtype=torch.bfloat16, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANT_CONFIG and config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / SAFE_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fp8 = {k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 and all(k + "_scale_inv" in tensors for k in fp8)
    assert {k[: -len("_scale_inv")] for k in tensors if k.endswith("_scale_inv")} == fp8
    layer = cfg.num_hidden_layers
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", f"model.layers.{layer}.eh_proj.weight",
                 f"model.layers.{layer}.enorm.weight", f"model.layers.{layer}.shared_head.head.weight"):
        assert tensors[name].dtype == torch.bfloat16, name
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # router
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                 f"model.layers.{layer}.self_attn.o_proj.weight",
                 f"model.layers.{layer}.mlp.experts.0.down_proj.weight"):
        assert name in fp8, name
    w = tensors["model.layers.0.mlp.gate_proj.weight"]  # [256, 128]: 2 x 1 blocks
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    ours = model.state_dict()["layers.0.block.mlp.gate_proj.weight"]
    scale = tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].repeat_interleave(128, 0)
    assert torch.equal(w.float() * scale, quantize_dequantize(ours, (128, 128)))
    assert hf_name("layers.0.block.mlp.gate_proj.weight", cfg) == "model.layers.0.mlp.gate_proj.weight"
    # our import dequantizes: exactly the checkpoint's model (FP8 values times block scales are exact in fp32)
    back, want = import_hf(tmp_path), checkpoint_model(cfg)
    got = back.state_dict()
    for key, w in want.state_dict().items():
        assert torch.equal(got[key], w), key
    with torch.no_grad():
        assert torch.equal(back.logits(ids(cfg)), want.logits(ids(cfg)))
    orig = model.state_dict()["layers.1.block.mlp.experts.down_proj.weight"]
    err = (got["layers.1.block.mlp.experts.down_proj.weight"] - orig).norm() / orig.norm()
    assert 0.01 < float(err) < 0.05  # E4M3 rounding


def test_fp8_export_loads_in_transformers(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    cfg = tiny_cfg(**CFG)
    model = random_model(cfg)
    export_hf(model, tmp_path, dtype=torch.bfloat16, fp8=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    x = ids(cfg)
    with torch.no_grad():
        theirs, ours = hf(x).logits, checkpoint_model(cfg).logits(x)
    assert float((theirs - ours).abs().max()) <= 1e-4  # fp32 on both sides, as the bf16 export's parity test


def test_fp8_export_warns_about_dims_transformers_cannot_read(tmp_path: Path):
    cfg = tiny_cfg(intermediate_size=192)  # 192 > 128, not a multiple: the CPU dequantizer misreads it
    with pytest.warns(UserWarning, match="not a multiple of 128"):
        export_hf(random_model(cfg), tmp_path, dtype=torch.bfloat16, fp8=True)


def fake_checkpoint(model, cfg, path: Path) -> Path:
    """A training checkpoint of `model` (step 1 in the checkpoints directory `path`) as the trainer writes it:
    the layout-free state (weights and router buffers), model_config.json, meta.json."""
    assert model.cfg == cfg
    return layout_free_checkpoint(model, path, step=1)


def test_export_cli_fp8_writes_the_release_format(tmp_path: Path, capsys):
    """`python -m trainer.export_hf CKPT OUT --fp8`: the release layout, read back by our import exactly as the
    checkpoint's model with its FP8 weights through 128x128 blocks; `--fp8 --dtype fp32` is one line."""
    from trainer.export_hf import main

    cfg = tiny_cfg(**CFG)
    model = random_model(cfg)
    ckpt = fake_checkpoint(model, cfg, tmp_path / "checkpoints")
    assert main([str(ckpt), str(tmp_path / "hf"), "--fp8"]) == 0
    assert "exported" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANT_CONFIG and config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / SAFE_NAME), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.mlp.gate_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.0.mlp.gate_proj.weight_scale_inv"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    got, want = import_hf(tmp_path / "hf").state_dict(), checkpoint_model(cfg).state_dict()
    for key, w in want.items():
        assert torch.equal(got[key], w), key
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), str(tmp_path / "hf32"), "--fp8", "--dtype", "fp32"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dtype:") and "\n" not in err and not (tmp_path / "hf32").exists()

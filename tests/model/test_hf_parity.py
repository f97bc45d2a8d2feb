"""Hugging Face deepseek_v3 interop: logits parity with transformers both ways, lossless round trip, errors.

Everything runs in fp32 on CPU with tiny models whose weights are large enough (and router biases non-zero
and uneven) that routing, group limits, YaRN and the MLA scale all change the logits.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ConfigError, ModelConfig
from model.hf import (
    INDEX_NAME,
    SAFE_NAME,
    TRAINER_CONFIG_KEY,
    TRAINER_ONLY_FIELDS,
    HFCheckpointError,
    config_from_hf,
    export_hf,
    hf_config_dict,
    import_hf,
    load_hf_weights,
    model_config_from_json,
)
from model.transformer import DeepseekV3

TOL = 1e-4


def tiny_cfg(**overrides: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
        num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=128,
        num_nextn_predict_layers=1,
    )
    return ModelConfig(**(base | overrides))


def yarn(mscale: float = 1.0, mscale_all_dim: float = 1.0) -> dict[str, Any]:
    return dict(rope_scaling_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=32,
                rope_mscale=mscale, rope_mscale_all_dim=mscale_all_dim)


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int = 0, bias_mean: float = 0.0) -> DeepseekV3:
    """Weights far from init (so every part moves the logits) and uneven router biases."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).eval()
    for p in model.parameters():
        if p.dim() > 1:
            p.normal_(0.0, 0.05)
        else:
            p.uniform_(0.5, 1.5)  # norms
    for router in model.routers():
        router.e_score_correction_bias.normal_(bias_mean, 0.05)
    return model


def ids(cfg: ModelConfig, seq: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=g)


def load_transformers(path: Path):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32
        )
    return hf.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- ours -> transformers ------------------------------------------------------------------------
PARITY_CASES = {
    "qlora-rope-g1": dict(n_group=1, topk_group=1),
    "plainq-rope-g4t2": dict(q_lora_rank=None),
    "qlora-yarn-m1-g4t2": yarn(1.0, 1.0),
    "plainq-yarn-m0707-g2t1": dict(q_lora_rank=None, n_group=2, topk_group=1, **yarn(0.707, 1.0)),
    "qlora-yarn-alldim0-g4t1": dict(topk_group=1, **yarn(1.0, 0.0)),
    "plainq-yarn-m08-alldim0707-g8t3": dict(
        q_lora_rank=None, n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
        **yarn(0.8, 0.707),
    ),
    "dense0-shared2-mtp2": dict(first_k_dense_replace=0, n_shared_experts=2, num_nextn_predict_layers=2),
}


@pytest.mark.parametrize("overrides", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_export_loads_in_transformers_with_equal_logits(tmp_path: Path, overrides: dict[str, Any]) -> None:
    cfg = tiny_cfg(**overrides)
    model = random_model(cfg)
    export_hf(model, tmp_path)
    hf = load_transformers(tmp_path)
    assert hf.config.num_hidden_layers == cfg.num_hidden_layers
    x = ids(cfg)
    with torch.no_grad():
        ours, theirs = model.logits(x), hf(x).logits
    assert max_diff(ours, theirs) <= TOL, f"max |diff| {max_diff(ours, theirs):.3g}"


def test_sharded_export_loads_in_transformers(tmp_path: Path) -> None:
    cfg = tiny_cfg(**yarn(0.707, 1.0))
    model = random_model(cfg)
    export_hf(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / SAFE_NAME).exists()
    hf = load_transformers(tmp_path)
    x = ids(cfg)
    with torch.no_grad():
        assert max_diff(model.logits(x), hf(x).logits) <= TOL


def test_transformers_mtp_reads_our_mtp_layer(tmp_path: Path) -> None:
    """transformers' own MTP loader (5.x) maps our exported MTP keys onto the same function.

    It only recognises the layer index of the 671B model (61) as MTP, so the tiny model's index is declared
    the same way. Both are fed the main model's hidden state before the final norm here; note that
    `generate(use_mtp=True)` feeds the normed one (hidden_states[-1]).
    """
    pytest.importorskip("transformers")
    mtp_cls = getattr(pytest.importorskip("transformers.modeling_layers"), "MtpModel", None)
    if mtp_cls is None:
        pytest.skip("this transformers has no MtpModel")
    cfg = tiny_cfg(**yarn(0.707, 1.0))
    model = random_model(cfg)
    export_hf(model, tmp_path)
    hf = load_transformers(tmp_path)
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_hidden_layers}\..*"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtp = mtp_cls.from_pretrained(hf).eval()
    seq = 40
    tokens = ids(cfg, seq=seq + 2)
    with torch.no_grad():
        h = model.embed.embed_tokens(tokens[:, :seq])
        for piece in model.layers:
            h = piece.block(h)[0]
        module = model.head.mtp[0]
        h1, _ = module(h, model.embed.embed_tokens(tokens[:, 1 : seq + 1]))
        ours = model.head.lm_head(module.shared_head.norm(h1))
        # transformers numbers MTP positions from the predicted token's input: a uniform shift, same attention
        positions = torch.arange(1, seq + 1)[None].expand(2, -1)
        out = mtp.forward_layer(0, h, positions, None, input_ids=tokens[:, 1 : seq + 1])
        theirs = mtp._project_to_logits(out)
    assert max_diff(ours, theirs) <= TOL


def test_transformers_config_reads_our_keys(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(q_lora_rank=None, **yarn(0.707, 1.0))
    hf_cfg = transformers.DeepseekV3Config(**hf_config_dict(cfg))
    rope = hf_cfg.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["rope_theta"] == cfg.rope_theta
    assert rope["mscale"] == 0.707 and rope["original_max_position_embeddings"] == 32
    assert hf_cfg.q_lora_rank is None and hf_cfg.num_mtp_layers == 1 and hf_cfg.n_group == 4
    # a plain-rope config reads as the default rope with our theta
    plain = transformers.DeepseekV3Config(**hf_config_dict(tiny_cfg(rope_theta=5000.0)))
    assert plain.rope_parameters["rope_type"] == "default" and plain.rope_parameters["rope_theta"] == 5000.0


# ---- transformers -> ours ------------------------------------------------------------------------
def random_transformers_model(q_lora: int | None, rope: dict[str, Any] | None, n_group: int, topk_group: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=n_group, topk_group=topk_group, first_k_dense_replace=1,
        q_lora_rank=q_lora, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=128, rope_scaling=rope, rope_theta=10000.0, routed_scaling_factor=2.5,
    )
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.05 if p.dim() > 1 else torch.rand_like(p) + 0.5)
        for layer in hf.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return hf


HF_CASES = {
    "plainq-yarn-g4t2": (None, dict(type="yarn", factor=4.0, original_max_position_embeddings=32,
                                    beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=1.0), 4, 2),
    "qlora-rope-g1": (32, None, 1, 1),
}


@pytest.mark.parametrize("case", HF_CASES.values(), ids=HF_CASES.keys())
def test_transformers_checkpoint_imports_with_equal_logits(tmp_path: Path, case: tuple) -> None:
    hf = random_transformers_model(*case)
    hf.save_pretrained(tmp_path)
    # transformers writes no MTP layers although its config announces one: dropped with a warning
    with pytest.warns(UserWarning, match="no MTP layers"):
        model = import_hf(tmp_path)
    model.eval()
    assert model.cfg.num_nextn_predict_layers == 0
    x = ids(model.cfg)
    with torch.no_grad():
        theirs = hf(x).logits
        assert max_diff(model.logits(x), theirs) <= TOL
        # the fused in-memory layout (experts.gate_up_proj [E, 2I, H]) loads the same
        fused = DeepseekV3(model.cfg).eval()
        load_hf_weights(fused, hf.state_dict(), source="in-memory transformers model")
        assert max_diff(fused.logits(x), theirs) <= TOL
    with pytest.raises(HFCheckpointError, match="num_nextn_predict_layers"):
        import_hf(tmp_path, missing_mtp="error")


def test_transformers_resave_of_our_export_imports(tmp_path: Path) -> None:
    cfg = tiny_cfg(**yarn(0.707, 1.0))
    model = random_model(cfg)
    export_hf(model, tmp_path / "ours")
    load_transformers(tmp_path / "ours").save_pretrained(tmp_path / "resaved")
    with pytest.warns(UserWarning, match="no MTP layers"):
        back = import_hf(tmp_path / "resaved", missing_mtp="init")
    # our stored config survived transformers' save, so trainer-only fields come back too
    assert dataclasses.asdict(back.cfg) == dataclasses.asdict(cfg)
    x = ids(cfg)
    with torch.no_grad():
        assert max_diff(back.eval().logits(x), model.logits(x)) <= TOL


# ---- round trip and the bias shift ---------------------------------------------------------------
def test_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = tiny_cfg(num_nextn_predict_layers=2, **yarn(0.707, 1.0), name="rt", seq_aux_alpha=3e-4,
                  compile_regions=True)  # a trainer-only field travels in dsv3_trainer_config
    model = random_model(cfg, bias_mean=-0.3)
    export_hf(model, tmp_path, max_shard_bytes=150_000)
    assert (tmp_path / INDEX_NAME).exists()
    back = import_hf(tmp_path).eval()
    assert back.cfg == cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key, t in ours.items():
        expected = t - t.min() if key.endswith("e_score_correction_bias") else t
        assert theirs[key].dtype == t.dtype and torch.equal(theirs[key], expected), key
    tokens = ids(cfg, seq=40 + 1 + cfg.num_nextn_predict_layers)
    with torch.no_grad():
        a, b = model(tokens, return_logits=True), back(tokens, return_logits=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(torch.stack(a.mtp_losses), torch.stack(b.mtp_losses))


def test_bf16_export_keeps_router_fp32(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = random_model(cfg)
    export_hf(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / SAFE_NAME), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
    back = import_hf(tmp_path)
    w = model.layers[1].block.mlp.experts.gate_up_proj.weight
    assert torch.equal(back.layers[1].block.mlp.experts.gate_up_proj.weight, w.bfloat16().float())
    assert torch.equal(back.layers[1].block.mlp.gate.weight, model.layers[1].block.mlp.gate.weight)


def select_zero_masked(router: torch.nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Expert choice as transformers 4.x computes it: dropped groups masked with 0, not -inf."""
    cfg = router.cfg
    biased = scores + router.e_score_correction_bias
    grouped = biased.view(-1, cfg.n_group, cfg.experts_per_group)
    keep = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
    mask = torch.zeros(grouped.shape[:2]).scatter_(1, keep, 1.0).bool()
    return grouped.masked_fill(~mask[..., None], 0.0).view(-1, router.n_experts).topk(router.top_k).indices


@torch.no_grad()
def test_bias_shift_changes_nothing_and_fixes_zero_masking() -> None:
    cfg = tiny_cfg(num_nextn_predict_layers=0)
    model = random_model(cfg, bias_mean=-1.0)  # s + b < 0 everywhere: the case zero-masking gets wrong
    x = ids(cfg)
    before = model.logits(x)
    router = model.layers[1].block.mlp.gate
    hidden = model.layers[1].block.post_attention_layernorm(
        model.layers[1].block.attention(model.layers[0].block(model.embed.embed_tokens(x))[0])
    )
    scores = router.scores(hidden.flatten(0, 1))
    ours = router.select(scores).sort(-1).values
    assert not torch.equal(select_zero_masked(router, scores).sort(-1).values, ours)
    for r in model.routers():
        r.e_score_correction_bias -= r.e_score_correction_bias.min()
    assert torch.equal(router.select(scores).sort(-1).values, ours)
    assert torch.equal(select_zero_masked(router, scores).sort(-1).values, ours)
    assert torch.equal(model.logits(x), before)
    # and the bias does matter: without it the logits move
    for r in model.routers():
        r.e_score_correction_bias.zero_()
    assert max_diff(model.logits(x), before) > 1e-3


# ---- errors and formats --------------------------------------------------------------------------
def rewrite(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    export_hf(random_model(tiny_cfg()), tmp_path)
    rewrite(tmp_path / SAFE_NAME, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    missing = r"missing tensor 'model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight'"
    with pytest.raises(HFCheckpointError, match=missing):
        import_hf(tmp_path)


def test_unknown_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    export_hf(random_model(tiny_cfg()), tmp_path)
    rewrite(tmp_path / SAFE_NAME, lambda t: t.update({"model.layers.1.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(HFCheckpointError, match=r"unexpected tensor.*model\.layers\.1\.mlp\.extra\.weight"):
        import_hf(tmp_path)
    export_hf(random_model(tiny_cfg()), tmp_path)
    rewrite(tmp_path / SAFE_NAME, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(HFCheckpointError, match=r"model\.norm\.weight.*shape \(3,\)"):
        import_hf(tmp_path)


def test_block_fp8_checkpoint_is_dequantized(tmp_path: Path) -> None:
    export_hf(random_model(tiny_cfg()), tmp_path)
    name = "model.layers.1.self_attn.kv_b_proj.weight"  # [128, 16]: 8 x 1 blocks of 16 x 16
    ref: dict[str, torch.Tensor] = {}

    def quantize(t: dict[str, torch.Tensor]) -> None:
        w = t[name]
        scale = w.view(8, 16, 1, 16).abs().amax(dim=(1, 3)) / 448.0
        q = (w / scale.repeat_interleave(16, 0).repeat_interleave(16, 1)).to(torch.float8_e4m3fn)
        t[name], t[name + "_scale_inv"] = q, scale
        ref["w"] = q.float() * scale.repeat_interleave(16, 0).repeat_interleave(16, 1)

    rewrite(tmp_path / SAFE_NAME, quantize)
    cfg_file = tmp_path / "config.json"
    hf = json.loads(cfg_file.read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    cfg_file.write_text(json.dumps(hf))
    back = import_hf(tmp_path)
    assert torch.equal(back.layers[1].block.self_attn.kv_b_proj.weight, ref["w"])


# ---- config mapping ------------------------------------------------------------------------------
def arch(cfg: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TRAINER_ONLY_FIELDS}


@pytest.mark.parametrize("rope", [{}, yarn(0.707, 1.0)], ids=["rope", "yarn"])
def test_config_maps_both_ways(rope: dict[str, Any]) -> None:
    cfg = tiny_cfg(q_lora_rank=None, **rope)
    hf = hf_config_dict(cfg)
    assert hf["q_lora_rank"] is None and json.loads(json.dumps(hf))["q_lora_rank"] is None
    assert hf["rope_scaling"] is None if not rope else hf["rope_scaling"]["type"] == "yarn"
    assert arch(config_from_hf(hf)) == arch(cfg)
    # transformers 4.x style (legacy keys only) and 5.x style (rope_parameters only) read the same
    legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", TRAINER_CONFIG_KEY)}
    modern = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta", TRAINER_CONFIG_KEY)}
    assert arch(config_from_hf(legacy)) == arch(cfg) == arch(config_from_hf(modern))
    assert model_config_from_json(hf) == cfg


def test_config_mismatch_and_unsupported_keys_are_errors() -> None:
    hf = hf_config_dict(tiny_cfg())
    with pytest.raises(ConfigError, match="hidden_size"):
        model_config_from_json(hf | {"hidden_size": 128})
    with pytest.raises(ConfigError, match="topk_method"):
        config_from_hf(hf | {"topk_method": "greedy"})
    with pytest.raises(ConfigError, match="rope type 'linear'"):
        config_from_hf(hf | {"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_deepseek_v3_release_config_maps_to_our_preset() -> None:
    """The config.json DeepSeek published with V3 (FP8 release, remote-code keys) reads as our preset."""
    release = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
        "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
        "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "rms_norm_eps": 1e-06,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 129280,
    }
    preset = ModelConfig.from_yaml(Path(__file__).parents[2] / "conf" / "model" / "dsv3_671b.yaml")
    assert arch(config_from_hf(release)) == arch(dataclasses.replace(preset, initializer_range=0.02))

"""Our side of the Hugging Face `deepseek_v3` checkpoint format: export, import, config mapping.

Layout written by `export_hf` (read by transformers 4.x / 5.x `DeepseekV3ForCausalLM` and by vLLM):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.N.{input_layernorm, post_attention_layernorm, self_attn.*, mlp.*}     our layers.N.block.*
    model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight       split from our stacked expert tensors
    model.layers.L.{enorm, hnorm, eh_proj, shared_head.norm} + a decoder layer   MTP module k, L = layers + k
    model.layers.L.{embed_tokens.weight, shared_head.head.weight}          copies of ours: vLLM loads them

config.json carries every HF key plus our whole ModelConfig under `dsv3_trainer_config`, so an import of our
own export is lossless. This module must not import transformers: it runs where transformers is absent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ConfigError, ModelConfig
from model.transformer import DeepseekV3

TRAINER_CONFIG_KEY = "dsv3_trainer_config"
SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000

# ModelConfig fields with no Hugging Face counterpart: taken from `dsv3_trainer_config` or left at defaults
TRAINER_ONLY_FIELDS = frozenset(
    {"bias_update_speed", "seq_aux_alpha", "mtp_loss_weight", "activation_checkpointing", "selective_recompute",
     "chunked_head_loss", "compile_regions", "name"}
)
# HF config keys copied one to one into ModelConfig
_DIRECT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
    "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "max_position_embeddings",
    "rms_norm_eps", "initializer_range", "bos_token_id", "eos_token_id",
)
# tensors that may be present in a checkpoint without a place in our model
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A checkpoint directory that does not match the config, or a damaged file in it: the message names the
    tensor or the file, and the fix (the CLIs print it as one line, exit code 2)."""


_REEXPORT = "the file is cut or corrupt: export or download the model again"


def _read_json(path: Path) -> Any:
    """A JSON file of the checkpoint; a cut or corrupt one is an HFCheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise HFCheckpointError(f"{path}: unreadable JSON ({_short(e)}); {_REEXPORT}") from None


def _open_safetensors(path: Path, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({_short(e)}); {_REEXPORT}") from None


def _short(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:160]


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- config --------------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for `cfg`: every key transformers 4.x / 5.x and vLLM read, plus our full config."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_type == "yarn":
        rope_scaling = {
            "type": "yarn",  # transformers < 4.45 and older vLLM read "type"
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
            "beta_fast": cfg.rope_beta_fast,
            "beta_slow": cfg.rope_beta_slow,
            "mscale": cfg.rope_mscale,
            "mscale_all_dim": cfg.rope_mscale_all_dim,
        }
        rope_parameters = {k: v for k, v in rope_scaling.items() if k != "type"}
        rope_parameters["rope_theta"] = cfg.rope_theta
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{key: getattr(cfg, key) for key in _DIRECT_KEYS},
        # MLA has one key/value head per query head
        "num_key_value_heads": cfg.num_attention_heads,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "ep_size": 1,
        "seq_aux": True,
        "aux_loss_alpha": cfg.seq_aux_alpha,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "rope_interleave": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
        TRAINER_CONFIG_KEY: cfg.to_dict(),
    }
    return out


def _require(hf: Mapping[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    if key in hf and hf[key] not in allowed:
        raise ConfigError(
            f"config.json {key}={hf[key]!r} is not supported ({why}); expected one of {allowed}"
        )


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from the Hugging Face keys of a config.json (ignores `dsv3_trainer_config`).

    Reads the legacy `rope_theta` + `rope_scaling` and the transformers 5.x `rope_parameters` (rope_scaling
    wins, as in transformers). Trainer-only fields come from `overrides` or the ModelConfig defaults.
    """
    _require(hf, "model_type", ("deepseek_v3",), "only the deepseek_v3 architecture maps onto this model")
    _require(hf, "topk_method", ("noaux_tc",), "the router is sigmoid + bias-corrected group-limited top-k")
    _require(hf, "scoring_func", ("sigmoid",), "the router scores with a sigmoid")
    _require(hf, "hidden_act", ("silu",), "experts are SwiGLU")
    _require(hf, "attention_bias", (False, None), "projections have no bias")
    _require(hf, "moe_layer_freq", (1,), "every layer after first_k_dense_replace is MoE")
    _require(hf, "rope_interleave", (True, None), "RoPE pairs are interleaved as DeepSeek trains them")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ConfigError(f"config.json: required key {key!r} is missing")
    fields: dict[str, Any] = {key: hf[key] for key in _DIRECT_KEYS if key in hf}
    for key, default in (("n_group", 1), ("topk_group", 1), ("n_shared_experts", 0), ("n_routed_experts", 0)):
        if key in fields and fields[key] is None:
            fields[key] = default
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    for key in ("bos_token_id", "eos_token_id"):
        if key in fields and fields[key] is None:
            del fields[key]
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
    if mtp is not None:
        fields["num_nextn_predict_layers"] = mtp

    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta")))
    if theta is not None:
        fields["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        fields["rope_scaling_type"] = "none"
    elif rope_type == "yarn":
        orig = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        factor = rope.get("factor")
        if factor is None:  # transformers derives it from the two lengths
            factor = hf["max_position_embeddings"] / orig
        fields |= {
            "rope_scaling_type": "yarn",
            "rope_factor": float(factor),
            "rope_original_max_position_embeddings": int(orig),
            # transformers falls back to 32 / 1 on a missing or zero beta
            "rope_beta_fast": float(rope.get("beta_fast") or 32.0),
            "rope_beta_slow": float(rope.get("beta_slow") or 1.0),
            # absent mscale keys behave as 0 in transformers (`if mscale and mscale_all_dim`), and so here
            "rope_mscale": float(rope.get("mscale") or 0.0),
            "rope_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        }
        if rope.get("attention_factor") is not None:
            raise ConfigError(
                "config.json rope attention_factor is not supported; use mscale / mscale_all_dim"
            )
    else:
        raise ConfigError(f"config.json rope type {rope_type!r} is not supported; use yarn or default")
    fields |= overrides
    return ModelConfig(**fields)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def model_config_from_json(hf: Mapping[str, Any]) -> ModelConfig:
    """Our stored config when present (checked against the HF keys, which a user may have edited), else the
    config mapped from the HF keys."""
    if TRAINER_CONFIG_KEY not in hf:
        return config_from_hf(hf)
    ours = ModelConfig.from_dict(dict(hf[TRAINER_CONFIG_KEY]))
    mapped = config_from_hf(hf)
    for f in dataclasses.fields(ModelConfig):
        if f.name in TRAINER_ONLY_FIELDS:
            continue
        a, b = getattr(ours, f.name), getattr(mapped, f.name)
        if not _same(a, b):
            raise ConfigError(
                f"config.json: the Hugging Face keys give {f.name}={b!r} but "
                f"{TRAINER_CONFIG_KEY}.{f.name}={a!r}; edit both, or delete {TRAINER_CONFIG_KEY} to use "
                "the Hugging Face keys alone"
            )
    return ours


# ---- names ---------------------------------------------------------------------------------------
def hf_name(key: str, cfg: ModelConfig) -> str:
    """HF name of one of our state_dict keys (stacked expert tensors keep their stacked name here)."""
    if key == "embed.embed_tokens.weight":
        return "model.embed_tokens.weight"
    if key == "head.norm.weight":
        return "model.norm.weight"
    if key == "head.lm_head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.block\.(.+)", key)
    if m:
        return f"model.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"head\.mtp\.(\d+)\.(?:block\.)?(.+)", key)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}"
    raise KeyError(f"{key}: no Hugging Face name for this tensor; model/hf.py needs a rule for it")


_GATE_UP = "mlp.experts.gate_up_proj.weight"
_DOWN = "mlp.experts.down_proj.weight"


# ---- export --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Item:
    name: str
    make: Callable[[], torch.Tensor]
    nbytes: int


def _item(
    name: str, src: torch.Tensor, dtype: torch.dtype, fn: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> _Item:
    """`fn` must keep the shape: the size is planned before anything is materialised."""

    def make() -> torch.Tensor:
        t = src.detach() if fn is None else fn(src.detach())
        # copy=True: safetensors refuses tensors that share storage (expert slices, embedding copies)
        return t.to(device="cpu", dtype=dtype, copy=True).contiguous()

    return _Item(name, make, src.numel() * dtype.itemsize)


FP8_BLOCK = (128, 128)
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": list(FP8_BLOCK)}


def _fp8_items(name: str, src: torch.Tensor) -> list[_Item]:
    """A weight in DeepSeek's release format: float8_e4m3fn values and `<name>_scale_inv`, one fp32
    dequantization multiplier per 128 x 128 block (edge blocks partial)."""
    from model.fp8.numerics import quantize

    rows, cols = src.shape

    def part(which: str) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            q = quantize(src.detach().float(), FP8_BLOCK)
            return getattr(q, which).to(device="cpu", copy=True).contiguous()

        return make

    grid = math.ceil(rows / FP8_BLOCK[0]) * math.ceil(cols / FP8_BLOCK[1])
    return [_Item(name, part("values"), rows * cols), _Item(name + "_scale_inv", part("scale"), grid * 4)]


def _fp8_keys(model: DeepseekV3) -> set[str]:
    """state_dict keys of the weights the FP8 release format quantizes: the FP8 layers of training
    (attention, dense MLPs, shared and routed experts, the MTP block); not the embedding, head, norms,
    router or the MTP projection."""
    from model.fp8.factory import fp8_layers

    return {f"{name}.weight" for name in fp8_layers(model)}


def _hf_items(model: DeepseekV3, dtype: torch.dtype = torch.float32, fp8: bool = False) -> list[_Item]:
    """Every tensor of the HF checkpoint, in write order, materialised lazily (one shard at a time)."""
    cfg = model.cfg
    quantized = _fp8_keys(model) if fp8 else set()
    items: list[_Item] = []

    def weight(name: str, src: torch.Tensor, key: str) -> list[_Item]:
        return _fp8_items(name, src) if key in quantized else [_item(name, src, dtype)]

    for key, t in model.state_dict().items():
        name = hf_name(key, cfg)
        if name.endswith(_GATE_UP):
            base, inter = name[: -len(_GATE_UP)] + "mlp.experts.", t.shape[1] // 2
            for e in range(t.shape[0]):
                items += weight(f"{base}{e}.gate_proj.weight", t[e, :inter], key)
                items += weight(f"{base}{e}.up_proj.weight", t[e, inter:], key)
        elif name.endswith(_DOWN):
            base = name[: -len(_DOWN)] + "mlp.experts."
            for e in range(t.shape[0]):
                items += weight(f"{base}{e}.down_proj.weight", t[e], key)
        elif key in quantized:
            items += _fp8_items(name, t)
        elif name.endswith("mlp.gate.e_score_correction_bias"):
            # Only bias differences matter to routing, and a non-negative bias keeps every s + b > 0, which
            # transformers 4.x (and older vLLM) need: they mask dropped groups with 0 instead of -inf.
            items.append(_item(name, t, torch.float32, lambda b: b - b.min()))
        elif name.endswith("mlp.gate.weight"):
            items.append(_item(name, t, torch.float32))  # the router runs in fp32 (transformers keeps it so)
        else:
            items.append(_item(name, t, dtype))
    for k in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + k
        prefix = f"model.layers.{layer}."
        items.append(_item(prefix + "embed_tokens.weight", model.embed.embed_tokens.weight, dtype))
        items.append(_item(prefix + "shared_head.head.weight", model.head.lm_head.weight, dtype))
    return items


def _plan_shards(items: list[_Item], max_shard_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def export_hf(
    model: DeepseekV3,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    fp8: bool = False,
) -> Path:
    """Write `model` as a Hugging Face deepseek_v3 checkpoint into out_dir (created); returns out_dir.

    One `model.safetensors` when everything fits in max_shard_bytes, else `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json`. Previous checkpoint files of either form in out_dir are removed.
    Router weights and biases stay fp32 whatever `dtype` is. Call on one rank with the full model.

    fp8: DeepSeek-V3's release format: the GEMM weights trained in FP8 as float8_e4m3fn with a
    `weight_scale_inv` per 128 x 128 block, everything else (embedding, head, norms, router, MTP projection)
    in `dtype` (bf16 there), and `quantization_config` in config.json. transformers loads it (dequantized to
    bf16 without an SM89+ GPU); its CPU dequantizer infers the block size from the scale grid, so a weight
    dimension above 128 must be a multiple of 128 there (a warning names the others).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"export dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if fp8:
        odd = sorted(k for k in _fp8_keys(model)
                     if any(n > FP8_BLOCK[0] and n % FP8_BLOCK[0] for n in model.state_dict()[k].shape[-2:]))
        if odd:
            warnings.warn(f"FP8 export: {odd[:3]} have a dimension above 128 that is not a multiple of 128; "
                          "transformers' CPU dequantizer misreads such blocks (vLLM and our import do not)",
                          stacklevel=2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SAFE_NAME, out / INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    items = _hf_items(model, dtype, fp8)
    shards = _plan_shards(items, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = SAFE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {it.name: it.make() for it in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(it.nbytes for it in items)}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config_dict(model.cfg, dtype)
    if fp8:
        config["quantization_config"] = dict(FP8_QUANT_CONFIG)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- import --------------------------------------------------------------------------------------
class _SafetensorsDir(Mapping[str, torch.Tensor]):
    """Lazy name -> tensor view of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        index = path / INDEX_NAME
        weight_map: dict[str, str]
        self._path = path
        self._files: dict[str, Any] = {}
        if index.is_file():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index}: no weight_map in it; {_REEXPORT}")
        elif (path / SAFE_NAME).is_file():
            self._files[SAFE_NAME] = _open_safetensors(path / SAFE_NAME, stack)
            weight_map = dict.fromkeys(self._files[SAFE_NAME].keys(), SAFE_NAME)
        else:
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise HFCheckpointError(
                f"{path}: no {SAFE_NAME} or {INDEX_NAME} (found {found[:10]}); "
                "only safetensors checkpoints are read"
            )
        self._map = weight_map
        for fname in sorted(set(weight_map.values()) - set(self._files)):
            if not (path / fname).is_file():
                raise HFCheckpointError(f"{path}: {INDEX_NAME} names shard {fname}, which does not exist")
            self._files[fname] = _open_safetensors(path / fname, stack)

    def __getitem__(self, name: str) -> torch.Tensor:
        fname = self._map[name]
        try:
            return self._files[fname].get_tensor(name)
        except SafetensorError as e:
            raise HFCheckpointError(f"{self._path / fname}: tensor {name!r} unreadable ({_short(e)}); "
                                    f"{_REEXPORT}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def _dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled FP8 (DeepSeek's release format) -> fp32: each block x block tile times its scale."""
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * s


class _Reader:
    """Takes tensors out of a checkpoint mapping by HF name, tracking which were used."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], source: str, block: tuple[int, int] | None
    ) -> None:
        self.tensors, self.source, self.block = tensors, source, block
        self.names = set(tensors.keys())
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.names

    def take(self, name: str, wanted: str) -> torch.Tensor:
        if name not in self.names:
            raise HFCheckpointError(
                f"{self.source}: missing tensor {name!r} (needed for our {wanted}); the checkpoint "
                "does not match its config.json or was written incompletely"
            )
        self.used.add(name)
        t = self.tensors[name]
        scale = name + "_scale_inv"
        if scale in self.names:
            self.used.add(scale)
            return _dequantize(t, self.tensors[scale], self.block or (128, 128))
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise HFCheckpointError(
                f"{self.source}: {name!r} is float8 but has no {scale!r} to dequantize it"
            )
        return t


def _stacked_experts(r: _Reader, base: str, our_key: str, n_experts: int, kind: str) -> torch.Tensor:
    """Our [E, 2I, H] gate_up or [E, H, I] down tensor, from fused keys (transformers 5.x in memory) or
    per-expert keys (every file on disk)."""
    for fused in (f"{base}{kind}", f"{base}{kind}.weight"):
        if r.has(fused):
            return r.take(fused, our_key)
    if kind == "down_proj":
        return torch.stack([r.take(f"{base}{e}.down_proj.weight", our_key) for e in range(n_experts)])
    gate_up = []
    for e in range(n_experts):
        gate_up.append(torch.cat([
            r.take(f"{base}{e}.gate_proj.weight", our_key), r.take(f"{base}{e}.up_proj.weight", our_key)
        ]))
    return torch.stack(gate_up)


def load_hf_weights(
    model: DeepseekV3,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    weight_block_size: tuple[int, int] | None = None,
    skip_mtp: bool = False,
) -> None:
    """Fill `model` from HF-named tensors: per-expert or fused experts, optionally block FP8 (*_scale_inv).

    Every tensor of the model must be present and every tensor given must be used, except the documented
    optional ones: the MTP layers' copies of the embedding and head, and rotary inv_freq buffers.
    With skip_mtp the MTP modules keep their current values and no MTP tensor may be given.
    """
    cfg = model.cfg
    r = _Reader(tensors, source, weight_block_size)
    new_state: dict[str, torch.Tensor] = {}
    for key, ref in model.state_dict().items():
        if skip_mtp and key.startswith("head.mtp."):
            new_state[key] = ref
            continue
        name = hf_name(key, cfg)
        if name.endswith(_GATE_UP):
            base = name[: -len(_GATE_UP)] + "mlp.experts."
            t = _stacked_experts(r, base, key, ref.shape[0], "gate_up_proj")
        elif name.endswith(_DOWN):
            base = name[: -len(_DOWN)] + "mlp.experts."
            t = _stacked_experts(r, base, key, ref.shape[0], "down_proj")
        else:
            t = r.take(name, key)
        if tuple(t.shape) != tuple(ref.shape):
            raise HFCheckpointError(
                f"{source}: tensor for our {key} (HF {name!r}) has shape {tuple(t.shape)}, the config needs "
                f"{tuple(ref.shape)}"
            )
        new_state[key] = t.to(ref.dtype)
    if not skip_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            layer = cfg.num_hidden_layers + k
            for suffix, main in (("embed_tokens.weight", "embed.embed_tokens.weight"),
                                 ("shared_head.head.weight", "head.lm_head.weight")):
                name = f"model.layers.{layer}.{suffix}"
                if r.has(name):
                    # our MTP modules share the main embedding and head, so a differing copy cannot be kept
                    copy = r.take(name, main).to(torch.float32)
                    if copy.shape != new_state[main].shape or not torch.equal(copy, new_state[main].float()):
                        warnings.warn(
                            f"{source}: {name} differs from the main model's {main}; using the main one",
                            stacklevel=2,
                        )
    unused = sorted(n for n in r.names - r.used if not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise HFCheckpointError(
            f"{source}: unexpected tensor(s) {unused[:5]}{more}; they have no place in a model with "
            "this config"
        )
    model.load_state_dict(new_state, strict=True)


def _mtp_layers_present(names: Iterable[str], cfg: ModelConfig) -> set[int]:
    present: set[int] = set()
    for name in names:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m[1]) >= cfg.num_hidden_layers:
            present.add(int(m[1]))
    return present


def import_hf(
    path: str | Path, *, missing_mtp: Literal["drop", "init", "error"] = "drop"
) -> DeepseekV3:
    """A DeepseekV3 (fp32 weights, fp32 router bias) from a directory written by `export_hf` or by
    transformers' `save_pretrained`.

    transformers does not save MTP layers; when the config announces MTP modules and the directory holds none,
    `missing_mtp` decides: "drop" builds the model without MTP (warning), "init" keeps freshly initialised
    MTP modules (warning), "error" raises.
    """
    if missing_mtp not in ("drop", "init", "error"):
        raise ValueError(f"missing_mtp must be 'drop', 'init' or 'error', got {missing_mtp!r}")
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFCheckpointError(f"{path}: no config.json")
    hf = _read_json(cfg_file)
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{cfg_file}: not a JSON object; {_REEXPORT}")
    cfg = model_config_from_json(hf)
    block: tuple[int, int] | None = None
    quant = hf.get("quantization_config")
    if quant:
        if quant.get("quant_method") != "fp8" or "weight_block_size" not in quant:
            raise ConfigError(
                f"config.json quantization_config {quant} is not supported; only block-scaled fp8"
            )
        block = tuple(quant["weight_block_size"])
    with ExitStack() as stack:
        tensors = _SafetensorsDir(path, stack)
        skip_mtp = False
        if cfg.num_nextn_predict_layers and not _mtp_layers_present(tensors, cfg):
            if missing_mtp == "error":
                raise HFCheckpointError(
                    f"{path}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but no "
                    f"model.layers.{cfg.num_hidden_layers}.* tensors (transformers' save_pretrained "
                    "drops them)"
                )
            if missing_mtp == "drop":
                warnings.warn(f"{path}: no MTP layers in the checkpoint; importing without MTP", stacklevel=2)
                cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
            else:
                warnings.warn(f"{path}: no MTP layers in the checkpoint; MTP modules are freshly initialised",
                              stacklevel=2)
                skip_mtp = True
        model = DeepseekV3(cfg)
        if hf.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
            tensors = _WithTiedHead(tensors)
        load_hf_weights(model, tensors, source=str(path), weight_block_size=block, skip_mtp=skip_mtp)
    return model


class _WithTiedHead(Mapping[str, torch.Tensor]):
    """A tied-embedding checkpoint seen with an explicit lm_head.weight (our head is untied)."""

    def __init__(self, inner: Mapping[str, torch.Tensor]) -> None:
        self.inner = inner

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.inner["model.embed_tokens.weight" if name == "lm_head.weight" else name]

    def __iter__(self) -> Iterator[str]:
        yield from self.inner
        yield "lm_head.weight"

    def __len__(self) -> int:
        return len(self.inner) + 1

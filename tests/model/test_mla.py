"""The absorbed MLA (latent cache, used for generation) computes the same function as the expanded MLA."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from model.attention import MLA, LatentCache
from model.config import ModelConfig
from model.rope import RotaryEmbedding
from model.transformer import DeepseekV3

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # these matrices are tiny: thread hand-offs cost more than they save, and slow down on shared CPUs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
        max_position_embeddings=64,
    )
    base.update(overrides)
    return ModelConfig(**base)


# YaRN with a short original context so the interpolation ramp covers some rope dims, and
# mscale != mscale_all_dim so both the cos/sin magnitude and the softmax scale differ from plain RoPE
YARN = dict(
    rope_scaling_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=16,
    rope_mscale=1.0, rope_mscale_all_dim=0.7,
)
VARIANTS = {
    "q_lora": {},
    "no_q_lora": dict(q_lora_rank=None),
    "yarn": YARN,
    "yarn_no_q_lora": dict(q_lora_rank=None, **YARN),
}


def make_mla(**overrides) -> tuple[MLA, ModelConfig]:
    cfg = small_config(**overrides)
    mla = MLA(cfg, RotaryEmbedding(cfg))
    # default Linear init is kaiming-uniform: large enough that the attention pattern is far from uniform
    mla.eval()
    return mla, cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_absorbed_equals_expanded_whole_sequence(variant: str) -> None:
    torch.manual_seed(0)
    mla, cfg = make_mla(**VARIANTS[variant])
    x = torch.randn(2, 13, cfg.hidden_size)
    with torch.no_grad():
        expected = mla(x)
        cache = LatentCache.empty(cfg, 2, 13, x.device, x.dtype)
        got = mla.forward_cached(x, cache, 0)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prefill", [1, 5])
def test_absorbed_equals_expanded_in_chunks(variant: str, prefill: int) -> None:
    """Prefill a prefix, then feed the rest token by token (and one 3-token chunk) through the cache."""
    torch.manual_seed(1)
    mla, cfg = make_mla(**VARIANTS[variant])
    s = 14
    x = torch.randn(2, s, cfg.hidden_size)
    with torch.no_grad():
        expected = mla(x)
        cache = LatentCache.empty(cfg, 2, s + 4, x.device, x.dtype)  # spare rows must not matter
        cuts = [0, prefill, *range(prefill + 1, s - 2), s]  # single tokens, then a final 3-token chunk
        outs = [mla.forward_cached(x[:, a:b], cache, a) for a, b in zip(cuts[:-1], cuts[1:])]
    got = torch.cat(outs, dim=1)
    assert (got - expected).abs().max().item() <= ATOL


def tensor_state(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor a module tree holds: parameters, buffers and plain tensor attributes, by name and shape."""
    state = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                state[f"{prefix}.{attr}"] = tuple(value.shape)
    return state


@pytest.mark.parametrize("variant", ["q_lora", "yarn"])
def test_absorbed_cache_holds_only_latents(variant: str) -> None:
    """After a real generation, each layer's cache holds, at the filled positions, exactly the normed kv latent
    and the roped key of its attention input (recomputed here from the expanded forward), zeros elsewhere, and
    nothing else: (kv_lora_rank + qk_rope_head_dim) x element size bytes per token per layer, the expanded
    per-head keys and values stored nowhere."""
    from model.generate import generate
    from model.rope import apply_rope

    model = make_model(**VARIANTS[variant])
    cfg = model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    new_tokens = 4
    caches: list[list[LatentCache]] = []
    real_new_cache = model.new_cache
    model.new_cache = lambda b, n: caches.append(real_new_cache(b, n)) or caches[-1]  # keep what generate uses
    before = tensor_state(model)
    tokens = generate(model, prompt, new_tokens).tokens
    assert tensor_state(model) == before  # the cached forwards left no tensor behind in the model
    (cache,) = caches
    assert len(cache) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers

    # bytes: two tensors per layer, kv_lora + rope values per token, nothing per head
    b, max_len = prompt.shape[0], prompt.shape[1] + new_tokens
    elem = model.embed.embed_tokens.weight.element_size()
    for layer in cache:
        assert [f.name for f in dataclasses.fields(layer)] == ["kv", "pe"]
        held = sum(t.untyped_storage().nbytes() for t in (layer.kv, layer.pe))  # allocated, not viewed
        assert held == b * max_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem
    expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)  # what a plain KV cache would hold
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim < expanded / 4

    # contents: the attention inputs of the fed positions (every token but the last generated one), from the
    # expanded forward, through kv_a_proj_with_mqa + kv_a_layernorm (latent) and RoPE (shared key)
    fed = tokens[:, :-1]
    inputs: list[torch.Tensor] = []
    hooks = [piece.block.input_layernorm.register_forward_hook(lambda _m, _args, out: inputs.append(out))
             for piece in model.layers]
    with torch.no_grad():
        model.logits(fed)
    for h in hooks:
        h.remove()
    assert len(inputs) == cfg.num_hidden_layers
    t = fed.shape[1]
    for i, (x, layer) in enumerate(zip(inputs, cache)):
        attn = model.layers[i].block.self_attn
        c_kv, k_pe = (x @ attn.kv_a_proj_with_mqa.weight.T).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        norm = attn.kv_a_layernorm
        latent = norm.weight * c_kv * torch.rsqrt(c_kv.pow(2).mean(-1, keepdim=True) + norm.eps)
        cos, sin = attn.rope.cos_sin(0, t, x.device)
        roped = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0]
        assert latent.abs().max() > 0.5 and roped.abs().max() > 0.1  # not a comparison of near-zeros
        # the deeper layers' inputs went through absorbed vs expanded attention: equal to fp32 rounding
        torch.testing.assert_close(layer.kv[:, :t], latent, rtol=1e-4, atol=ATOL)
        torch.testing.assert_close(layer.pe[:, :t], roped, rtol=1e-4, atol=ATOL)
        assert not layer.kv[:, t:].any() and not layer.pe[:, t:].any()  # never written
    for layer in cache[cfg.num_hidden_layers :]:  # plain decoding never runs the MTP modules
        assert not layer.kv.any() and not layer.pe.any()


def make_model(**overrides) -> DeepseekV3:
    torch.manual_seed(2)
    # a larger init than the training default, so logits are O(1) and a mismatch could not hide in noise
    model = DeepseekV3(small_config(initializer_range=0.1, **overrides))
    return model.eval()


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "yarn"])
def test_model_forward_cached_equals_logits(variant: str) -> None:
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model.logits(ids)
        whole, _ = model.forward_cached(ids, model.new_cache(2, 12), 0)
        cache = model.new_cache(2, 12)
        cuts = [0, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        parts = [model.forward_cached(ids[:, a:b], cache, a)[0] for a, b in zip(cuts[:-1], cuts[1:])]
        chunked = torch.cat(parts, dim=1)
    assert expected.abs().max() > 0.1
    assert (whole - expected).abs().max().item() <= ATOL
    assert (chunked - expected).abs().max().item() <= ATOL


def test_model_forward_cached_hidden_feeds_head() -> None:
    """The second output is the final-normed hidden state (what the MTP drafter reads): head(h) = logits."""
    model = make_model()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        logits, h = model.forward_cached(ids, model.new_cache(1, 6), 0)
        again = model.head.lm_head(h)
    assert h.shape == (1, 6, model.cfg.hidden_size)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)

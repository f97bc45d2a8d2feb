"""The absorbed MLA (latent cache, used for generation) computes the same function as the expanded MLA."""

from __future__ import annotations

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


def test_absorbed_cache_holds_only_latents() -> None:
    """The cache stores kv_lora + rope values per token, independent of the number of heads."""
    mla, cfg = make_mla()
    cache = LatentCache.empty(cfg, 1, 8, torch.device("cpu"), torch.float32)
    assert cache.kv.shape == (1, 8, cfg.kv_lora_rank)
    assert cache.pe.shape == (1, 8, cfg.qk_rope_head_dim)


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

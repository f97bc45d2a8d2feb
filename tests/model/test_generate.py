"""Generation with the latent KV cache: greedy, sampling, eos, and MTP self-speculative decoding."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from model.attention import LatentCache
from model.config import ModelConfig
from model.generate import GenerationResult, generate, generate_speculative_mtp, sample_next
from model.transformer import DeepseekV3

VOCAB = 128


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # these matrices are tiny: thread hand-offs cost more than they save, and slow down on shared CPUs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
        max_position_embeddings=128,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_model(seed: int, **overrides) -> DeepseekV3:
    torch.manual_seed(seed)
    # a larger init than the training default, so the greedy choice is rarely a near-tie (and the output is
    # not one token repeated)
    overrides.setdefault("initializer_range", 0.1)
    return DeepseekV3(small_config(**overrides)).eval()


def greedy_by_recompute(model: DeepseekV3, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: argmax of the full, cache-free forward over the growing sequence."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model.logits(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


# ---- plain generation ----------------------------------------------------------------------------------


def test_cached_greedy_matches_full_recompute() -> None:
    model = random_model(0)
    prompt = torch.randint(0, VOCAB, (3, 6))
    result = generate(model, prompt, 20)
    expected = greedy_by_recompute(model, prompt, 20)
    assert torch.equal(result.tokens, expected)
    assert result.new_tokens == 20
    assert result.main_forwards == 20  # one prefill + 19 single-token decode forwards
    assert result.tokens_per_forward == 1.0
    assert result.acceptance_rate is None
    assert result.seconds > 0
    assert len(set(expected[0, 6:].tolist())) > 3  # a non-degenerate continuation


def test_generate_restores_training_flag_and_needs_no_grad() -> None:
    model = random_model(1)
    model.train()
    prompt = torch.randint(0, VOCAB, (1, 4))
    result = generate(model, prompt, 3)
    assert model.training
    assert not result.tokens.requires_grad
    model.eval()
    generate_speculative_mtp(model, prompt, 3)
    assert not model.training


def test_generate_zero_and_one_new_tokens() -> None:
    model = random_model(2)
    prompt = torch.randint(0, VOCAB, (2, 5))
    none = generate(model, prompt, 0)
    assert torch.equal(none.tokens, prompt) and none.new_tokens == 0 and none.main_forwards == 0
    one = generate(model, prompt, 1)
    assert torch.equal(one.tokens, greedy_by_recompute(model, prompt, 1))
    assert one.main_forwards == 1 and one.tokens_per_forward == 0.0  # no decode forward ran


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = random_model(3)
    prompt = torch.randint(0, VOCAB, (2, 5))

    def sample(seed: int, **kw) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 16, temperature=1.0, generator=gen, **kw).tokens

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7, top_k=5, top_p=0.9), sample(7, top_k=5, top_p=0.9))


def test_top_k_one_and_tiny_top_p_sample_the_greedy_tokens() -> None:
    model = random_model(4)
    prompt = torch.randint(0, VOCAB, (2, 5))
    greedy = generate(model, prompt, 12).tokens
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 12, temperature=1.3, top_k=1, generator=gen).tokens, greedy)
    assert torch.equal(generate(model, prompt, 12, temperature=1.3, top_p=1e-6, generator=gen).tokens, greedy)


def test_top_k_and_top_p_restrict_samples() -> None:
    logits = torch.arange(10.0).repeat(500, 1)
    draws = sample_next(logits, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {7, 8, 9}
    # at temperature 5 token 9 holds 0.21 of the mass and 9 + 8 hold 0.38: top_p = 0.3 keeps exactly 9 and 8
    draws = sample_next(logits, temperature=5.0, top_p=0.3, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {8, 9}


def check_eos(result: GenerationResult, greedy: torch.Tensor, eos: int, p: int) -> None:
    """Each row equals greedy up to its first eos, then only eos; generation stopped when all rows had one."""
    firsts = []
    for row, ref in zip(result.tokens, greedy):
        gen_ref = ref[p:].tolist()
        first = gen_ref.index(eos) if eos in gen_ref else len(gen_ref)
        firsts.append(first)
        out = row[p:].tolist()
        assert out[: first + 1] == gen_ref[: first + 1]
        assert all(t == eos for t in out[first + 1 :])
    assert result.new_tokens == min(max(firsts) + 1, greedy.shape[1] - p)


def test_eos_stops_each_row() -> None:
    model = random_model(5)
    prompt = torch.randint(0, VOCAB, (3, 5))
    greedy = generate(model, prompt, 24).tokens
    eos = int(greedy[0, 5 + 3])  # row 0 meets eos at its 4th new token (or earlier)
    result = generate(model, prompt, 24, eos_id=eos)
    check_eos(result, greedy, eos, 5)
    # one row that meets eos early stops everything
    single = generate(model, prompt[:1], 24, eos_id=eos)
    assert single.tokens.shape[1] <= 5 + 4 and int(single.tokens[0, -1]) == eos


def test_bad_arguments_raise() -> None:
    model = random_model(6)
    prompt = torch.randint(0, VOCAB, (1, 3))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, prompt[0], 2)
    with pytest.raises(ValueError, match="one sequence"):
        generate_speculative_mtp(model, prompt.repeat(2, 1), 2)


# ---- MTP self-speculative decoding ---------------------------------------------------------------------


def test_speculative_needs_mtp_modules() -> None:
    model = random_model(0, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers = 0"):
        generate_speculative_mtp(model, torch.randint(0, VOCAB, (1, 4)), 5)


class CacheSpy:
    """Wraps a model's new_cache / mtp_forward_cached to keep the cache and the last MTP draft window."""

    def __init__(self, model: DeepseekV3, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cache: list[LatentCache] = []
        self.mtp_end = 0  # one past the last position the final MTP draft pass covered (module 0)
        new_cache, mtp_forward_cached = model.new_cache, model.mtp_forward_cached

        def spy_new_cache(batch: int, max_len: int) -> list[LatentCache]:
            self.cache = new_cache(batch, max_len)
            return self.cache

        def spy_mtp(k: int, h_prev, next_ids, cache, start: int):
            if k == 0:
                self.mtp_end = start + next_ids.shape[1]
            return mtp_forward_cached(k, h_prev, next_ids, cache, start)

        monkeypatch.setattr(model, "new_cache", spy_new_cache)
        monkeypatch.setattr(model, "mtp_forward_cached", spy_mtp)


def check_caches(model: DeepseekV3, spy: CacheSpy, tokens: torch.Tensor) -> None:
    """Main and MTP cache rows equal those of a fresh pass over the committed tokens (no draft left behind).

    Main rows: every position whose token was fed in. MTP module k (0-based) at position j reads token j+k+1,
    so its rows up to the last draft window's end - 1 - k are final.
    """
    n_layers, depth = model.cfg.num_hidden_layers, model.cfg.num_nextn_predict_layers
    length = tokens.shape[1]
    ref = [LatentCache.empty(model.cfg, 1, length, "cpu", torch.float32) for _ in range(n_layers + depth)]
    with torch.no_grad():
        _, h = model.forward_cached(tokens[:, : length - 1], ref, 0)
        h_prev = h
        for k in range(depth):
            h_prev = model.head.mtp[k].forward_cached(
                h_prev[:, : length - 1 - k], model.embed.embed_tokens(tokens[:, k + 1 : length]),
                ref[n_layers + k], 0,
            )
    for i in range(n_layers):
        for got, want in ((spy.cache[i].kv, ref[i].kv), (spy.cache[i].pe, ref[i].pe)):
            torch.testing.assert_close(got[:, : length - 1], want[:, : length - 1], rtol=0, atol=1e-5)
    for k in range(depth):
        rows = spy.mtp_end - k
        assert rows > 0
        c, r = spy.cache[n_layers + k], ref[n_layers + k]
        torch.testing.assert_close(c.kv[:, :rows], r.kv[:, :rows], rtol=0, atol=1e-5)
        torch.testing.assert_close(c.pe[:, :rows], r.pe[:, :rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_equals_greedy_random_weights(
    depth: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = random_model(seed, num_nextn_predict_layers=depth)
    prompt = torch.randint(0, VOCAB, (1, 3 + 2 * seed))
    greedy = generate(model, prompt, 25)
    spy = CacheSpy(model, monkeypatch)
    spec = generate_speculative_mtp(model, prompt, 25)
    assert torch.equal(spec.tokens, greedy.tokens)
    assert spec.new_tokens == 25
    assert 0.0 <= spec.acceptance_rate <= 1.0
    # each verify forward yields 1 + accepted tokens, so the two counters agree
    assert spec.tokens_per_forward == pytest.approx((spec.new_tokens - 1) / (spec.main_forwards - 1))
    check_caches(model, spy, spec.tokens)


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_edge_lengths_and_eos(depth: int) -> None:
    model = random_model(10 + depth, num_nextn_predict_layers=depth)
    prompt = torch.randint(0, VOCAB, (1, 1))  # a one-token prompt: the MTP window starts at position 0
    for n in (0, 1, 2, 3):
        spec = generate_speculative_mtp(model, prompt, n)
        assert torch.equal(spec.tokens, generate(model, prompt, n).tokens)
    greedy = generate(model, prompt, 20).tokens
    for eos in {int(greedy[0, 1 + i]) for i in (0, 4, 9)}:
        spec = generate_speculative_mtp(model, prompt, 20, eos_id=eos)
        assert torch.equal(spec.tokens, generate(model, prompt, 20, eos_id=eos).tokens)
        assert int(spec.tokens[0, -1]) == eos


# A repeating sequence where some tokens recur with different successors, so the next token depends on
# context (attention), not only on the current token.
PATTERN = torch.tensor([5, 9, 5, 17, 9, 40, 17, 3, 40, 60, 3, 9])


def train_on_pattern(depth: int, steps: int = 100, seq_len: int = 24) -> DeepseekV3:
    """A tiny model trained until main model and MTP modules both predict PATTERN: drafts are mostly right."""
    torch.manual_seed(0)
    cfg = small_config(
        num_hidden_layers=2, num_nextn_predict_layers=depth, mtp_loss_weight=1.0, initializer_range=0.02
    )
    model = DeepseekV3(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    period = len(PATTERN)
    for _ in range(steps):
        offsets = torch.randint(0, period, (8,))
        idx = (offsets[:, None] + torch.arange(seq_len + 1 + depth)[None]) % period
        out = model(PATTERN[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_router_biases()
    return model


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_accepts_drafts_of_a_trained_model(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = train_on_pattern(depth)
    model.train()  # generation must switch to eval itself (and switch back)
    for offset in (0, 7):
        prompt = PATTERN[(offset + torch.arange(5)) % len(PATTERN)][None]
        # past the trained length (24) the MTP modules start to miss, so some rounds accept only part of
        # their drafts: that exercises the roll-back paths as well as the accepting ones
        greedy = generate(model, prompt, 40)
        assert torch.equal(greedy.tokens[0, 5:24], PATTERN[(offset + 5 + torch.arange(19)) % len(PATTERN)])
        spy = CacheSpy(model, monkeypatch)
        spec = generate_speculative_mtp(model, prompt, 40)
        assert model.training
        assert torch.equal(spec.tokens, greedy.tokens)
        assert spec.acceptance_rate > 0.5
        assert spec.tokens_per_forward > 1.0
        assert spec.main_forwards < greedy.main_forwards
        model.eval()
        check_caches(model, spy, spec.tokens)
        model.train()

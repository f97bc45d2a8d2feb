"""Autoregressive generation with the compressed (latent) KV cache, plain and MTP self-speculative.

Both functions prefill the prompt with one `forward_cached` call, whose last logits give the first new token,
then decode. Counting conventions, shared by both so their numbers compare:

* `main_forwards` counts every main-model forward, prefill included.
* `tokens_per_forward` counts decode only: (new_tokens - 1) / (main_forwards - 1), i.e. the tokens that
  decode forwards produced per decode forward. The prefill and its token are left out, so plain decoding
  scores exactly 1.0 and MTP speculation scores 1 + (accepted drafts per verify step). 0.0 when no decode
  forward ran (e.g. max_new_tokens == 1).

MTP self-speculation (batch 1). Let the sequence be t_0..t_{L-1}, where the main cache holds positions
0..L-2 and the main hidden states h_0..h_{L-2} are kept. One round:

1. Draft: MTP module k (0-based) at position j reads h^{k-1}_j (h^{-1} = main h) and Emb(t_{j+k+1}) and
   predicts t_{j+k+2}, exactly as in training. At the last position j = L-2 module 0 predicts d_1 = t_L from
   the committed t_{L-1}, module 1 predicts d_2 = t_{L+1} from d_1, and so on up to D drafts.
2. Verify: one main `forward_cached` over [t_{L-1}, d_1, ..., d_m] at positions L-1..L-1+m. Its argmax g_i is
   the main model's greedy choice after d_1..d_i. Accept the n leading drafts with d_i == g_{i-1}, then the
   bonus g_n: n + 1 new tokens, all equal to what greedy decoding would produce.
3. Roll back by position: main cache rows past L-1+n hold rejected drafts and are overwritten by the next
   verify. The MTP caches are fixed in the next draft pass, which recomputes every position whose entry
   may have depended on a draft (module k's entries from L-k-1 on; all modules restart from L-D so each
   module's input hidden is recomputed along with it). The recomputation uses the accepted positions' main
   hidden states, so every MTP cache row i ends up built from (h_i, t_{i+1}, ...) of the committed sequence.

`acceptance_rate` = accepted / proposed drafts, where proposed counts the drafts sent to verification (fewer
than D in the last rounds, so no forward runs past max_new_tokens). Equality with greedy `generate` is exact
in exact arithmetic; in floating point the verify pass computes several positions in one call, so a logit can
differ from single-token decoding in the last bits and flip the argmax at a genuine near-tie.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model.transformer import DeepseekV3


@dataclass
class GenerationResult:
    """tokens [B, P + new_tokens]: prompt then generated ids (rows that hit eos early are padded with eos)."""

    tokens: torch.Tensor
    new_tokens: int  # generated positions per row (columns appended to the prompt)
    main_forwards: int  # main-model forward calls, prefill included
    acceptance_rate: float | None  # accepted / proposed MTP drafts (0.0 if none proposed); None for plain
    tokens_per_forward: float  # decode tokens per decode forward (see module docstring)
    seconds: float


def _check_prompt(prompt_ids: torch.Tensor, max_new_tokens: int) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [batch, prompt_len >= 1], got shape {tuple(prompt_ids.shape)}")
    if prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids must be a LongTensor of token ids, got {prompt_ids.dtype}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def _decode_rate(new_tokens: int, main_forwards: int) -> float:
    decode_forwards = main_forwards - 1
    return (new_tokens - 1) / decode_forwards if decode_forwards > 0 else 0.0


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> ids [B]: argmax when temperature == 0, else a draw after top-k / top-p filtering."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always survives
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def generate(
    model: DeepseekV3,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Decode up to max_new_tokens per row of prompt_ids [B, P] (equal-length prompts) with the KV cache.

    One prefill forward, then one single-token `forward_cached` per further token. A row stops at its first
    eos_id (later positions are filled with eos_id); decoding ends when every row has stopped.
    """
    _check_prompt(prompt_ids, max_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            b, p = prompt_ids.shape
            tokens = prompt_ids
            main_forwards = 0
            if max_new_tokens > 0:
                cache = model.new_cache(b, p + max_new_tokens)
                logits, _ = model.forward_cached(prompt_ids, cache, 0)
                main_forwards = 1
                done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
                out: list[torch.Tensor] = []
                while True:
                    nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
                    if eos_id is not None:
                        nxt = nxt.masked_fill(done, eos_id)
                        done = done | (nxt == eos_id)
                    out.append(nxt)
                    if len(out) == max_new_tokens or bool(done.all()):
                        break
                    logits, _ = model.forward_cached(nxt[:, None], cache, p + len(out) - 1)
                    main_forwards += 1
                tokens = torch.cat([prompt_ids, torch.stack(out, dim=1)], dim=1)
    finally:
        model.train(was_training)
    new = tokens.shape[1] - prompt_ids.shape[1]
    return GenerationResult(
        tokens=tokens, new_tokens=new, main_forwards=main_forwards, acceptance_rate=None,
        tokens_per_forward=_decode_rate(new, main_forwards), seconds=time.perf_counter() - t0,
    )


def generate_speculative_mtp(
    model: DeepseekV3,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
) -> GenerationResult:
    """Greedy decoding of one prompt [1, P]: the MTP modules draft, one main forward per round verifies.

    The tokens equal `generate(model, prompt_ids, max_new_tokens, eos_id=eos_id)` (greedy); only the number
    of main forwards changes. Batch size 1 only: rows would accept different numbers of drafts.
    """
    _check_prompt(prompt_ids, max_new_tokens)
    depth = model.cfg.num_nextn_predict_layers
    if depth == 0:
        raise ValueError(
            "generate_speculative_mtp needs MTP modules to draft with, but this model has "
            "num_nextn_predict_layers = 0; use generate() or a model trained with MTP"
        )
    if prompt_ids.shape[0] != 1:
        raise ValueError(f"generate_speculative_mtp decodes one sequence; got batch {prompt_ids.shape[0]}")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            result = _speculate(model, prompt_ids, max_new_tokens, eos_id, depth)
    finally:
        model.train(was_training)
    tokens, main_forwards, proposed, accepted = result
    new = tokens.shape[1] - prompt_ids.shape[1]
    return GenerationResult(
        tokens=tokens, new_tokens=new, main_forwards=main_forwards,
        acceptance_rate=accepted / proposed if proposed else 0.0,
        tokens_per_forward=_decode_rate(new, main_forwards), seconds=time.perf_counter() - t0,
    )


def _speculate(
    model: DeepseekV3, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None, depth: int
) -> tuple[torch.Tensor, int, int, int]:
    """-> (tokens [1, P + new], main forwards, drafts proposed, drafts accepted). See the module docstring."""
    p = prompt_ids.shape[1]
    if max_new_tokens == 0:
        return prompt_ids, 0, 0, 0
    end = p + max_new_tokens  # sequence length at which decoding stops
    cache = model.new_cache(1, end + depth)
    # buf holds the committed tokens, then the current round's drafts; hidden the main h per position
    buf = prompt_ids.new_zeros(1, end + depth)
    buf[:, :p] = prompt_ids
    logits, h = model.forward_cached(prompt_ids, cache, 0)
    hidden = h.new_zeros(1, end + depth, h.shape[-1])
    hidden[:, :p] = h
    buf[0, p] = logits[0, -1].argmax()
    length = p + 1  # committed tokens; the main cache and `hidden` are valid for positions < length - 1
    main_forwards, proposed, accepted = 1, 0, 0
    if eos_id is not None and int(buf[0, p]) == eos_id:
        return buf[:, :length].clone(), main_forwards, proposed, accepted
    mtp_from = 0  # first position whose MTP cache rows may be stale (may have read a draft)

    while length < end:
        m = min(depth, end - length - 1)  # drafts worth verifying: never run past max_new_tokens
        if m > 0:
            # all D modules run even when m < D, so every MTP cache stays valid for the next round
            h_prev = hidden[:, mtp_from : length - 1]
            for k in range(depth):
                ids = buf[:, mtp_from + k + 1 : length + k]
                mtp_logits, h_prev = model.mtp_forward_cached(k, h_prev, ids, cache, mtp_from)
                buf[0, length + k] = mtp_logits[0, -1].argmax()
            # module k's rows from length - 1 - k on read drafts; recompute them (and the inputs) next time
            mtp_from = max(0, length - depth)

        logits, h = model.forward_cached(buf[:, length - 1 : length + m], cache, length - 1)
        main_forwards += 1
        greedy = logits[0].argmax(dim=-1)  # [m + 1]: the main model's choice after each prefix
        n = 0
        while n < m and int(buf[0, length + n]) == int(greedy[n]):
            n += 1
        buf[0, length + n] = greedy[n]  # bonus token (overwrites the first rejected draft, if any)
        hidden[:, length - 1 : length + n] = h[:, : n + 1]
        keep = n + 1
        if eos_id is not None:
            hits = (buf[0, length : length + keep] == eos_id).nonzero()
            if hits.numel():
                keep = int(hits[0, 0]) + 1
        proposed += m
        accepted += min(n, keep)
        length += keep
        if eos_id is not None and int(buf[0, length - 1]) == eos_id:  # eos was a draft or the bonus
            break
    return buf[:, :length].clone(), main_forwards, proposed, accepted

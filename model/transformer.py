"""The DeepSeek-V3 model, as an ordered list of pipeline pieces.

    EmbeddingPiece -> DecoderBlock x num_hidden_layers -> HeadPiece (final norm, head, MTP, losses)

Every piece is called as `piece(x, mb)` where `x` is the hidden state from the previous piece (None for the
embedding) and `mb` the `MicroBatch` context: the token ids the first and last pieces need, and the place
where pieces leave side outputs (balance losses, router counts, loss parts, logits). The monolithic forward
runs the pieces in order, so a pipeline that cuts the list into stages runs exactly the same code.

Sample layout: tokens [B, S + 1 + D] for sequence length S and MTP depth D. Inputs are tokens[:, :S], LM
labels tokens[:, 1:S+1], and MTP module k (1-based) reads tokens[:, k:S+k] and predicts tokens[:, k+1:S+k+1].
loss_mask (same shape as tokens) marks which tokens are valid targets. segments / positions (same shape, optional:
data.document_mask) keep attention and targets inside each packed document (model/documents.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import LatentCache
from model.block import BlockAux, DecoderBlock
from model.compiled import regional
from model.config import ModelConfig
from model.documents import Documents, combine_masks
from model.gemm import GemmBackend, GroupedLinear, Linear
from model.head_loss import head_token_losses
from model.mtp import MTPModule
from model.norm import RMSNorm
from model.rope import RotaryEmbedding
from model.sequence_shard import SequenceShard, span


@dataclass
class MicroBatch:
    """Per-microbatch context shared by the pieces: inputs, and the side outputs they record."""

    tokens: torch.Tensor  # [B, S + 1 + D] for training, [B, S] for scoring
    seq_len: int
    loss_mask: torch.Tensor | None = None
    segments: torch.Tensor | None = None  # document index per token (packed documents kept apart), or None
    positions: torch.Tensor | None = None  # RoPE position per token (restarting per document), or None
    compute_loss: bool = True
    keep_logits: bool = False
    # side outputs (keyed by layer index, so a pipeline stage can pick out the losses of its own blocks)
    balance_losses: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> tokens per expert
    lm_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    span: tuple[int, int] | None = None  # the positions [start, end) the head computed (context parallelism)

    _documents: Documents | None = field(default=None, repr=False)

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], seq_len: int, device: torch.device | str | None = None,
                   **flags: bool) -> MicroBatch:
        """The context of a reader microbatch ({"tokens", "loss_mask"[, "segments"[, "positions"]]}) on `device`."""
        def get(key: str) -> torch.Tensor | None:
            t = batch.get(key)
            return None if t is None else t.to(device) if device is not None else t

        return cls(tokens=get("tokens"), seq_len=seq_len, loss_mask=get("loss_mask"), segments=get("segments"),
                   positions=get("positions"), **flags)

    def target_mask(self, offset: int) -> torch.Tensor | None:
        """The mask of the targets at `offset` (1: the main head, k + 1: MTP depth k): padding and documents."""
        return combine_masks(self.loss_mask, self.documents, self.seq_len, offset)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[:, : self.seq_len]

    @property
    def documents(self) -> Documents | None:
        """The packed-document structure (its attention mask is built once per microbatch), or None."""
        if self._documents is None and self.segments is not None:
            self._documents = Documents(self.segments, self.positions)
        return self._documents

    def record(self, layer_idx: int, aux: BlockAux) -> None:
        if aux.counts is not None:
            self.counts[layer_idx] = aux.counts
        if aux.balance_loss is not None:
            self.balance_losses[layer_idx] = aux.balance_loss

    @property
    def balance_loss(self) -> torch.Tensor | None:
        """Sum of the balance losses of every block run so far (in layer order)."""
        if not self.balance_losses:
            return None
        return torch.stack([self.balance_losses[i] for i in sorted(self.balance_losses)]).sum()


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # lm + (lambda / D) * sum(mtp) + balance: what backward runs on
    lm_loss: torch.Tensor | None
    mtp_losses: list[torch.Tensor]
    balance_loss: torch.Tensor | None
    logits: torch.Tensor | None
    counts: dict[int, torch.Tensor]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: logits [B, S, V], targets [B, S] -> [B x S]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over the tokens where mask is set."""
    return mean_token_loss(token_cross_entropy(logits, targets), mask, None)


def mean_token_loss(losses: torch.Tensor, mask: torch.Tensor | None, shard: SequenceShard | None) -> torch.Tensor:
    """The mean of per-token losses over the tokens where mask is set. Under context parallelism (`shard`) this
    rank's share of the whole group's token mean, scaled by the group size, so the mean over the group (the
    data-parallel average) is the global mean."""
    losses = losses.flatten()
    if mask is None:  # equal parts, all targets: the mean of the parts' means is the mean
        return losses.mean()
    mask = mask.flatten().to(losses.dtype)
    if shard is None:
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)
    count = shard.exchange.sum(mask.sum().detach())
    return (losses * mask).sum() * shard.size / count.clamp(min=1.0)


def sharded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                          shard: SequenceShard | None, compile: bool = False) -> torch.Tensor:
    """`masked_cross_entropy` of this rank's part of the sequences (`mean_token_loss`); `compile`: the fp32 cast
    and log-softmax fused by torch.compile (`model.compile_regions`)."""
    losses = regional(token_cross_entropy, compile, logits.device)(logits, targets)
    return mean_token_loss(losses, mask, shard)


class EmbeddingPiece(nn.Module):
    """token ids -> h [B, S, hidden]. HF name: model.embed_tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.sequence_shard: SequenceShard | None = None

    def forward(self, x: torch.Tensor | None, mb: MicroBatch) -> torch.Tensor:
        start, end = span(self.sequence_shard, mb.seq_len)
        return self.embed_tokens(mb.tokens[:, start:end])


class BlockPiece(nn.Module):
    """A decoder block as a piece: records its counts and balance loss into the microbatch."""

    def __init__(self, block: DecoderBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        h, aux = self.block(x, mb.documents)
        mb.record(self.block.layer_idx, aux)
        return h


class HeadPiece(nn.Module):
    """h [B, S, hidden] -> lm + (lambda / D) * sum(mtp) (scalar), or logits: final norm, head, MTP modules.

    Balance losses are not added here: each block records its own in the MicroBatch, and whoever runs the
    block's backward (the monolithic forward below, or a pipeline stage) adds them.

    The MTP modules read the embedding table, so this piece holds a reference to the embedding module
    (a pipeline that puts this piece on another rank than the embedding must tie the two weights).
    """

    def __init__(self, cfg: ModelConfig, embedding: EmbeddingPiece, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile_regions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k, rope) for k in range(cfg.num_nextn_predict_layers)
        )
        self._embedding = [embedding]  # a list, so the shared module is not registered twice
        self.sequence_shard: SequenceShard | None = None

    @property
    def embedding(self) -> EmbeddingPiece:
        return self._embedding[0]

    def tie_embedding(self, embedding: EmbeddingPiece) -> None:
        self._embedding[0] = embedding

    def forward(self, h: torch.Tensor, mb: MicroBatch) -> torch.Tensor | None:
        shard = self.sequence_shard
        a, b = mb.span = span(shard, mb.seq_len)  # this rank's positions (all of them without a shard)
        h = self.norm(h)  # the MTP modules read the normed state, as transformers and vLLM feed them
        # chunked: the loss without the [tokens, vocab] logits (model/head_loss.py); not when they are asked for
        chunked = (self.cfg.chunked_head_loss and mb.compute_loss and not mb.keep_logits
                   and type(self.lm_head.backend).fprop is GemmBackend.fprop)  # plain numerics (see head_loss)
        logits = None if chunked else self.lm_head(h)
        if mb.keep_logits:
            mb.logits = logits
        if not mb.compute_loss:
            return None

        def loss(h_normed: torch.Tensor, logits: torch.Tensor | None, offset: int) -> torch.Tensor:
            """The head's loss against the targets `offset` tokens ahead (from h_normed when chunked)."""
            mask = mb.target_mask(offset)
            mask = None if mask is None else mask[:, a:b]
            targets = mb.tokens[:, a + offset : b + offset]
            if logits is None:
                return mean_token_loss(head_token_losses(h_normed, self.lm_head.weight, targets), mask, shard)
            return sharded_cross_entropy(logits, targets, mask, shard, self.cfg.compile_regions)

        docs = mb.documents
        mb.lm_loss = loss(h, logits, 1)
        total = mb.lm_loss
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            emb = self.embedding.embed_tokens(mb.tokens[:, a + k : b + k])
            h_prev, aux = module(h_prev, emb, docs)
            mb.record(module.block.layer_idx, aux)
            mtp_h = module.shared_head.norm(h_prev)
            mtp_logits = None if chunked else self.lm_head(mtp_h)
            if mb.keep_logits:
                mb.mtp_logits.append(mtp_logits)
            mb.mtp_losses.append(loss(mtp_h, mtp_logits, k + 1))
        if mb.mtp_losses:
            total = total + (self.cfg.mtp_loss_weight / len(self.mtp)) * torch.stack(mb.mtp_losses).sum()
        return total


class DeepseekV3(nn.Module):
    """The full network. Parameter names follow HF without the `model.` prefix handling (see model/hf.py)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # drawn first from the global generator (on CPU even under a meta-device context), so ranks that
        # seeded alike agree; every parameter's init then depends only on this seed and its own name
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.rope = RotaryEmbedding(cfg)
        self.embed = EmbeddingPiece(cfg)
        self.layers = nn.ModuleList(BlockPiece(DecoderBlock(cfg, i, self.rope)) for i in range(cfg.num_hidden_layers))
        self.head = HeadPiece(cfg, self.embed, self.rope)
        if self.embed.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every projection, expert, router and embedding; norms to one.

        Each weight draws from its own generator seeded by (init_seed, parameter name): a pipeline rank that
        builds only its stages (on the meta device, then `to_empty`) gets exactly the single-process weights.
        """
        from model.router import Router

        std = self.cfg.initializer_range
        for name, m in self.named_modules():
            if isinstance(m, Linear | GroupedLinear | nn.Embedding | Router):
                gen = torch.Generator(device=m.weight.device)
                gen.manual_seed(self.init_seed ^ zlib.crc32(f"{name}.weight".encode()))
                with torch.no_grad():
                    nn.init.normal_(m.weight, mean=0.0, std=std, generator=gen)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()
                m.step_counts.zero_()

    # ---- pieces ------------------------------------------------------------------------------------
    def pieces(self) -> list[nn.Module]:
        """Embedding, every decoder block, head: the units a pipeline cuts into stages."""
        return [self.embed, *self.layers, self.head]

    def run_pieces(self, mb: MicroBatch) -> torch.Tensor | None:
        x = None
        for piece in self.pieces():
            x = piece(x, mb)
        return x

    def forward(
        self, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None, return_logits: bool = False,
        segments: torch.Tensor | None = None, positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Training forward. tokens [B, S + 1 + D] (see module docstring)."""
        seq_len = tokens.shape[1] - 1 - self.cfg.num_nextn_predict_layers
        if seq_len < 1:
            raise ValueError(
                f"tokens has {tokens.shape[1]} positions; training needs seq_len + 1 + mtp_depth "
                f"(mtp_depth = {self.cfg.num_nextn_predict_layers})"
            )
        mb = MicroBatch(tokens=tokens, seq_len=seq_len, loss_mask=loss_mask, keep_logits=return_logits,
                        segments=segments, positions=positions)
        loss = self.run_pieces(mb)
        if mb.balance_losses:
            loss = loss + mb.balance_loss
        return ModelOutput(
            loss=loss, lm_loss=mb.lm_loss, mtp_losses=mb.mtp_losses, balance_loss=mb.balance_loss,
            logits=mb.logits, counts=mb.counts,
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Main-model logits [B, S, vocab] for input_ids [B, S] (no MTP, no loss)."""
        mb = MicroBatch(tokens=input_ids, seq_len=input_ids.shape[1], compute_loss=False, keep_logits=True)
        self.run_pieces(mb)
        return mb.logits

    # ---- load balancing ------------------------------------------------------------------------------
    def routers(self) -> list[nn.Module]:
        from model.router import Router

        return [m for m in self.modules() if isinstance(m, Router)]

    def restore_router_precision(self) -> None:
        """After casting the whole model (e.g. to bf16): the routers' bias back to fp32 and their count
        accumulators to fp64. A bf16 bias cannot absorb the 0.001 steps of the auxiliary-loss-free balancing."""
        for router in self.routers():
            router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
            router.step_counts.data = router.step_counts.data.double()

    @torch.no_grad()
    def update_router_biases(self, gamma: float | None = None) -> None:
        """Apply the bias update to every MoE layer from its accumulated step_counts (then cleared)."""
        for router in self.routers():
            router.update_bias(gamma=gamma)

    # ---- inference with the compressed cache -------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> list[LatentCache]:
        """One latent cache per decoder block, then one per MTP module."""
        p = self.embed.embed_tokens.weight
        n = self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers
        return [LatentCache.empty(self.cfg, batch, max_len, p.device, p.dtype) for _ in range(n)]

    def forward_cached(
        self, input_ids: torch.Tensor, cache: list[LatentCache], start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [start, start + S) -> (logits [B, S, vocab], final-normed hidden state [B, S, hidden])."""
        h = self.embed.embed_tokens(input_ids)
        for i, piece in enumerate(self.layers):
            h = piece.block.forward_cached(h, cache[i], start)
        h = self.head.norm(h)
        return self.head.lm_head(h), h

    def mtp_forward_cached(
        self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: list[LatentCache], start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k (0-based) at positions [start, start + S): (logits, hidden)."""
        module = self.head.mtp[k]
        emb = self.embed.embed_tokens(next_ids)
        h = module.forward_cached(h_prev, emb, cache[self.cfg.num_hidden_layers + k], start)
        return self.head.lm_head(module.shared_head.norm(h)), h

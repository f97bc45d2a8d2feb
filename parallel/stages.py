"""Cutting the model's pieces into pipeline stages.

Stage s of S holds decoder blocks [s*L/S, (s+1)*L/S); stage 0 also holds the embedding, stage S-1 the head
(final norm, output head, MTP). A stage runs its pieces in order and keeps, per microbatch, the input and
output of every piece with the boundaries detached: backward can then run piece by piece, which is what lets
an overlapped F&B pair interleave one microbatch's forward pieces with another's backward pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import BlockPiece, DeepseekV3, HeadPiece, MicroBatch
from parallel.ep_overlap import block_substeps, overlappable


class StageError(ValueError):
    """A model that cannot be cut as asked; the message names the key and the fix."""


def check_divisible(cfg: ModelConfig, num_stages: int, key: str = "parallel.pp") -> None:
    if cfg.num_hidden_layers % num_stages:
        raise StageError(
            f"{key}: {cfg.num_hidden_layers} decoder layers do not split into {num_stages} equal pipeline "
            f"stages; choose a stage count that divides model.num_hidden_layers"
        )


def stage_pieces(model: DeepseekV3, stage: int, num_stages: int) -> list[nn.Module]:
    check_divisible(model.cfg, num_stages)
    per = model.cfg.num_hidden_layers // num_stages
    pieces: list[nn.Module] = []
    if stage == 0:
        pieces.append(model.embed)
    pieces.extend(model.layers[stage * per : (stage + 1) * per])
    if stage == num_stages - 1:
        pieces.append(model.head)
    return pieces


def run_to_end(steps: Generator) -> object:
    """Run a piece-by-piece generator to completion; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def run_pair(backward: Generator, forward: Generator) -> None:
    """An overlapped F&B pair: one step of `backward`, one of `forward`, and so on until both are done.
    Backward goes first, so every all-to-all an EP block posts is followed by a heavy sub-step of the other
    microbatch (parallel/ep_overlap.py shows the resulting order)."""
    live = [backward, forward]
    while live:
        for gen in list(live):
            try:
                next(gen)
            except StopIteration:
                live.remove(gen)


@dataclass
class PieceRecord:
    """What one piece kept of one microbatch: its (detached, grad-requiring) input and its output."""

    inp: torch.Tensor | None
    out: torch.Tensor | None
    balance: list[torch.Tensor] = field(default_factory=list)
    backward: Callable | None = None  # a sub-step piece's own backward generator (parallel/ep_overlap.py)


class Stage(nn.Module):
    """One pipeline stage: a contiguous run of pieces. Holds per-microbatch records between F and B."""

    def __init__(self, pieces: list[nn.Module], stage: int, num_stages: int, overlap_ep: bool = True) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.stage, self.num_stages = stage, num_stages
        self._records: dict[int, list[PieceRecord]] = {}
        # expert-parallel MoE blocks run as sub-steps that yield at every all-to-all (parallel/ep_overlap.py)
        self._substep_blocks = {i for i, p in enumerate(pieces)
                                if overlap_ep and isinstance(p, BlockPiece) and overlappable(p.block)}

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    # ---- forward, piece by piece ---------------------------------------------------------------------
    def forward_steps(self, x: torch.Tensor | None, mb: MicroBatch, key: int):
        """A generator: each `next` runs one piece. The stage output is the generator's return value."""
        records = self._records[key] = []
        for index, piece in enumerate(self.pieces):
            inp = None if x is None else x.detach().requires_grad_(x.is_floating_point())
            if index in self._substep_blocks and torch.is_grad_enabled():
                out, backward = yield from block_substeps(piece.block, inp, mb)
                records.append(PieceRecord(inp=inp, out=out, backward=backward))  # it seeds its balance loss
            else:
                before = set(mb.balance_losses)
                out = piece(inp, mb)
                own = [mb.balance_losses[i] for i in sorted(set(mb.balance_losses) - before)]
                records.append(PieceRecord(inp=inp, out=out, balance=own))
            x = out
            yield
        return x

    def forward(self, x: torch.Tensor | None, mb: MicroBatch, key: int) -> torch.Tensor | None:
        return run_to_end(self.forward_steps(x, mb, key))

    # ---- backward, piece by piece --------------------------------------------------------------------
    def backward_steps(self, grad_out: torch.Tensor | None, key: int, loss_scale: float,
                       piece_done: Callable[[int], None] | None = None):
        """A generator running the backward of microbatch `key` piece by piece, last first. For the last
        stage `grad_out` is None and the output (the loss) is seeded with `loss_scale`; every piece adds its
        blocks' balance losses, also scaled. `piece_done(index)` hears of each piece whose backward has run.
        Returns the gradient w.r.t. the stage input (None on stage 0)."""
        records = self._records.pop(key)
        grad = grad_out
        for index in reversed(range(len(records))):
            rec = records[index]
            if rec.backward is not None:
                yield from rec.backward(grad, loss_scale)
                grad = rec.inp.grad
                if piece_done is not None:
                    piece_done(index)
                yield
                continue
            outputs, grads = [], []
            if rec.out is not None and rec.out.requires_grad:
                outputs.append(rec.out)
                grads.append(torch.full_like(rec.out, loss_scale) if grad is None else grad)
            for b in rec.balance:
                outputs.append(b)
                grads.append(torch.full_like(b, loss_scale))
            if outputs:
                torch.autograd.backward(outputs, grads)
            grad = None if rec.inp is None else rec.inp.grad
            if piece_done is not None:
                piece_done(index)
            yield
        return grad

    def final_after_piece(self) -> dict[int, list[nn.Parameter]]:
        """{piece index: the trainable parameters no piece run after it in backward reads}: in a backward that
        computes its weight-gradients inline, their gradients are complete once that piece is done (a parameter
        several pieces read, as the embedding the head's MTP reads, counts at the last of them, the one nearest
        the input). The embedding the head reads on another stage is listed under the head: this stage is done
        with it there, and the reduction waits for every chunk writing it (parallel/grad_reduce.py)."""
        last: dict[int, tuple[int, nn.Parameter]] = {}
        for index in reversed(range(len(self.pieces))):
            for p in written_parameters(self.pieces[index]):
                if p.requires_grad:
                    last[id(p)] = (index, p)
        out: dict[int, list[nn.Parameter]] = {}
        for index, p in last.values():
            out.setdefault(index, []).append(p)
        return out

    def backward(self, grad_out: torch.Tensor | None, key: int, loss_scale: float) -> torch.Tensor | None:
        return run_to_end(self.backward_steps(grad_out, key, loss_scale))

    def drop(self, key: int) -> None:
        """Forget a microbatch's records (forward-only evaluation)."""
        self._records.pop(key, None)


def written_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters `module`'s backward writes: its own, and the embedding table a head in it reads for MTP
    through an unregistered reference (`HeadPiece.embedding`). May list the embedding twice."""
    read = [p for m in module.modules() if isinstance(m, HeadPiece) for p in m.embedding.parameters()]
    return [*module.parameters(), *read]


def build_stage(model: DeepseekV3, stage: int, num_stages: int) -> Stage:
    return Stage(stage_pieces(model, stage, num_stages), stage, num_stages)


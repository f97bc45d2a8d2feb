"""The `1f1b` schedule: the same model through DeepSpeed's own `PipelineModule` / `PipelineEngine`.

This is the baseline users know, kept as close to DeepSpeed's idiom as the model allows; it also builds the
model for DeepSpeed's `DualPipeVModule` / `DualPipeVEngine` (a peer in bench/pipeline.py).

How the model becomes a list of `LayerSpec`s:
- [embedding, block 0 .. block L-1, (embedding again, when MTP is on), head]. Stages are cut with
  `partition_method="type:BlockLayer"`: DeepSpeed balances the number of decoder blocks per stage, so every
  stage holds L/S blocks, the embedding goes with stage 0 and the head with the last stage. (`uniform` would
  count the embedding and head as layers; `parameters` would build every layer on every rank to count them.)
- The activation tuple is (hidden, tokens, loss_mask[, segments[, positions]]): the token ids ride along as an
  integer tensor, so the last stage has the LM labels and the MTP future tokens (packed documents: every stage
  has their boundaries). DeepSpeed sends every tensor of the tuple and sends
  gradients back only for the floating-point ones.
- The MTP modules on the last stage read the embedding table that lives on stage 0: both places use a
  `TiedLayerSpec("embed", ...)`, so DeepSpeed builds a copy on the last stage, broadcasts stage 0's weights to
  it, and all-reduces the two copies' gradients before the step (`ReduceTiedGrads`); the second copy is marked
  `ds_pipe_replicated`, so the grad norm counts it once. On the last stage the tied layer's forward is the
  identity; the head reaches the table through `HeadPiece.embedding` (the same module object).
- Balance losses: DeepSpeed backpropagates only a stage's outputs (and the loss on the last stage). A block on
  another stage passes its hidden state through `SeedBalanceGrad`, whose backward also seeds the block's
  balance loss with the gradient DeepSpeed gives the loss (1 / gradient_accumulation_steps). Blocks of the
  last stage add their balance losses to the engine's loss, which is LM + (lambda / D) * sum(MTP) + those.
- Losses for the trainer: one all-reduce (sum) over the pipe group of [loss, LM, balance, MTP...], where only
  the loss stage holds LM/MTP (so they reach every rank as from a broadcast) and every stage adds its blocks'
  balance losses: each rank returns the same `StepLosses` as `PipelineSchedule` does.
- Timeline: DeepSpeed's ForwardPass / BackwardPass instructions are timed (`record_next_step`).

Weights: the schedule receives this rank's `DeepseekV3` from parallel/rank_model.py (its stage, plus the tied
embedding copy on the last stage when MTP is on), so `schedule.model` keeps the single-process parameter names
(the pipeline layers hold the same parameter objects).
"""


from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.transformer import BlockPiece, DeepseekV3, EmbeddingPiece, HeadPiece, MicroBatch
from parallel.expert_groups import deepspeed_moe_support, finish_deepspeed_moe
from parallel.network_model import timeline_now
from parallel.runtime import TimelineEvent
from parallel.step_schedule import OnLastStage, PipelineSpec, StepLosses, StepSchedule

PARTITION_METHOD = "type:BlockLayer"


class RankState:
    """What the layers of one rank share: the last stage's balance losses waiting for the head, the gradient
    seed for balance losses, and the detached per-microbatch losses for reporting."""

    def __init__(self) -> None:
        self.pending_balance: list[torch.Tensor] = []
        self.grad_scale: Callable[[], float] = lambda: 1.0
        self.on_last_stage: Callable[[int, MicroBatch], None] | None = None  # forward_only's callback
        self.reset()

    def reset(self) -> None:
        # detached tensors (no device sync per microbatch): lm + (lambda / D) * sum(mtp) per microbatch on the
        # loss stage, its parts, and the balance losses of this rank's blocks
        self.loss: list[torch.Tensor] = []
        self.lm: list[torch.Tensor] = []
        self.mtp: list[list[torch.Tensor]] = []
        self.balance: list[torch.Tensor] = []


class SeedBalanceGrad(torch.autograd.Function):
    """Identity on the hidden state; its backward also returns a gradient for the balance loss, so a block's
    balance loss is backpropagated with the hidden state although DeepSpeed never sees it."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, balance: torch.Tensor, state: RankState) -> torch.Tensor:
        ctx.state = state
        ctx.balance_like = (balance.dtype, balance.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        dtype, device = ctx.balance_like
        return grad_h, torch.full((), ctx.state.grad_scale(), dtype=dtype, device=device), None


def _unpack(inputs: Any) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(hidden, tokens, extras) from a pipeline tuple: (hidden, tokens, *extras), the first stage's without the
    hidden; extras are (loss_mask[, segments[, positions]]) as `_to_engine_batch` packed them."""
    if torch.is_tensor(inputs):
        return None, inputs, ()
    inputs = tuple(inputs)
    if inputs[0].is_floating_point():
        return inputs[0], inputs[1], inputs[2:]
    return None, inputs[0], inputs[1:]


def _pack(h: torch.Tensor, tokens: torch.Tensor, extras: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (h, tokens, *extras)


def _microbatch(tokens: torch.Tensor, extras: tuple[torch.Tensor, ...], seq_len: int, **flags: bool) -> MicroBatch:
    """The model's context of one microbatch from the tuple's extras (the mask travels as integers)."""
    names = ("loss_mask", "segments", "positions")
    batch = {"tokens": tokens, **dict(zip(names, extras))}
    return MicroBatch.from_batch(batch, seq_len, **flags)


class EmbedLayer(nn.Module):
    """The tied embedding (one per rank that needs the table)."""

    def __init__(self, piece: EmbeddingPiece, seq_len: int) -> None:
        super().__init__()
        self.piece, self.seq_len = piece, seq_len


def _embed_forward(layer: EmbedLayer, inputs: Any) -> tuple[torch.Tensor, ...]:
    _, tokens, extras = _unpack(inputs)
    h = layer.piece(None, MicroBatch(tokens=tokens, seq_len=layer.seq_len))
    return _pack(h, tokens, extras)


def _tied_copy_forward(layer: EmbedLayer, inputs: Any) -> Any:
    """The last stage's copy of the table only exists for the MTP modules (they read it via the head)."""
    return inputs


class BlockLayer(nn.Module):
    """A decoder block on the pipeline tuple. `on_loss_stage`: its balance loss goes into the engine's loss
    (through the head); otherwise it is seeded by `SeedBalanceGrad`."""

    def __init__(self, piece: BlockPiece, seq_len: int, state: RankState, on_loss_stage: bool) -> None:
        super().__init__()
        self.piece, self.seq_len, self.state, self.on_loss_stage = piece, seq_len, state, on_loss_stage

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, tokens, extras = _unpack(inputs)
        mb = _microbatch(tokens, extras, self.seq_len)
        h = self.piece(h, mb)
        balance = mb.balance_losses.get(self.piece.block.layer_idx)
        if balance is not None and torch.is_grad_enabled():
            self.state.balance.append(balance.detach())
            if self.on_loss_stage:
                self.state.pending_balance.append(balance)
            else:
                h = SeedBalanceGrad.apply(h, balance, self.state)
        return _pack(h, tokens, extras)


class HeadLayer(nn.Module):
    """Final norm, head and MTP (`HeadPiece`) -> the engine's loss for this microbatch."""

    def __init__(self, piece: HeadPiece, seq_len: int, state: RankState) -> None:
        super().__init__()
        self.piece, self.seq_len, self.state = piece, seq_len, state

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h, tokens, extras = _unpack(inputs)
        state = self.state
        mb = _microbatch(tokens, extras, self.seq_len, keep_logits=state.on_last_stage is not None)
        loss = self.piece(h, mb)
        state.loss.append(loss.detach())
        state.lm.append(mb.lm_loss.detach())
        state.mtp.append([m.detach() for m in mb.mtp_losses])
        if state.on_last_stage is not None:  # microbatches reach the loss stage in order
            state.on_last_stage(len(state.loss) - 1, mb)
        # the MTP blocks' balance losses (recorded by the head) and the loss stage's own blocks'
        balance = [*state.pending_balance, *(mb.balance_losses[i] for i in sorted(mb.balance_losses))]
        state.pending_balance = []
        if torch.is_grad_enabled():
            state.balance.extend(mb.balance_losses[i].detach() for i in sorted(mb.balance_losses))
        if balance:
            loss = loss + torch.stack(balance).sum()
        return loss


def layer_specs(model: DeepseekV3, held_stages: list[int], num_stages: int, seq_len: int,
                state: RankState) -> list:
    """The LayerSpecs of the whole model; only the held stages' specs are ever built (by DeepSpeed)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = model.cfg
    per = cfg.num_hidden_layers // num_stages
    last = num_stages - 1
    embed = model.embed if isinstance(model.embed, EmbeddingPiece) else None
    specs: list = [TiedLayerSpec("embed", EmbedLayer, embed, seq_len, forward_fn=_embed_forward,
                                 tied_weight_attr=["piece.embed_tokens.weight"])]
    for i in range(cfg.num_hidden_layers):
        piece = model.layers[i] if isinstance(model.layers[i], BlockPiece) else None
        specs.append(LayerSpec(BlockLayer, piece, seq_len, state, i // per == last))
    if cfg.num_nextn_predict_layers:
        specs.append(TiedLayerSpec("embed", EmbedLayer, embed, seq_len, forward_fn=_tied_copy_forward,
                                   tied_weight_attr=["piece.embed_tokens.weight"]))
    head = model.head if isinstance(model.head, HeadPiece) else None
    specs.append(LayerSpec(HeadLayer, head, seq_len, state))
    return specs


def _to_engine_batch(batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """{"tokens", "loss_mask"[, "segments"[, "positions"]]} -> DeepSpeed's (inputs, labels); the mask travels as
    integers (DeepSpeed would send a gradient back for a floating-point tensor)."""
    tokens = batch["tokens"]
    extras = []
    for key in ("loss_mask", "segments", "positions"):  # each one only with the ones before it
        if batch.get(key) is None:
            break
        extras.append(batch[key].to(tokens.dtype))
    return (tokens, *extras), tokens  # labels: unused (the head computes the loss) but the last stage loads them


class DeepSpeedPipeSchedule(StepSchedule):
    """DeepSpeed's PipelineEngine (or, in bench/, its DualPipeVEngine) behind `StepSchedule`; `model` is this
    rank's `DeepseekV3` (single-process parameter names) whose pieces the pipeline layers wrap."""

    kind = "1f1b"

    def __init__(self, model: DeepseekV3, spec: PipelineSpec) -> None:
        import deepspeed
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        # PipelineModule talks to deepspeed.comm before deepspeed.initialize would set it up; with torch's
        # process group already running this only wraps it
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        topo = spec.topo
        pp, dp = topo.pp, topo.dp
        self.spec, self.topo, self.cfg, self.microbatches, self.pp, self.dp = (
            spec, topo, model.cfg, spec.microbatches, pp, dp)
        num_stages = self._num_stages(pp)
        self.held_stages = self._held_stages(topo.pipe_rank, pp)
        self.state = RankState()
        self.model = model
        specs = layer_specs(model, self.held_stages, num_stages, spec.seq_len, self.state)
        # no_grad: DeepSpeed broadcasts the tied weights in place while building; recorded by autograd, that
        # broadcast would become part of the embedding's backward graph (torch warns on every step).
        # stdout: DeepSpeed prints the layer partition; it is fixed here (L/S blocks per stage, checked below)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            module = self._module_cls()(specs, topology=PipeDataParallelTopology(num_pp=pp, num_dp=dp),
                                        partition_method=PARTITION_METHOD)
        per = model.cfg.num_hidden_layers // num_stages
        want = [0, *(1 + per * s for s in range(1, num_stages)), len(specs)]  # spec 0 is the embedding
        if [int(p) for p in module.parts] != want:  # the pruning of the rank model assumed this cut
            raise RuntimeError(f"DeepSpeed partitioned the layers as {module.parts}, expected {want}")

        ds_config = dict(spec.ds_config)
        ds_config.update(train_batch_size=spec.micro_batch_size * spec.microbatches * dp,
                         train_micro_batch_size_per_gpu=spec.micro_batch_size,
                         gradient_accumulation_steps=spec.microbatches)
        # expert parallelism: the pipeline module holds this rank's expert shard (parallel/rank_model.py); the
        # marker makes ZeRO-1 reduce expert gradients over the expert-DP groups, as for the other schedules.
        # The dispatch is synchronous: each MoE block's all-to-alls run inside DeepSpeed's forward and
        # backward instructions, in the same order on every rank of a stage's data group (1F1B's order
        # depends on the pipe rank only), so the collectives pair up
        with deepspeed_moe_support(module):
            self.engine, _, _, _ = deepspeed.initialize(
                model=module, model_parameters=_in_module_order(spec.param_groups, module), config=ds_config,
                lr_scheduler=spec.lr_scheduler(),
            )
        if getattr(self.engine, "has_moe_layers", False):
            finish_deepspeed_moe(self.engine)
        # what DeepSpeed seeds the last stage's loss with: loss / gradient_accumulation_steps
        self.state.grad_scale = lambda: 1.0 / self.engine.gradient_accumulation_steps()
        self.pipe_rank, self.device = topo.pipe_rank, spec.device
        self.timeline_events: list[TimelineEvent] = []
        self.recording = spec.record_timeline
        self._time_instructions()

    # ---- what differs between DeepSpeed's two pipeline engines ----------------------------------------
    @staticmethod
    def _num_stages(pp: int) -> int:
        return pp

    @staticmethod
    def _held_stages(pipe_rank: int, pp: int) -> list[int]:
        return [pipe_rank]

    @staticmethod
    def _module_cls():
        from deepspeed.pipe import PipelineModule

        return PipelineModule

    # ---- the StepSchedule interface ----------------------------------------------------------------------
    @property
    def rank_model(self) -> nn.Module:
        return self.model

    @property
    def counts_group(self):
        """The data-parallel group of this pipe rank: it holds the same routers."""
        return self.engine.grid.get_data_parallel_group()

    def train_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepLosses:
        # every rank takes its microbatches (as PipelineSchedule does); DeepSpeed reads them on the first and
        # last stage only
        data = [_to_engine_batch(next(batches)) for _ in range(self.microbatches)]
        self.state.reset()
        self.engine.train_batch(iter(data))
        return self._reduce_losses()

    def _reduce_losses(self) -> StepLosses:
        """LM/MTP losses from the loss stage (zeros elsewhere) and balance losses from every stage, summed over
        the pipeline group: every rank gets the step's mean losses."""
        depth = self.cfg.num_nextn_predict_layers
        vec = torch.zeros(3 + depth, dtype=torch.float64, device=self.device)
        s = self.state

        def total(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(values).double().sum() if values else vec.new_zeros(())

        vec[0], vec[1], vec[2] = total(s.loss), total(s.lm), total(s.balance)
        for k in range(depth):
            vec[3 + k] = total([row[k] for row in s.mtp])
        if self.pp > 1:
            dist.all_reduce(vec, group=self.engine.grid.get_pipe_parallel_group())
        vec /= self.microbatches
        return StepLosses(
            loss=(vec[0] + vec[2]).float(), lm_loss=vec[1].float(), mtp_losses=[v.float() for v in vec[3:]],
            balance_loss=vec[2].float(), microbatches=self.microbatches,
        )

    @torch.no_grad()
    def forward_only(self, batches: list[dict[str, torch.Tensor]], on_last_stage: OnLastStage) -> None:
        """Evaluation through DeepSpeed's inference schedule."""
        state, recording = self.state, self.recording
        state.reset()
        state.on_last_stage, self.recording = on_last_stage, False  # the timeline is of training steps
        try:
            self.engine.eval_batch(iter([_to_engine_batch(b) for b in batches]), num_micro_batches=len(batches),
                                   bcast_loss=False)
        finally:
            state.on_last_stage, self.recording = None, recording

    # ---- timeline --------------------------------------------------------------------------------------
    def record_next_step(self) -> None:
        """Time every compute instruction of the next `train_batch` (see `take_timeline`)."""
        self.timeline_events = []
        self.recording = True

    def take_timeline(self) -> list[TimelineEvent]:
        """The recorded events of this rank (TimelineEvent), and recording off again."""
        self.recording = False
        events, self.timeline_events = self.timeline_events, []
        return events

    def _time_instructions(self) -> None:
        """Time DeepSpeed's ForwardPass / BackwardPass instructions while `recording` (pure compute: its
        receives are separate instructions). The engine looks instructions up in `self._INSTRUCTION_MAP`, so an
        instance attribute overrides the class's map for this engine only."""
        from deepspeed.runtime.pipe import schedule as ds_schedule

        engine, rank, m = self.engine, self.pipe_rank, self.microbatches
        counters: dict[tuple[str, int], int] = {}
        table = dict(type(engine)._INSTRUCTION_MAP)

        def timed(kind: str, fn):
            def run(eng, buffer_id: int, **kwargs):
                chunk = kwargs.get("phase", 0) or 0
                if self.kind == "dualpipev":
                    mb = buffer_id % m  # DualPipeV's buffer = phase * M + microbatch
                else:  # 1F1B runs each kind's microbatches in order (its buffers are cyclic)
                    mb = counters.get((kind, chunk), 0)
                    counters[(kind, chunk)] = mb + 1
                if not self.recording:
                    fn(eng, buffer_id=buffer_id, **kwargs)
                    return
                start = timeline_now()
                fn(eng, buffer_id=buffer_id, **kwargs)
                label = f"{kind}{chunk}.{mb}"
                self.timeline_events.append(TimelineEvent(rank, start, timeline_now(), label, kind, chunk))
            return run

        table[ds_schedule.ForwardPass] = timed("F", table[ds_schedule.ForwardPass])
        table[ds_schedule.BackwardPass] = timed("B", table[ds_schedule.BackwardPass])
        original_train_batch = engine.train_batch

        def train_batch(*args, **kwargs):
            counters.clear()
            return original_train_batch(*args, **kwargs)

        engine._INSTRUCTION_MAP = table
        engine.train_batch = train_batch


class OneFOneBSchedule(DeepSpeedPipeSchedule):
    """`parallel.schedule=1f1b`: DeepSpeed's PipelineEngine (TrainSchedule), one stage per pipe rank."""


def _in_module_order(groups: list[dict[str, Any]], module: nn.Module) -> list[dict[str, Any]]:
    """The optimizer groups with their parameters in the pipeline module's order (ZeRO-1 flattens each group
    in the order given; DeepSpeed's own examples hand it the module's parameters)."""
    index = {id(p): i for i, p in enumerate(module.parameters())}
    return [{**g, "params": sorted(g["params"], key=lambda p: index[id(p)])} for g in groups]

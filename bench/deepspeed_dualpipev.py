"""DeepSpeed's own DualPipeVEngine on our model: a peer in bench/pipeline.py (the trainer never runs it)."""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model.config import ModelConfig
from parallel.deepspeed_1f1b import DeepSpeedPipeSchedule
from parallel.topology import PipelineTopology


class DeepSpeedDualPipeVSchedule(DeepSpeedPipeSchedule):
    """DeepSpeed's own DualPipeVEngine on the same layers (a peer in bench/pipeline.py): rank r holds stages r
    and 2pp-1-r; rank 0 has embedding and head, so the tied embedding needs no traffic."""

    kind = "dualpipev"

    @staticmethod
    def _num_stages(pp: int) -> int:
        return 2 * pp

    @staticmethod
    def _held_stages(pipe_rank: int, pp: int) -> list[int]:
        return [pipe_rank, 2 * pp - 1 - pipe_rank]

    @staticmethod
    def _module_cls():
        from deepspeed.pipe import DualPipeVModule

        return DualPipeVModule


def build_deepspeed_dualpipev_schedule(
    cfg: ModelConfig,
    topo: PipelineTopology | tuple[int, int],
    microbatches: int,
    micro_batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    ds_config: dict[str, Any],
    param_groups_fn: Callable[[nn.Module], list[dict[str, Any]]],
    lr_lambda: Callable[[int], float] | None = None,
    record_timeline: bool = False,
) -> DeepSpeedDualPipeVSchedule:
    """DeepSpeed's DualPipeVEngine on our model (microbatches >= 2 * pp)."""
    return DeepSpeedDualPipeVSchedule(cfg, topo, microbatches, micro_batch_size, seq_len, device, dtype, ds_config,
                                      param_groups_fn, lr_lambda, record_timeline)

"""DeepSpeed's own DualPipeVEngine on our model: a peer in bench/pipeline.py (the trainer never runs it).

Rank r holds stages r and 2pp-1-r; rank 0 has the embedding and the head, so the tied embedding needs no traffic.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.transformer import DeepseekV3
from parallel.deepspeed_1f1b import DeepSpeedPipeSchedule
from parallel.rank_model import RankStages, build_stage_model
from parallel.step_schedule import PipelineSpec


class DeepSpeedDualPipeVSchedule(DeepSpeedPipeSchedule):
    """DeepSpeed's DualPipeVEngine behind the same interface as our schedules (microbatches >= 2 * pp)."""

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


def dualpipev_rank_model(cfg: ModelConfig, spec: PipelineSpec) -> DeepseekV3:
    """This rank's two stages for DeepSpeed's DualPipeV (single-process weights and names)."""
    pp, r = spec.topo.pp, spec.topo.pipe_rank
    return build_stage_model(cfg, RankStages((r, 2 * pp - 1 - r), 2 * pp), spec.device, spec.dtype)

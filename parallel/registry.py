"""`parallel.schedule` name -> the `StepSchedule` that runs it (the names themselves: parallel/step_schedule.py)."""

from __future__ import annotations

from model.transformer import DeepseekV3
from parallel.data_parallel import DataParallelSchedule
from parallel.deepspeed_1f1b import OneFOneBSchedule
from parallel.dualpipe_engine import DualPipeSchedule
from parallel.step_schedule import SCHEDULES, PipelineSpec, StepSchedule

STEP_SCHEDULES: dict[str, type[StepSchedule]] = {
    "none": DataParallelSchedule,
    "1f1b": OneFOneBSchedule,
    "dualpipe": DualPipeSchedule,
    "dualpipev": DualPipeSchedule,
}
assert tuple(STEP_SCHEDULES) == SCHEDULES, "every schedule name has exactly one class"


def build_step_schedule(model: DeepseekV3, spec: PipelineSpec) -> StepSchedule:
    """The schedule `spec.name` around this rank's model (built by parallel.rank_model.build_rank_model)."""
    return STEP_SCHEDULES[spec.name](model, spec)

"""Parallelism applied to a plain `model/` network: process groups, this rank's model, step schedules.

The trainer's path: `PipelineTopology` (topology.py) -> `PipelineSpec` (step_schedule.py) -> `build_rank_model`
(rank_model.py: stages, per-name init, expert shard, FP8) -> `build_step_schedule` (registry.py) -> a
`StepSchedule`: data_parallel.py (`none`), deepspeed_1f1b.py (`1f1b`), dualpipe_engine.py (`dualpipe`,
`dualpipev`, executing the instruction lists of schedules.py through runtime.py and stages.py). Expert
parallelism: all_to_all.py (posted collectives), dispatcher.py, expert_shard.py, expert_groups.py (DeepSpeed's
side), ep_overlap.py (EP blocks as sub-steps). Nothing here imports trainer/.
"""

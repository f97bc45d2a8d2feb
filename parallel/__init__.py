"""Parallelism applied to a plain `model/` network: pipeline schedules, expert parallelism, process groups.

`parallel.step_schedule` is the entry point the trainer uses: `build_schedule` (data parallel) and
`build_pipeline_schedule` (1f1b, dualpipe, dualpipev) turn a model config and a generated DeepSpeed config
into something that runs one global step (`train_batch`). Nothing here imports trainer/.
"""

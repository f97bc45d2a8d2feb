"""Parallelism applied to a plain `model/` network: pipeline schedules, expert parallelism, process groups.

`parallel.schedule.build_schedule` is the one entry point the trainer uses: it turns a model and a generated
DeepSpeed config into something that runs one global step (`train_batch`). Nothing here imports trainer/.
"""

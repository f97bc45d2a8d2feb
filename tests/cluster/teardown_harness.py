"""Teardown-only harness: two gloo ranks go through the trainer's real way out, many times; count bad exits.

Not part of the test run (no `test_` prefix); tests/cluster/test_teardown.py runs one forced case from it.

Each rank does what `python -m trainer.train` does around a job, with a toy model: `prepare_env`,
`init_process_group` (DeepSpeed's, gloo), `RunGuard` (preemption handler, the watchdog thread with its own
TCPStore client), a `RunLogger` (wandb disabled), a DeepSpeed ZeRO-1 engine on a linear layer (its gradient
hooks keep it and its groups alive until someone destroys it; nobody does here, as on an error path),
training steps and collectives on the default group and on a second group right up to the end, then one of
the ways out, through `trainer.train.run_and_end` as `main()` does:

    normal     return                                  exit 0
    user       a UserError (one line)                  exit 2
    preempt    guard.exit_preempted                    exit 75
    nonfinite  NonFiniteLoss                           exit 4
    error      an internal error on every rank         exit 1 (with its traceback)

A run is bad when a rank's exit code is not the expected one or its output says `terminate called`.

    .venv/bin/python -m tests.cluster.teardown_harness --runs 100                 # the fix
    .venv/bin/python -m tests.cluster.teardown_harness --runs 100 --skip-teardown # as before the fix
    .venv/bin/python -m tests.cluster.teardown_harness --runs 5 --late-release   # the forced bad order

`--skip-teardown` sets DSV3_TEARDOWN_TEST=skip (end_process does nothing: the process group is left to the
interpreter's exit, as before); `--late-release` forces the order that used to std::terminate every time
(trainer/distributed.py `_force_late_release`: gloo's worker thread releases a collective while rank 1 is
finalizing). Runs execute one at a time; OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"normal": 0, "user": 2, "preempt": 75, "nonfinite": 4, "error": 1}


def _body(path: str, workdir: str) -> None:
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from trainer.cluster.nonfinite import NonFiniteLoss
    from trainer.cluster.run_guard import RunGuard
    from trainer.distributed import init_process_group, prepare_env
    from trainer.errors import UserError
    from trainer.report.run_logger import RunLogger

    env = prepare_env()
    init_process_group(env)
    second = dist.new_group(list(range(env.world_size)))  # a group of its own (gloo threads of its own)
    train = SimpleNamespace(fault_timeout=10.0, step_timeout=None)
    with RunGuard(train, env) as guard:
        logger = RunLogger(Path(workdir) / "run", {"harness": path}, env.rank, wandb_mode="disabled",
                           show_progress=False)
        engine = _toy_engine(env.world_size)
        for step in range(1, 4):
            loss = engine(torch.randn(2, 64)).square().mean()
            engine.backward(loss)
            engine.step()
            dist.all_reduce(torch.full((4096,), float(step)))  # temporaries: the works hold the last references
            dist.all_reduce(torch.ones(4096), group=second)
            guard.step_done(step)
            logger.log(step, {"lm_loss": float(loss)})
        if path == "user":
            raise UserError("harness.key", "a user error on every rank", "nothing to fix")
        if path == "nonfinite":
            raise NonFiniteLoss("the loss is nan at step 3 (harness)")
        if path == "error":
            raise RuntimeError("harness: an internal error on every rank")
        logger.finish()
        if path == "preempt":
            guard.exit_preempted(3, Path(workdir) / "checkpoints" / "step00000003")


def _toy_engine(world_size: int):
    import deepspeed
    import torch

    torch.manual_seed(0)
    config = {"train_batch_size": 2 * world_size, "train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=torch.nn.Linear(64, 64), config=config)
    return engine


def rank_main(path: str, workdir: str) -> None:
    from trainer.errors import run_reporting_user_errors
    from trainer.train import run_and_end

    run_and_end(lambda: run_reporting_user_errors(_body, path, workdir))


def run_once(path: str, flags: str = "", timeout: float = 180.0) -> tuple[list[int], list[str]]:
    """Two ranks through `path`; (exit codes, outputs)."""
    from parallel.spawn import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        procs = []
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "DSV3_TEARDOWN_TEST": flags}
            env.pop("DSV3_FAULT_INJECT", None)
            cmd = [sys.executable, "-m", "tests.cluster.teardown_harness", "--rank", path, workdir]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0] + "\n[harness: killed after timeout]")
        return [p.returncode for p in procs], outs


def is_bad(path: str, codes: list[int], outs: list[str]) -> bool:
    return any(c != EXPECTED[path] for c in codes) or any("terminate called" in o for o in outs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--paths", default=",".join(EXPECTED), help="ways out, taken in turn")
    parser.add_argument("--skip-teardown", action="store_true", help="DSV3_TEARDOWN_TEST=skip (before the fix)")
    parser.add_argument("--late-release", action="store_true", help="force the order that used to terminate")
    parser.add_argument("--rank", nargs=2, metavar=("PATH", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(*args.rank)
        return 0
    flags = ",".join(f for f, on in (("skip", args.skip_teardown), ("late-release", args.late_release)) if on)
    paths = args.paths.split(",")
    bad: dict[str, int] = {p: 0 for p in paths}
    runs: dict[str, int] = {p: 0 for p in paths}
    start = time.time()
    for i in range(args.runs):
        path = paths[i % len(paths)]
        codes, outs = run_once(path, flags)
        runs[path] += 1
        if is_bad(path, codes, outs):
            bad[path] += 1
            tails = [" | ".join(o.strip().splitlines()[-3:]) for o in outs]
            print(f"run {i} ({path}): exit codes {codes}, expected {EXPECTED[path]}; {tails}", flush=True)
    total = sum(bad.values())
    per_path = ", ".join(f"{p} {bad[p]}/{runs[p]}" for p in paths)
    print(f"{total} of {args.runs} runs with a non-expected exit or 'terminate called' "
          f"(DSV3_TEARDOWN_TEST={flags or '-'}; {per_path}; {time.time() - start:.0f} s)", flush=True)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())

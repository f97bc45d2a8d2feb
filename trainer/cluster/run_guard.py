"""RunGuard: what protects one running job on a cluster, around the training part of `trainer.job.run`.

    with RunGuard(job.train, env) as guard:   # after init_process_group
        ... build, resume, train ...           # guard.preemption.requested, guard.watchdog.step_done(step)

- installs the preemption handler (trainer/cluster/preemption.py) and starts the watchdog (trainer/cluster/watchdog.py);
- turns the ways a job ends into exit codes (trainer/cluster/exit_codes.py): a non-finite stop prints its `error:`
  line and exits 4; a preempted run (`guard.exit_preempted`) exits 75; ends every rank takes together
  (success, user errors, those two) mark this rank done for the watchdog; any other exception first lets
  the watchdog explain it (a dead peer: exit 3 with the peer's rank), else keeps its traceback;
- on every way out, in this order: the run logger finished (wandb told the exit code when it is not 0), the
  watchdog stopped, its thread joined and its store client closed. What is left for the end of the process
  (a bounded barrier, destroying the process group) is `trainer.distributed.end_process`;
- prints, on rank 0, which ranks run on which node (the launch mapping at a glance).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from trainer.cluster.exit_codes import EXIT_NONFINITE, EXIT_PREEMPTED
from trainer.cluster.nonfinite import NonFiniteLoss
from trainer.cluster.preemption import PreemptionHandler
from trainer.cluster.watchdog import Watchdog
from trainer.distributed import DistEnv
from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.report.run_logger import finish_open


def check_config(train: Any) -> None:
    """The cluster keys of `train.*` (called before any process group exists)."""
    from trainer.cluster.nonfinite import POLICIES

    if train.on_nonfinite not in POLICIES:
        raise UserError("train.on_nonfinite", f"unknown policy {train.on_nonfinite!r}", "use stop or skip")
    if train.max_consecutive_skips < 0:
        raise UserError("train.max_consecutive_skips", f"must be >= 0, got {train.max_consecutive_skips}",
                        "use e.g. 10")
    for key in ("fault_timeout", "step_timeout"):
        value = getattr(train, key)
        if value is not None and value <= 0:
            raise UserError(f"train.{key}", f"must be > 0 seconds, got {value}", "use null to turn it off")


class RunGuard:
    def __init__(self, train: Any, env: DistEnv) -> None:
        self.env = env
        self.preemption = PreemptionHandler()
        self.watchdog: Watchdog | None = None
        wanted = train.fault_timeout is not None and env.world_size > 1 or train.step_timeout is not None
        if wanted:
            self.watchdog = Watchdog(env.rank, env.world_size, timeout=train.fault_timeout,
                                     step_timeout=train.step_timeout)

    def __enter__(self) -> RunGuard:
        self.preemption.install()
        if self.watchdog is not None:
            self.watchdog.start()
        print_world(self.env)
        return self

    def step_done(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.step_done(step)

    def exit_preempted(self, step: int, checkpoint: Any) -> None:
        """After the preemption checkpoint: hand over to a launcher's own handler (submitit), else exit 75."""
        sig = self.preemption.received.name if self.preemption.received else "a signal to another rank"
        if self.env.is_main:
            print(f"preempted ({sig}): stopped after step {step} with a complete checkpoint {checkpoint}; "
                  f"exit code {EXIT_PREEMPTED}: run the same command again to resume", flush=True)
        self._leave()
        self.preemption.chain_previous()
        sys.exit(EXIT_PREEMPTED)

    def _leave(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop(done=True)
            self.watchdog = None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.preemption.restore()
        if exc is None or isinstance(exc, UserError | SystemExit | KeyboardInterrupt):
            finish_open(_exit_code(exc))  # a successful run finished its logger itself
            self._leave()
            return
        if isinstance(exc, NonFiniteLoss):
            finish_open(EXIT_NONFINITE)
            self._leave()
            if self.env.is_main:  # every rank saw the same reduced loss and stops with the same message
                print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_NONFINITE)
        if self.watchdog is not None:
            self.watchdog.explain(exc)  # exits 3 naming the peer if one died; else the traceback follows
            self.watchdog = None
        finish_open(1)


def _exit_code(exc: BaseException | None) -> int | None:
    """What the process will exit with for `exc` (None: success), for wandb."""
    if exc is None:
        return None
    if isinstance(exc, UserError):
        return EXIT_USER_ERROR
    if isinstance(exc, SystemExit):
        return None if exc.code in (None, 0) else exc.code if isinstance(exc.code, int) else 1
    return 130  # KeyboardInterrupt


def print_world(env: DistEnv) -> None:
    """Rank 0 prints one line: ranks per node, as the launcher mapped them (a collective on every rank)."""
    import torch.distributed as dist

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if env.world_size == 1 or not dist.is_initialized():
        return
    names: list[Any] = [None] * env.world_size
    dist.all_gather_object(names, (node, _node_rank()))
    if not env.is_main:
        return
    nodes: dict[str, list[int]] = {}
    node_rank: dict[str, str] = {}
    for rank, (name, nr) in enumerate(names):
        nodes.setdefault(name, []).append(rank)
        node_rank[name] = nr
    parts = [f"{name} (node {node_rank[name]}): ranks {_ranges(r)}" for name, r in list(nodes.items())[:8]]
    more = f"; ... {len(nodes) - 8} more nodes" if len(nodes) > 8 else ""
    print(f"world: {env.world_size} ranks on {len(nodes)} node{'s' if len(nodes) > 1 else ''}: "
          f"{'; '.join(parts)}{more}; master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
          flush=True)


def _node_rank() -> str:
    for var in ("NODE_RANK", "CROSS_RANK", "GROUP_RANK"):  # ours (srun), deepspeed's launch.py, torchrun
        if var in os.environ:
            return os.environ[var]
    return "?"


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(out)

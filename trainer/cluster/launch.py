"""`python -m trainer.launch`: start this node's ranks and keep the signal and exit-code contract (docs/cluster.md).

    python -m trainer.launch --nproc-per-node 2 [hydra overrides ...]                       # one machine
    srun --ntasks-per-node=1 python -m trainer.launch --nproc-per-node 8 --nnodes 2 \\
        --master-addr gpu001 --master-port 14242 [hydra overrides ...]                     # one per node

It starts the ranks as DeepSpeed's launch.py does (`python -u -m trainer.train ARGS` with RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE / LOCAL_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT in the environment; no
`--local_rank` argument), and differs where DeepSpeed's launcher breaks the contract of trainer/cluster/exit_codes.py
(its runner returns 143 at once on SIGTERM and leaves the ranks training; its launch.py terminates every rank's
process tree, the wandb service included, waits 30 s, kills, and exits 1):

- SIGTERM / SIGUSR1 / SIGUSR2 are forwarded to every rank, each time one arrives (a rank's handler only sets a
  flag, so repeats are harmless), and the launcher waits for the ranks to checkpoint and exit, however long that
  takes: on a cluster Slurm's KillWait bounds it. SIGINT is not forwarded: Ctrl-C reaches the ranks from the
  terminal (they share the launcher's process group), and twice would interrupt their way out.
- The exit code is the highest of the ranks' (128+N for a rank killed by signal N), as srun reports it: 75 when
  they stopped with a preemption checkpoint, 3 when the watchdog ended them, and so on.
- A rank that fails (any code but 0 and 75, or killed) leaves the others `--fail-grace` seconds to end on their own
  (the watchdog names the failed rank and exits 3 within 1.4 x train.fault_timeout); then they are killed, and
  ranks killed by the launcher do not count in its exit code.
- No orphans: every rank is started with PR_SET_PDEATHSIG = SIGTERM (Linux), so if the launcher dies, even by
  SIGKILL, its ranks get SIGTERM, which is a preemption: they checkpoint and exit 75 with nobody to wait for them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
FAIL_GRACE = 300.0  # s: > 1.4 x the default train.fault_timeout (180 s), the bound of the watchdog's verdict
PR_SET_PDEATHSIG = 1
POLL = 0.05
QUIET = (0, 2, 3, 4, 75)  # codes whose rank says why itself (a user error, the watchdog, a non-finite loss, ...)
USAGE = ("usage: python -m trainer.launch [--nproc-per-node N] [--nnodes N] [--node-rank R] [--master-addr A] "
         "[--master-port P] [--module trainer.train] [--fail-grace S] [--] [ARGS ...]")


@dataclass
class Options:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    module: str = "trainer.train"
    fail_grace: float = FAIL_GRACE


_OPTIONS = {"--nproc-per-node": ("nproc_per_node", int), "--nnodes": ("nnodes", int),
            "--node-rank": ("node_rank", int), "--master-addr": ("master_addr", str),
            "--master-port": ("master_port", int), "--module": ("module", str), "--fail-grace": ("fail_grace", float)}


def parse_args(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """Our options come first (`--name value` or `--name=value`, `_` accepted for `-`); the first other argument,
    or everything after `--`, goes to the ranks unchanged (Hydra overrides, `-m` for a multirun)."""
    opts, args = Options(), list(argv)
    while args:
        name, eq, value = args[0].partition("=")
        name = name.replace("_", "-")
        if args[0] == "--":
            args.pop(0)
            break
        if name not in _OPTIONS:
            break
        args.pop(0)
        if not eq:
            if not args:
                raise ValueError(f"{name} needs a value")
            value = args.pop(0)
        field, kind = _OPTIONS[name]
        try:
            setattr(opts, field, kind(value))
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if opts.nproc_per_node < 1 or opts.nnodes < 1:
        raise ValueError("--nproc-per-node and --nnodes must be >= 1")
    return opts, args


def _node_rank(opts: Options, env: dict[str, str]) -> int:
    """--node-rank, else NODE_RANK, else SLURM_NODEID inside an srun task (one launcher per node), else 0."""
    if opts.node_rank is not None:
        return opts.node_rank
    if "NODE_RANK" in env:
        return int(env["NODE_RANK"])
    if opts.nnodes > 1 and "SLURM_NODEID" in env:
        return int(env["SLURM_NODEID"])
    return 0


def rank_envs(opts: Options, env: dict[str, str]) -> list[dict[str, str]]:
    """The environment of each local rank: the launcher's plus the torch.distributed variables."""
    node = _node_rank(opts, env)
    if not 0 <= node < opts.nnodes:
        raise ValueError(f"node rank {node} is outside --nnodes {opts.nnodes}")
    addr = opts.master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    port = opts.master_port or (int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    if port is None:
        if opts.nnodes > 1:
            raise ValueError("--master-port (or MASTER_PORT) is needed when several nodes launch")
        from parallel.spawn import free_port

        port = free_port()
    world = opts.nnodes * opts.nproc_per_node
    out = []
    for local in range(opts.nproc_per_node):
        e = dict(env)
        e.update(RANK=str(node * opts.nproc_per_node + local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                 LOCAL_WORLD_SIZE=str(opts.nproc_per_node), LOCAL_SIZE=str(opts.nproc_per_node),
                 NODE_RANK=str(node), MASTER_ADDR=addr, MASTER_PORT=str(port))
        out.append(e)
    return out


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function that makes the child get SIGTERM when the launcher dies (Linux; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died between the fork and prctl: nobody would tell us
            os._exit(128 + int(signal.SIGTERM))

    return preexec


def _code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


def _how(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name} (code {128 - returncode})"


def say(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


def launch(opts: Options, args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Start the ranks, forward preemption signals to them, return the exit code (module docstring)."""
    envs = rank_envs(opts, dict(os.environ if env is None else env))
    cmd = [sys.executable, "-u", "-m", opts.module, *args]
    preexec = _die_with_parent()
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if signum not in received:
            received.append(signum)
            say(f"{signal.Signals(signum).name}: forwarded to the ranks; waiting for them to checkpoint and exit")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)  # the ranks got it from the terminal
    try:
        for e in envs:
            procs.append(subprocess.Popen(cmd, env=e, preexec_fn=preexec))
            for signum in received:  # a signal that came while the ranks were being started reaches all of them
                procs[-1].send_signal(signum)
        return _wait(procs, envs, opts.fail_grace)
    finally:
        for p in procs:  # only on an error of the launcher itself: the ranks do not outlive it
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], envs: list[dict[str, str]], fail_grace: float) -> int:
    codes: dict[int, int] = {}  # index -> exit code of a rank that ended on its own
    killed: set[int] = set()  # ranks the launcher killed after a failure (not counted)
    deadline: float | None = None
    while len(codes) + len(killed) < len(procs):
        for i, p in enumerate(procs):
            if i in codes or i in killed or p.poll() is None:
                continue
            codes[i] = _code(p.returncode)
            if codes[i] not in (0, 75):
                if codes[i] not in QUIET:
                    say(f"rank {envs[i]['RANK']} (pid {p.pid}) {_how(p.returncode)}")
                if deadline is None and fail_grace >= 0:
                    deadline = time.monotonic() + fail_grace
        if deadline is not None and time.monotonic() > deadline:
            alive = [i for i, p in enumerate(procs) if i not in codes and p.poll() is None]
            if alive:
                say(f"ranks {', '.join(envs[i]['RANK'] for i in alive)} still running {fail_grace:g} s after a "
                    "rank failed: killing them")
            for i in alive:
                procs[i].kill()
                procs[i].wait()
                killed.add(i)
        time.sleep(POLL)
    return max(codes.values(), default=1)


def main(argv: list[str] | None = None) -> int:
    try:
        opts, args = parse_args(sys.argv[1:] if argv is None else argv)
        return launch(opts, args)
    except ValueError as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2

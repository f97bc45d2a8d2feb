"""Slurm: rank variables from an srun task's environment, hostlists, DeepSpeed hostfiles, and a local srun.

srun (one task per GPU) is the robust cluster launch: every task is one rank, and Slurm tells it who it is
through SLURM_* variables. torch.distributed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT,
which srun does not set (DeepSpeed's `init_distributed` does not map them either), so `slurm_rank_env` does:

    SLURM_PROCID                              -> RANK
    SLURM_STEP_NUM_TASKS (else SLURM_NTASKS)  -> WORLD_SIZE
    SLURM_LOCALID                             -> LOCAL_RANK
    SLURM_NODEID                              -> NODE_RANK
    tasks on this node (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE) -> LOCAL_WORLD_SIZE
    first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST) -> MASTER_ADDR  (rank 0 runs there)
    10000 + SLURM_JOB_ID % 20000              -> MASTER_PORT  (below Linux's ephemeral range; same on all tasks)

Only inside an srun job step (SLURM_STEP_ID set, not the batch or extern step): a plain `python` in the batch
script or an salloc shell also sees SLURM_PROCID=0 and SLURM_NTASKS=<the allocation's tasks>, and would wait
forever for ranks that never come. MASTER_ADDR / MASTER_PORT already in the environment (set by
scripts/slurm/train.sbatch) win.

CLI (used by scripts/slurm/train.sbatch; docs/cluster.md):

    python -m trainer.slurm hosts [NODELIST]                      one host per line (default SLURM_JOB_NODELIST)
    python -m trainer.slurm hostfile --slots 8 [NODELIST]         a DeepSpeed hostfile: "host slots=8" lines
    python -m trainer.slurm master-addr [NODELIST]                the first host (default SLURM_JOB_NODELIST)
    python -m trainer.slurm master-port [JOB_ID]                  the port derived from the job id
    python -m trainer.slurm local-srun --nodes 2 --ntasks-per-node 1 [--kill-on-bad-exit=1] CMD ...
        runs CMD as nodes x tasks local processes with the environment srun would give them (the rehearsal
        of a multi-node job on one machine; signals it receives are forwarded to every task, as srun does)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

# Step ids Slurm gives the batch script and the "extern" step (SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT).
_NON_TASK_STEPS = {"4294967294", "4294967295", "batch", "extern"}
PORT_BASE, PORT_SPAN = 10000, 20000


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed hostlist -> host names: "gpu[001-003,7],login" -> gpu001 gpu002 gpu003 gpu7 login.

    Several bracket groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2);
    zero padding is kept from the range's first bound.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts += _expand_one(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    out = []
    for part in m.group(1).split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in hostlist entry {name!r}")
        width = len(lo)
        for n in range(int(lo), int(hi if dash else lo) + 1):
            out += [head + str(n).zfill(width) + rest for rest in _expand_one(tail)]
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ("8(x2),4") -> [8, 8, 4]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def master_port(job_id: str | int | None) -> int:
    """A port every task of the job derives alike; different jobs sharing a node get different ports."""
    digits = re.sub(r"\D", "", str(job_id or ""))
    return PORT_BASE + (int(digits) % PORT_SPAN if digits else 0)


def in_srun_task(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    return "SLURM_PROCID" in env and step is not None and step not in _NON_TASK_STEPS


def slurm_rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables an srun task needs, from its SLURM_* variables ({} outside srun tasks).

    Values already present in `env` for MASTER_ADDR / MASTER_PORT are kept (the batch script's choice).
    """
    if not in_srun_task(env):
        return {}
    node = int(env.get("SLURM_NODEID", "0"))
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1",
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "NODE_RANK": str(node),
    }
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        out["LOCAL_WORLD_SIZE"] = str(counts[node] if node < len(counts) else counts[-1])
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1")
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(master_port(env.get("SLURM_JOB_ID")))
    return out


def hostfile(hosts: Sequence[str], slots: int) -> str:
    """A DeepSpeed hostfile: one `host slots=N` line per node (N ranks on it)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


# ---- local srun: the multi-node rehearsal on one machine ----------------------------------------------------


def task_env(base: Mapping[str, str], hosts: Sequence[str], tasks_per_node: int, node: int, local: int,
             job_id: str) -> dict[str, str]:
    """The SLURM_* variables srun gives task `local` on node `node` (the subset this project reads, and a few
    more that tools print)."""
    nodes, ntasks = len(hosts), len(hosts) * tasks_per_node
    nodelist = ",".join(hosts)
    env = dict(base)
    env.update(
        SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_STEP_ID="0", SLURM_STEPID="0",
        SLURM_PROCID=str(node * tasks_per_node + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
        SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_STEP_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=base.get("SLURM_JOB_NODELIST", nodelist), SLURM_STEP_NODELIST=nodelist,
        SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})", SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})",
        SLURMD_NODENAME=hosts[node],
    )
    return env


def local_srun(argv: Sequence[str]) -> int:
    """`srun` for a machine without Slurm: nodes x tasks processes, srun's environment, srun's exit code.

    Accepts --nodes=N, --ntasks-per-node=T, --kill-on-bad-exit[=0|1] (srun's names; other --options are
    ignored), then the command. Hosts are SLURM_JOB_NODELIST's first N entries (default localhost). The exit
    code is the largest of the tasks' (a task killed by signal S counts as 128+S), as srun reports it.
    """
    nodes, per_node, kill_on_bad_exit = int(os.environ.get("SLURM_NNODES", "1")), 1, False
    args = list(argv)
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        key, eq, value = opt.partition("=")
        if not eq and key in ("--nodes", "-N", "--ntasks-per-node") and args:
            value = args.pop(0)
        if key in ("--nodes", "-N"):
            nodes = int(value)
        elif key == "--ntasks-per-node":
            per_node = int(value)
        elif key == "--kill-on-bad-exit":
            kill_on_bad_exit = value != "0"
        elif key == "--":
            break
    if not args:
        print("usage: python -m trainer.slurm local-srun [--nodes N] [--ntasks-per-node T] CMD ...", file=sys.stderr)
        return 2
    listed = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", "localhost"))
    if len(listed) < nodes:
        print(f"error: SLURM_JOB_NODELIST names {len(listed)} hosts, --nodes={nodes}; name one host per node",
              file=sys.stderr)
        return 2
    hosts = listed[:nodes]
    job_id = os.environ.get("SLURM_JOB_ID", str(os.getpid()))
    procs = [subprocess.Popen(args, env=task_env(os.environ, hosts, per_node, n, t, job_id))
             for n in range(nodes) for t in range(per_node)]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode if p.returncode >= 0 else 128 - p.returncode
                if codes[i] != 0:  # worded like srun's own report
                    how = (f"Killed by signal {-p.returncode}" if p.returncode < 0
                           else f"Exited with exit code {p.returncode}")
                    print(f"local-srun: error: {hosts[i // per_node]}: task {i}: {how}", file=sys.stderr, flush=True)
                if codes[i] != 0 and kill_on_bad_exit:
                    for q in procs:
                        if q.poll() is None:
                            q.kill()
        time.sleep(0.05)
    return max(codes.values())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m trainer.slurm hosts [NODELIST] | hostfile --slots N [NODELIST] | "
             "master-addr [NODELIST] | master-port [JOB_ID] | local-srun [--nodes N] [--ntasks-per-node T] CMD ...")
    if not args:
        print(usage, file=sys.stderr)
        return 2
    cmd, rest = args[0], args[1:]
    try:
        if cmd == "local-srun":
            return local_srun(rest)
        if cmd == "master-port":
            print(master_port(rest[0] if rest else os.environ.get("SLURM_JOB_ID")))
            return 0
        if cmd == "master-addr":  # the first host of the node list: rank 0 runs there
            nodelist = rest[0] if rest else os.environ.get("SLURM_JOB_NODELIST", "")
            print(expand_hostlist(nodelist)[0] if nodelist else "127.0.0.1")
            return 0
        slots = 1
        if cmd == "hostfile":
            if len(rest) < 2 or rest[0] != "--slots":
                print(usage, file=sys.stderr)
                return 2
            slots, rest = int(rest[1]), rest[2:]
        nodelist = rest[0] if rest else os.environ.get("SLURM_JOB_NODELIST")
        if cmd not in ("hosts", "hostfile") or not nodelist:
            print(usage if cmd not in ("hosts", "hostfile") else "error: SLURM_JOB_NODELIST: not set; run inside a "
                  "Slurm allocation or pass the node list", file=sys.stderr)
            return 2
        hosts = expand_hostlist(nodelist)
        print(hostfile(hosts, slots) if cmd == "hostfile" else "\n".join(hosts), end="" if cmd == "hostfile" else "\n")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

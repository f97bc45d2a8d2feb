"""The trainer's exit codes: what a launcher, a batch script or a sweep can decide from them (docs/cluster.md).

    0   finished (train.steps reached, or train.max_seconds), final checkpoint saved
    1   an internal error (a Python traceback): a bug, report it
    2   a user error (config, paths, data, a checkpoint that cannot be written): one `error:` line names the fix
    3   another rank died or stopped responding (the watchdog): restartable, resume=auto continues
    4   a non-finite loss with train.on_nonfinite=stop: the last good checkpoint is kept; not worth a blind retry
    75  preempted (SIGTERM / SIGUSR1 / SIGUSR2): a complete checkpoint of the last step was saved; run the same
        command again (scripts/slurm/train.sbatch requeues the job) and it resumes exactly
    128+N a rank killed by signal N, as srun and trainer.launch report it (137: SIGKILL, e.g. by Slurm after
        KillWait, or the OOM killer; nothing of ours runs); DeepSpeed's own runner reports 256-N instead (247)

75 is sysexits' EX_TEMPFAIL ("temporary failure; the user is invited to retry"), which is what a preemption is.
"""

from __future__ import annotations

from trainer.errors import EXIT_USER_ERROR

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER = EXIT_USER_ERROR  # 2, defined with the user-error machinery
EXIT_PEER_FAILED = 3
EXIT_NONFINITE = 4
EXIT_PREEMPTED = 75

# What scripts/slurm/train.sbatch does with each (kept in step with its `case`).
REQUEUE = {EXIT_PREEMPTED: "always", EXIT_PEER_FAILED: "up to MAX_RESTARTS times"}

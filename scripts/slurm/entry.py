"""`python scripts/slurm/entry.py ARGS` runs `python -m trainer.train ARGS`.

For launchers that take a script path rather than a module (deepspeed --launcher slurm runs
`srun python -u <script> ...`): the repository root replaces this directory on sys.path, so `trainer` imports
the same way as under `-m`.
"""

import runpy
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])
runpy.run_module("trainer.train", run_name="__main__", alter_sys=True)

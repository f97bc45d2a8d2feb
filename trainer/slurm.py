"""`python -m trainer.slurm`: the Slurm helpers (the code lives in trainer/cluster/slurm.py).
This entry point stays where the docs, scripts and users' job files call it."""

import sys

from trainer.cluster.slurm import main

if __name__ == "__main__":
    sys.exit(main())

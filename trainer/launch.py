"""`python -m trainer.launch`: start this node's ranks and keep the signal and exit-code contract (the code lives in
trainer/cluster/launch.py; docs/cluster.md). scripts/train.sh (`make train`) and scripts/slurm/train.sbatch use it."""

import sys

from trainer.cluster.launch import main

if __name__ == "__main__":
    sys.exit(main())

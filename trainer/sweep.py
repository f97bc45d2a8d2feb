"""`python -m trainer.sweep`: the sweep summary (the code lives in trainer/cluster/sweep.py).
This entry point stays where the docs, scripts and users' job files call it."""

import sys

from trainer.cluster.sweep import main

if __name__ == "__main__":
    sys.exit(main())

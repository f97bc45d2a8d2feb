"""`python -m trainer.plan`: the capacity planner (the code lives in trainer/cluster/plan.py).
This entry point stays where the docs, scripts and users' job files call it."""

import sys

from trainer.cluster.plan import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m fastprune ...` (also under `torchrun`, or as one of the processes of
`fastprune prune --nproc N`: `prune` initialises the process group from the environment
when WORLD_SIZE > 1)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())

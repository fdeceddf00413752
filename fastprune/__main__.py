"""`python -m fastprune ...` (also under `torchrun`: the process group is initialised from
the environment when WORLD_SIZE > 1)."""

import sys

from .cli import main
from .pipeline.distributed import init_from_env

if __name__ == "__main__":
    init_from_env()
    sys.exit(main())

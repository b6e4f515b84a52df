"""`python -m dist_checkpointing`: the `dist-ckpt` command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())

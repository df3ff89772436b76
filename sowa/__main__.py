"""`python -m sowa ...` (what `torchrun -m sowa train ...` runs on every rank)."""

import sys

from sowa.cli import main

sys.exit(main())

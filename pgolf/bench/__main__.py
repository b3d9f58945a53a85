"""``python -m pgolf.bench``: the same as the ``pgolf-bench`` console script."""

import sys

from pgolf.bench.cli import main

sys.exit(main())

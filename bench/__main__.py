"""``python -m bench``: run the core benchmark (``--quick`` for a few-second smoke run)."""

import sys

from bench.harness.cli import main

sys.exit(main())

"""``python -m vnpu`` is the same as the ``vnpu`` console script."""

import sys

from vnpu.cli import main

sys.exit(main())

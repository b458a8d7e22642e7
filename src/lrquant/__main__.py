"""``python -m lrquant``."""

import sys

from lrquant.cli import main

sys.exit(main())

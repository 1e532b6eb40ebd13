"""``python -m m3bind``: the command line (see ``m3bind.cli``)."""

import sys

from .cli import main

sys.exit(main())

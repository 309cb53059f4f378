"""``python -m hesse``: the same as the ``hesse`` command."""

import sys

from .cli import main

sys.exit(main())

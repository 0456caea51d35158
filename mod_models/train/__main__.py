"""``python -m mod_models.train``: see :mod:`mod_models.train`."""

import sys

from .loop import main

sys.exit(main())

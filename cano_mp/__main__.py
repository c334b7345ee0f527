"""``python -m cano_mp``: the same as the ``cano-mp`` command."""

import sys

from .cli import main

sys.exit(main())

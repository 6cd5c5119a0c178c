"""``python -m minirlhf <stage> ...`` is the same as the ``minirlhf`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m client``: the splitmirror CLI."""

import sys

from .cli import main

sys.exit(main())

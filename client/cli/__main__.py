"""``python -m client.cli``: the splitmirror CLI."""

import sys

from .entry import main

sys.exit(main())

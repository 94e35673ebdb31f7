"""`primaryd`: the primary site's storage daemon; all logic is in :mod:`splitmirror`."""

from __future__ import annotations

import sys

from splitmirror.daemon.main import main as daemon_main


def main() -> None:
    sys.exit(daemon_main("primary"))


if __name__ == "__main__":
    main()

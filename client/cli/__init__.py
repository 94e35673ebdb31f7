"""The ``splitmirror`` command line: volumes, host I/O, pairs, backups, restores and stats.

``splitmirror --server HOST:PORT [--json] COMMAND ...``; the server may also
come from ``SPLITMIRROR_SERVER``. Every failure is one line on stderr,
``splitmirror: error: <message>``, with exit code 1 (2 for usage errors).

:mod:`.entry` holds :func:`main` (the ``splitmirror`` console script) and
dispatches to one module per command family (:mod:`.volumes`, :mod:`.host_io`,
:mod:`.pairs`, :mod:`.backups`, :mod:`.restore`, :mod:`.stats`, :mod:`.certs`),
which print through :mod:`.output`; :mod:`.parser` builds the argparse tree.
"""

from .entry import main

__all__ = ["main"]

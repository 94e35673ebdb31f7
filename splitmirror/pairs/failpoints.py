"""Crash points for tests: ``SPLITMIRROR_FAILPOINT=NAME`` kills the daemon there.

The fault tests of issue 18 kill a daemon (SIGKILL, as ``kill -9``) at
every step of a swap or takeover, deterministically: the variable names the
step.  Unset (always, outside tests), a failpoint costs one comparison.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("splitmirror.pairs")

_ARMED = os.environ.get("SPLITMIRROR_FAILPOINT", "")


def failpoint(name: str) -> None:
    if _ARMED and name == _ARMED:
        log.error("failpoint %s: killing the daemon (SIGKILL)", name)
        os.kill(os.getpid(), signal.SIGKILL)

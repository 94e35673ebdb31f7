"""Open-file limits: raised at start, and shared so NBD cannot starve the rest.

Volume files are opened on use and at most :func:`volume_file_cap` of them
stay open, so a thousand volumes start under a limit of 1024.

Every NBD connection costs one file descriptor, and a daemon out of
descriptors stops everything (the host API, the interconnect, volume files).
At start the soft ``RLIMIT_NOFILE`` is raised to the hard limit, and
:data:`RESERVED_FDS` of it are kept back from NBD: the NBD connection cap is
lowered to what is left when the configured cap would not fit.
"""

from __future__ import annotations

import logging
import resource

#: Descriptors kept for everything but NBD connections: gRPC (host API and
#: interconnect connections, its wake-up pipes), volume and table files, logs,
#: subprocesses of restore hooks.
RESERVED_FDS = 256
#: Never cap NBD below this, whatever the limit (a daemon with so few
#: descriptors has other problems, and one NBD client must still attach).
MIN_NBD_CONNECTIONS = 4

log = logging.getLogger("splitmirror.daemon")


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite RLIMIT_NOFILE: keep a large finite one
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


#: Volume files kept open at most, however high the limit (the others are
#: opened on use, least recently used closed first: storage/files.py).
MAX_OPEN_VOLUMES = 4096
MIN_OPEN_VOLUMES = 16


def volume_file_cap(nofile: int, nbd_connections: int = 0) -> int:
    """How many volume files may be open at once: what :data:`RESERVED_FDS`
    and the NBD connection cap leave of the open-file limit."""
    return max(MIN_OPEN_VOLUMES, min(MAX_OPEN_VOLUMES, nofile - RESERVED_FDS - nbd_connections))


def nbd_connection_cap(wanted: int, nofile: int) -> int:
    """The NBD connection cap that leaves :data:`RESERVED_FDS` descriptors to the rest."""
    room = max(MIN_NBD_CONNECTIONS, nofile - RESERVED_FDS)
    if wanted > room:
        log.warning("NBD connections capped at %d (not %d): the open-file limit is %d and %d descriptors "
                    "are kept for the host API, the interconnect and volumes", room, wanted, nofile, RESERVED_FDS)
    return min(wanted, room)

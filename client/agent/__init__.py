"""Restore agent, local part (host B): mount NBD exports and copy files between them.

``splitmirror restore files`` attaches the SVOL (the backup generation,
read-only) and the SPVOL (read-write while its remote pair is split) over NBD,
mounts the ext2/3/4 filesystem of each with ``nbdfuse`` + ``fuse2fs`` (no
kernel module needed, only ``/dev/fuse``; with TLS, ``qemu-nbd`` presents the
client certificate), then copies the named paths from one to the other.

One role per module, each importing only those below it:

* :mod:`.mount`: :func:`mounted_filesystem` mounts one export with ``fuse2fs``
  and always unmounts it again.
* :mod:`.copy`: :func:`copy_plan` performs the copy.
* :mod:`.attach`: ``nbdfuse`` (with ``qemu-nbd`` for TLS) exposes an export as a file.
* :mod:`.paths`: :func:`plan_copy` validates the requested paths against the
  backup before anything is written, and sizes the copy for progress reporting.
* :mod:`.fuse`: FUSE daemons as child processes; :func:`fuse_problem` says why
  FUSE mounting cannot work on this host.
* :mod:`.errors`: :class:`AgentError`.

Only the paths named are written. An existing destination file is rewritten in
place and only the chunks that differ are written, so the tracks that later
cross the interconnect (resync PVOL from SPVOL) are close to what really changed.
"""

from .copy import CopyReport, copy_plan
from .errors import AgentError
from .fuse import fuse_problem, mount_type
from .mount import mounted_filesystem
from .paths import CopyPlan, plan_copy

__all__ = [
    "AgentError",
    "CopyPlan",
    "CopyReport",
    "copy_plan",
    "fuse_problem",
    "mount_type",
    "mounted_filesystem",
    "plan_copy",
]

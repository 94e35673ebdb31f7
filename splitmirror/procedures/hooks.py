"""Hooks: shell commands run at the primary around a restore or a backup.

``pre_restore_hook`` runs before the PVOL is fenced (e.g. stop the
application) and ``post_restore_hook`` after it is unfenced (e.g. restart
it, recover the database).  Each gets the pair, the volume, the phase and
the system id in its environment, and at most :data:`HOOK_TIMEOUT` seconds.

``pre_backup_hook`` runs once the generations are picked, before they are
brought in sync and the backup point is fixed (e.g. ``fsfreeze -f``, a
database checkpoint): a failing pre-hook leaves every generation as it was;
``post_backup_hook`` right after it (``fsfreeze -u``) - also when the backup
failed or the pre-hook did.  They get the pair(s), the group, the
generation(s), the phase and the outcome in their environment.  A hook runs
in its own process group: a timeout kills the command and its children.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

from ..errors import FailedPrecondition
from ..pairstate.pair import Pair
from .processes import run_process

log = logging.getLogger("splitmirror.restore")

HOOK_TIMEOUT = 300.0
BACKUP_HOOK_TIMEOUT = 30.0
#: Output of a hook kept for its error message (its last line) and the log.
OUTPUT_TAIL = 4096
_SETSID = shutil.which("setsid") or "/usr/bin/setsid"


@dataclasses.dataclass(frozen=True)
class BackupHooks:
    pre: str = ""
    post: str = ""
    timeout: float = BACKUP_HOOK_TIMEOUT

    def over(self, pre: str, post: str, timeout: float) -> BackupHooks:
        """These hooks with a schedule's own (where it gives them)."""
        return BackupHooks(pre or self.pre, post or self.post, timeout or self.timeout)


async def run_command(command: str, env: dict[str, str], timeout: float, what: str) -> str:
    """Run ``command`` with ``env`` added; the problem (exit status or timeout, last output line), or ""."""
    problem, _ = await command_output(command, env, timeout, what)
    return problem


async def command_output(command: str, env: dict[str, str], timeout: float, what: str) -> tuple[str, str]:
    """:func:`run_command`, with the tail of the command's output."""
    # setsid(1) puts the shell in a process group of its own: the timeout kills the group.
    code, out, timed_out = await run_process([_SETSID, "/bin/sh", "-c", command], timeout,
                                             dict(os.environ, **env), group=True)
    if timed_out:
        return f"{what} timed out after {timeout:g}s (killed)", ""
    text = out[-OUTPUT_TAIL:].decode(errors="replace").strip()
    if code == 0:
        log.info("%s ran: %s", what, text[-200:])
        return "", text
    last = text.splitlines()[-1] if text else "no output"
    return f"{what} exited with {code}: {last}", text


async def run_hook(command: str, pair: Pair, phase: str, system_id: int, fatal: bool = True) -> str:
    """Run a restore hook for ``pair`` at its primary end; the problem, if any.

    A failed or timed-out hook refuses the restore when ``fatal``; otherwise
    its problem is returned as a warning for the report.
    """
    if not command:
        return ""
    assert pair.primary is not None
    env = dict(SPLITMIRROR_PAIR=pair.name, SPLITMIRROR_VOLUME=pair.primary.volume.name,
               SPLITMIRROR_PHASE=phase, SPLITMIRROR_SYSTEM_ID=str(system_id))
    problem = await run_command(command, env, HOOK_TIMEOUT, f"{phase} hook")
    if not problem:
        return ""
    log.error("pair %s: %s", pair.name, problem)
    if fatal:
        raise FailedPrecondition(f"pair {pair.name!r}: {problem}; restore not started")
    return problem

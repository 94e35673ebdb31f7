"""The restore hooks: shell commands run at the primary around a restore.

``pre_restore_hook`` runs before the PVOL is fenced (e.g. stop the
application) and ``post_restore_hook`` after it is unfenced (e.g. restart
it, recover the database).  Each gets the pair, the volume, the phase and
the system id in its environment, and at most :data:`HOOK_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..errors import FailedPrecondition
from ..pairstate.pair import Pair

log = logging.getLogger("splitmirror.restore")

HOOK_TIMEOUT = 300.0


async def run_hook(command: str, pair: Pair, phase: str, system_id: int, fatal: bool = True) -> str:
    """Run a restore hook for ``pair`` at its primary end; the problem, if any.

    A failed or timed-out hook refuses the restore when ``fatal``; otherwise
    its problem is returned as a warning for the report.
    """
    if not command:
        return ""
    assert pair.primary is not None
    env = dict(os.environ, SPLITMIRROR_PAIR=pair.name, SPLITMIRROR_VOLUME=pair.primary.volume.name,
               SPLITMIRROR_PHASE=phase, SPLITMIRROR_SYSTEM_ID=str(system_id))
    proc = await asyncio.create_subprocess_shell(command, env=env, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), HOOK_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        problem = f"{phase} hook timed out after {HOOK_TIMEOUT:g}s"
    else:
        if proc.returncode == 0:
            log.info("%s hook for pair %s ran: %s", phase, pair.name, out.decode(errors="replace").strip()[:200])
            return ""
        problem = (f"{phase} hook exited with {proc.returncode}: "
                   f"{out.decode(errors='replace').strip().splitlines()[-1:] or ''}")
    log.error("pair %s: %s", pair.name, problem)
    if fatal:
        raise FailedPrecondition(f"pair {pair.name!r}: {problem}; restore not started")
    return problem

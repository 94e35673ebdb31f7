"""The host API client: every group of calls on one connection."""

from __future__ import annotations

from splitmirror.v1 import host_pb2

from .backups import BackupRestoreCalls
from .events import EventCalls
from .pairs import PairCalls
from .volumes import VolumeCalls

__all__ = ["Client"]


class Client(VolumeCalls, PairCalls, BackupRestoreCalls, EventCalls):
    """Host API client. Use ``async with Client(server) as c`` (or
    :meth:`connect` / :meth:`close`); methods also connect lazily.

    ``timeout`` is the deadline in seconds of each RPC (``None``: no deadline).
    ``tls_dir`` (made by ``splitmirror certs init``) turns on mutual TLS with
    the certificate ``client-<identity>.pem``; ``token`` is sent as a bearer
    token (for servers that take tokens instead of client certificates).
    ``connect_timeout`` bounds how long the first connection attempt may take
    (a refused connection fails at once with ``UNAVAILABLE``).
    """

    async def stats(self) -> host_pb2.Stats:
        return await self._call(lambda s: s.GetStats, host_pb2.StatsRequest())

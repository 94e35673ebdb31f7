"""Async client for the host API of a splitmirror storage system (grpc.aio).

>>> async with Client("127.0.0.1:7001") as c:
...     await c.create_volume("v1", 1 << 30)
...     await c.write("v1", 0, b"hello")

Every gRPC failure is raised as :class:`ClientError`, whose ``code`` is the
gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``...) and whose ``message``
is the server's details string.

:class:`Client` is one :class:`~.connection.Connection` with its calls grouped
by what they are about: :mod:`.volumes` (volumes and host I/O), :mod:`.pairs`,
:mod:`.backups` (backups and restores), :mod:`.events` (the event stream).
"""

from .client import Client
from .connection import MAX_MESSAGE, SERVER_NAME
from .errors import ClientError
from .pairs import POLL_INTERVAL, ProgressCallback, primary_row
from .volumes import DEFAULT_CHUNK

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_MESSAGE",
    "POLL_INTERVAL",
    "SERVER_NAME",
    "Client",
    "ClientError",
    "ProgressCallback",
    "primary_row",
]

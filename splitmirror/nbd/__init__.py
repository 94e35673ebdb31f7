"""NBD (network block device) server for splitmirror exports.

:class:`NbdServer` serves an :class:`ExportCatalog` over the NBD protocol;
:class:`NbdCodec` is the sans-I/O protocol machine underneath it.
"""

from .backend import Export, ExportCatalog, ExportError
from .codec import (
    CommandRejected,
    CommandRequest,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    NbdCodec,
    NeedData,
    OptionRequest,
    ProtocolError,
    State,
)
from .server import NbdServer

__all__ = [
    "CommandRejected",
    "CommandRequest",
    "ConnectionClosed",
    "Event",
    "Export",
    "ExportCatalog",
    "ExportError",
    "LocalProtocolError",
    "NbdCodec",
    "NbdServer",
    "NeedData",
    "OptionRequest",
    "ProtocolError",
    "State",
]

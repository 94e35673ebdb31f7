"""Pair commands to the mirror end of a remote pair, over the interconnect.

The primary end's side of the ``PairCommand`` call: sent by the commands of
the primary end, by the copy task when a copy completes and by link
recovery; a refusal or an unreachable peer comes back as our own error.
"""

from __future__ import annotations

import grpc

from ..pairstate.pair import Pair
from ..replication.link import relay
from ..v1 import interconnect_pb2 as ic


async def command(pair: Pair, op: int, **fields: object) -> ic.MirrorState:
    assert pair.link is not None
    try:
        return await pair.link.command(ic.PairCommandRequest(pair=pair.name, op=op, **fields))  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as exc:
        raise relay(exc, pair.peer_id) from None

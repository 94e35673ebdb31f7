"""A call that reached the wrong port of a daemon says which port it reached.

The host API and the interconnect listen on separate ports.  Without this, a
CLI pointed at the interconnect gets gRPC's bare "Method not found!"; with
it, each server answers the other service's methods with UNIMPLEMENTED and a
message naming the system and what listens there.
"""

from __future__ import annotations

from typing import Any

import grpc

HOST_API = "splitmirror.v1.HostApi"
INTERCONNECT = "splitmirror.v1.Interconnect"


class WrongPort(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Answers every method of ``service`` with UNIMPLEMENTED and ``message``."""

    def __init__(self, service: str, message: str) -> None:
        self.prefix = f"/{service}/"
        self.message = message

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        if not handler_call_details.method.startswith(self.prefix):
            return None
        message = self.message

        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            raise AssertionError("abort returns only by raising")

        return grpc.unary_unary_rpc_method_handler(refuse)


def wrong_port_handlers(system_id: int, role: str) -> tuple[WrongPort, WrongPort]:
    """(for the interconnect server, for the host API server)."""
    on_interconnect = WrongPort(HOST_API, f"that is the interconnect port of system {system_id} ({role}d), "
                                          "not its host API: the host API listens on the daemon's --listen address")
    on_host_api = WrongPort(INTERCONNECT, f"that is the host API port of system {system_id} ({role}d), "
                                          "not its interconnect: peers connect to its --interconnect address")
    return on_interconnect, on_host_api

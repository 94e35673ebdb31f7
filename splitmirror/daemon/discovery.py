"""What each port says about itself: gRPC health and server reflection.

The host API port and the interconnect port each report only their own
service (``splitmirror.v1.HostApi`` on one, ``splitmirror.v1.Interconnect``
on the other; another service name is NOT_FOUND), and reflection answers on
``grpc.reflection.v1`` as well as ``v1alpha``.  The two reflection protocols
have the same messages field for field, so one servicer serves both.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class PortServices:
    """Health and reflection of one gRPC server that carries ``service``."""

    def __init__(self, server: grpc.aio.Server, service: str) -> None:
        self.service = service
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (service, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
        servicer = AsyncReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
        v1 = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            REFLECTION_V1, {"ServerReflectionInfo": v1}),))

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

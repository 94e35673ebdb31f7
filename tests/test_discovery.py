"""What each port of a real daemon says about itself: gRPC health per service, reflection v1 and v1alpha."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from splitmirror.testing import Site

HOST_API = "splitmirror.v1.HostApi"
INTERCONNECT = "splitmirror.v1.Interconnect"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    one = Site("primary", 1001, tmp_path)
    one.start(timeout=60)
    yield one
    one.kill()


def health_of(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=10)
        except grpc.RpcError as err:
            return err.code().name  # type: ignore[attr-defined, no-any-return]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def services(address: str, version: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    return {s.name for s in replies[0].list_services_response.service}


def test_each_port_reports_only_its_own_service(site: Site) -> None:
    assert health_of(site.address, "") == "SERVING"
    assert health_of(site.address, HOST_API) == "SERVING"
    assert health_of(site.address, INTERCONNECT) == "NOT_FOUND"
    assert health_of(site.interconnect, "") == "SERVING"
    assert health_of(site.interconnect, INTERCONNECT) == "SERVING"
    assert health_of(site.interconnect, HOST_API) == "NOT_FOUND"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha(site: Site, version: str) -> None:
    host = services(site.address, version)
    assert HOST_API in host and INTERCONNECT not in host and "grpc.health.v1.Health" in host
    assert "grpc.reflection.v1.ServerReflection" in host
    peer = services(site.interconnect, version)
    assert INTERCONNECT in peer and HOST_API not in peer

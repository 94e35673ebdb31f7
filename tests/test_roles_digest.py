"""An idle keepalive carries a roles digest, not the per-pair roles list (issue 20)."""

from __future__ import annotations

import grpc
import pytest

from splitmirror.replication.link import SYSTEM_ID_KEY
from splitmirror.testing import Site, wait_status
from splitmirror.v1 import interconnect_pb2 as ic
from splitmirror.v1 import interconnect_pb2_grpc as ic_grpc

AS_PRIMARY = ((SYSTEM_ID_KEY, "1001"),)


def test_unchanged_roles_send_no_list(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    for n in range(3):
        primary.cli("volume", "create", f"v{n}", "--size", "1M")
        primary.cli("pair", "create", f"p{n}", "--pvol", f"v{n}", "--svol", f"v{n}-r", "--peer", "2001", "--wait")
    for n in range(3):
        wait_status(secondary, f"p{n}", ["DUPLEX"])
    with grpc.insecure_channel(secondary.interconnect) as channel:
        stub = ic_grpc.InterconnectStub(channel)

        def hello(digest: bytes) -> ic.HelloReply:
            reply: ic.HelloReply = stub.Hello(ic.HelloRequest(system_id=1001, role="primary", roles_digest=digest),
                                              metadata=AS_PRIMARY, timeout=10)
            return reply

        first = hello(b"")
        assert sorted(r.pair for r in first.roles) == ["p0", "p1", "p2"]
        assert not first.roles_unchanged and len(first.roles_digest) == 16
        # The caller holds that list: the answer carries no per-pair record.
        again = hello(first.roles_digest)
        assert again.roles_unchanged and len(again.roles) == 0 and again.roles_digest == first.roles_digest
        # A digest the secondary did not send gets the full list.
        other = hello(bytes(16))
        assert not other.roles_unchanged and len(other.roles) == 3
        # A change at the secondary's end (here its status) changes the digest: the list comes again.
        primary.cli("pair", "split", "p1")
        wait_status(secondary, "p1", ["SPLIT"])
        changed = hello(first.roles_digest)
        assert not changed.roles_unchanged and changed.roles_digest != first.roles_digest
        assert {r.pair: r.status for r in changed.roles}["p1"] == "SPLIT"
        # A digest over the limit is refused, naming the field and the limit.
        with pytest.raises(grpc.RpcError) as err:
            hello(bytes(33))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "roles_digest" in (err.value.details() or "") and "32" in (err.value.details() or "")

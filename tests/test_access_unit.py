"""AccessPolicy without a daemon: per-client calls in flight."""

from __future__ import annotations

import contextlib

import pytest

from splitmirror.errors import ResourceExhausted
from splitmirror.ports.access import AccessPolicy, Identity


class Caller:
    """The two things AccessPolicy reads from a gRPC servicer context."""

    def __init__(self, token: str = "", peer: str = "ipv4:127.0.0.1:5555") -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return self._peer


def test_one_client_cannot_hold_more_than_its_share_of_calls() -> None:
    tokens = {"flood-token": Identity("flood", "host", "token"), "watch-token": Identity("watch", "viewer", "token")}
    policy = AccessPolicy(tls=False, tokens=tokens, max_inflight=3)
    with contextlib.ExitStack() as running:
        for _ in range(3):
            running.enter_context(policy.admitted("GetStats", Caller("flood-token")))
        with pytest.raises(ResourceExhausted, match="too many requests from flood in flight"), \
                policy.admitted("GetStats", Caller("flood-token")):
            pass
        with policy.admitted("GetStats", Caller("watch-token")) as who:  # another client is not affected
            assert who.name == "watch"
    with policy.admitted("GetStats", Caller("flood-token")):  # slots come back when calls end
        pass
    assert not policy._inflight


def test_anonymous_callers_count_by_address_not_port() -> None:
    policy = AccessPolicy(tls=False, max_inflight=1)
    with policy.admitted("GetStats", Caller(peer="ipv4:10.0.0.1:4000")):
        with pytest.raises(ResourceExhausted, match=r"from 10\.0\.0\.1 in flight"), \
                policy.admitted("GetStats", Caller(peer="ipv4:10.0.0.1:4001")):
            pass
        with policy.admitted("GetStats", Caller(peer="ipv4:10.0.0.2:4000")):
            pass


def test_no_limit_by_default() -> None:
    policy = AccessPolicy(tls=False)
    with contextlib.ExitStack() as running:
        for _ in range(1000):
            running.enter_context(policy.admitted("GetStats", Caller()))

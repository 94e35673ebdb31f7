"""The channel to one host API: connect, TLS, bearer token, and one unary call with its errors."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio

from splitmirror.v1 import host_pb2_grpc

from .errors import ClientError, from_rpc_error

__all__ = ["MAX_IO", "MAX_MESSAGE", "SERVER_NAME", "Connection"]

#: The name every daemon certificate carries: ``splitmirror.tls.SERVER_NAME``,
#: not imported because that module loads ``cryptography`` for certificate making.
SERVER_NAME = "splitmirror"
#: Largest gRPC message either side accepts.
MAX_MESSAGE = 64 << 20
#: Largest payload of one Read or Write request the host API accepts.
MAX_IO = 32 << 20

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class Connection:
    """The connection that every group of calls of :class:`client.Client` goes through."""

    def __init__(self, server: str, *, timeout: float | None = None, connect_timeout: float = 10.0,
                 tls_dir: str | os.PathLike[str] | None = None, identity: str = "admin",
                 token: str | None = None) -> None:
        self.server = server
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.identity = identity
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: host_pb2_grpc.HostApiAsyncStub | None = None
        self._connected = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel and wait (at most ``connect_timeout``) for the
        connection to be established or to fail."""
        self._get_stub()
        if self._connected:
            return
        channel = self._channel
        assert channel is not None
        deadline = time.monotonic() + self.connect_timeout
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # Let the next RPC (wait_for_ready=False) fail with gRPC's own
                # explanation (connection refused, DNS failure...).
                break
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise ClientError("UNAVAILABLE", f"channel to {self.server} is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    "UNAVAILABLE",
                    f"cannot connect to {self.server}: no answer within {self.connect_timeout:g}s",
                )
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
            except TimeoutError:
                continue
            state = channel.get_state(try_to_connect=True)
        self._connected = True

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        self._connected = False
        if channel is not None:
            await channel.close(None)

    def _get_stub(self) -> host_pb2_grpc.HostApiAsyncStub:
        if self._stub is None:
            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ]
            if self.tls_dir is None:
                self._channel = grpc.aio.insecure_channel(self.server, options=options)
            else:
                self._channel = grpc.aio.secure_channel(self.server, self._credentials(), options=[
                    *options, ("grpc.ssl_target_name_override", SERVER_NAME)])
            self._stub = host_pb2_grpc.HostApiStub(self._channel)
        return self._stub

    def _credentials(self) -> grpc.ChannelCredentials:
        assert self.tls_dir is not None
        d = self.tls_dir
        files = [d / "ca.pem", d / f"client-{self.identity}.key", d / f"client-{self.identity}.pem"]
        try:
            ca, key, cert = (f.read_bytes() for f in files)
        except OSError as exc:
            raise ClientError("INVALID_ARGUMENT", f"TLS identity {self.identity!r}: {exc.filename}: "
                                                  f"{exc.strerror}") from None
        return grpc.ssl_channel_credentials(ca, key, cert)

    async def _call(
        self,
        method: Callable[[host_pb2_grpc.HostApiAsyncStub], grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp]],
        request: _Req,
    ) -> _Resp:
        if not self._connected:
            await self.connect()
        stub = self._get_stub()
        try:
            return await method(stub)(request, timeout=self.timeout, wait_for_ready=False,
                                      metadata=self._metadata or None)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

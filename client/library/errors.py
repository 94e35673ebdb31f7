"""The one error type of the client library, made from a failed gRPC call."""

from __future__ import annotations

import grpc
import grpc.aio

__all__ = ["ClientError", "from_rpc_error"]


class ClientError(Exception):
    """A refused or failed request; ``str(err)`` is the server's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status_code(self) -> grpc.StatusCode | None:
        """The :class:`grpc.StatusCode` named by ``code``, if it names one."""
        return grpc.StatusCode.__members__.get(self.code)

    def __repr__(self) -> str:
        return f"ClientError({self.code!r}, {self.message!r})"


def from_rpc_error(err: grpc.aio.AioRpcError) -> ClientError:
    code = err.code()
    details = err.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    return ClientError(name, details or name.lower().replace("_", " "))

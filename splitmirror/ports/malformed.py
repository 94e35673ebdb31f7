"""Requests that do not parse: INVALID_ARGUMENT, not gRPC's UNKNOWN.

Without this interceptor a message that fails to deserialize is answered
UNKNOWN, with a traceback in the daemon's log.  It wraps every method's
deserializer so that a bad message becomes a sentinel, and the method so
that the sentinel is refused with one status, for unary requests and for
each message of a request stream alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]

MESSAGE = "malformed request message"
_MALFORMED = object()


class MalformedInStream(Exception):
    """A message of a request stream did not parse."""


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:
            return _MALFORMED

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _MALFORMED:
            raise MalformedInStream
        yield request


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                if request is _MALFORMED:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
        if handler.unary_stream is not None:
            producer = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if request is _MALFORMED:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)
                async for reply in producer(request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
        if handler.stream_stream is not None:
            duplex = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                try:
                    async for reply in duplex(_checked(requests), context):
                        yield reply
                except MalformedInStream:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
        return handler  # no stream-unary method is served

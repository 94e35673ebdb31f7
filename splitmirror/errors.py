"""Errors a user can cause, each tied to the gRPC status that fits it."""

from __future__ import annotations

import grpc


class SplitmirrorError(Exception):
    """A refused request; ``str(err)`` is the one line shown to the user."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SplitmirrorError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SplitmirrorError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SplitmirrorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SplitmirrorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(SplitmirrorError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(SplitmirrorError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(SplitmirrorError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SplitmirrorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SplitmirrorError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(SplitmirrorError):
    """Data at rest no longer matches what was recorded of it (a backup track against its receipt)."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[SplitmirrorError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, OutOfRange, Unavailable,
                PermissionDenied, ResourceExhausted, DeadlineExceeded, DataLoss)
}


def from_status(code: grpc.StatusCode, message: str) -> SplitmirrorError:
    """Rebuild the error a peer reported (for relaying peer refusals)."""
    return _BY_CODE.get(code, SplitmirrorError)(message)

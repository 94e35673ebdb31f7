"""The answer to each handshake option, decided without I/O.

:func:`answer_option` takes one :class:`~splitmirror.nbd.codec.OptionRequest`
and returns what to send and what happens next (an export attached, the
connection ended, TLS to start).  Opening and admitting exports are plain
calls, so the whole handshake runs without awaiting anything but STARTTLS.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Protocol

from .backend import Admission, Export, ExportCatalog, ExportError
from .codec import NbdCodec, OptionRequest
from .constants import BASE_ALLOCATION, Errno, Info, Option, OptionReply
from .reply_values import meta_context_id, option_refusal, preferred_block_size, transmission_flags

__all__ = ["HandshakeContext", "OptionOutcome", "answer_option"]


class HandshakeContext(Protocol):
    """What answering an option needs to know about the server and the client."""

    @property
    def catalog(self) -> ExportCatalog: ...

    @property
    def max_request(self) -> int: ...

    @property
    def tls(self) -> ssl.SSLContext | None: ...

    @property
    def admit(self) -> Admission | None: ...

    @property
    def log(self) -> logging.Logger: ...


@dataclass
class OptionOutcome:
    """Bytes to send, then: the export attached, why to hang up, or TLS to start."""

    send: bytes = b""
    attach: Export | None = None
    end: str | None = None
    starttls: bool = False


def _refusal(ctx: HandshakeContext, name: str, address: str, cert: bytes | None, listing: bool = False) -> str | None:
    admit = ctx.admit
    return None if admit is None else admit(name, address, cert, listing)


def _open(ctx: HandshakeContext, peer: str, name: str, address: str, cert: bytes | None) -> Export | ExportError:
    refusal = _refusal(ctx, name, address, cert)
    if refusal is not None:
        return ExportError(Errno.EPERM, refusal)
    try:
        return ctx.catalog.open_export(name)
    except ExportError as exc:
        return exc
    except Exception:
        ctx.log.exception("nbd %s: opening export %r failed", peer, name)
        return ExportError(Errno.EIO, "internal error opening the export")


def _refused_export(ctx: HandshakeContext, peer: str, name: str, exc: ExportError) -> None:
    ctx.log.warning("nbd %s: refused export %r: %s (errno %d)", peer, name, exc.message, exc.errno)


def answer_option(
    ctx: HandshakeContext,
    codec: NbdCodec,
    request: OptionRequest,
    *,
    peer: str,
    address: str,
    cert: bytes | None,
    tls_on: bool,
) -> OptionOutcome:
    """The reply to one option of the client at ``peer`` (``cert``: its TLS certificate)."""
    option = request.option
    if request.invalid is not None:
        ctx.log.warning("nbd %s: invalid option %d: %s", peer, option, request.invalid)
        if option == Option.EXPORT_NAME:
            return OptionOutcome(end="invalid NBD_OPT_EXPORT_NAME")
        return OptionOutcome(codec.send_option_error(option, OptionReply.ERR_INVALID, request.invalid))
    if option == Option.STARTTLS:
        if ctx.tls is None:
            return OptionOutcome(codec.send_option_error(option, OptionReply.ERR_UNSUP, "TLS is not configured"))
        if tls_on:
            return OptionOutcome(codec.send_option_error(option, OptionReply.ERR_INVALID, "TLS already on"))
        return OptionOutcome(codec.send_option_ack(option), starttls=True)
    if ctx.tls is not None and not tls_on:
        if option == Option.EXPORT_NAME:
            ctx.log.warning("nbd %s: NBD_OPT_EXPORT_NAME without TLS refused", peer)
            return OptionOutcome(end="TLS required")
        if option != Option.ABORT:
            return OptionOutcome(codec.send_option_error(option, OptionReply.ERR_TLS_REQD, "TLS is required"))
    match option:
        case Option.EXPORT_NAME:
            export = _open(ctx, peer, request.name, address, cert)
            if isinstance(export, ExportError):
                _refused_export(ctx, peer, request.name, export)
                return OptionOutcome(end="NBD_OPT_EXPORT_NAME refused")
            flags = transmission_flags(export, codec.structured_replies)
            return OptionOutcome(codec.send_export_name_reply(export.size, flags), attach=export)
        case Option.INFO | Option.GO:
            return _info_or_go(ctx, codec, request, peer, address, cert)
        case Option.LIST:
            names = [n for n in ctx.catalog.export_names() if _refusal(ctx, n, address, cert, True) is None]
            out = [codec.send_server_entry(name) for name in names]
            out.append(codec.send_option_ack(option))
            return OptionOutcome(b"".join(out))
        case Option.ABORT:
            return OptionOutcome(codec.send_option_ack(option), end="client sent NBD_OPT_ABORT")
        case Option.STRUCTURED_REPLY:
            return OptionOutcome(codec.send_option_ack(option))
        case Option.LIST_META_CONTEXT | Option.SET_META_CONTEXT:
            context_id = meta_context_id(option, request.queries)
            out = [] if context_id is None else [codec.send_meta_context(option, context_id, BASE_ALLOCATION)]
            out.append(codec.send_option_ack(option))
            return OptionOutcome(b"".join(out))
        case _:
            ctx.log.debug("nbd %s: unsupported option %d", peer, option)
            return OptionOutcome(
                codec.send_option_error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")
            )


def _info_or_go(
    ctx: HandshakeContext, codec: NbdCodec, request: OptionRequest, peer: str, address: str, cert: bytes | None
) -> OptionOutcome:
    option = request.option
    export = _open(ctx, peer, request.name, address, cert)
    if isinstance(export, ExportError):
        _refused_export(ctx, peer, request.name, export)
        return OptionOutcome(codec.send_option_error(option, option_refusal(export), export.message))
    out = [
        codec.send_export_info(option, export.size, transmission_flags(export, codec.structured_replies)),
        codec.send_block_size_info(option, 1, preferred_block_size(export, ctx.max_request), ctx.max_request),
    ]
    if Info.NAME in request.info_requests:
        out.append(codec.send_text_info(option, Info.NAME, export.name))
    out.append(codec.send_option_ack(option))
    return OptionOutcome(b"".join(out), attach=export if option == Option.GO else None)

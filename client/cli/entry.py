"""The console entry point: parse, run one command, turn every failure into one error line."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from splitmirror.errors import SplitmirrorError

from ..agent import AgentError
from ..library import Client, ClientError
from . import backups, certs, completion, events, host_io, pairs, restore, stats, volumes
from .output import Output
from .parser import ENV_TOKEN, PROG, parse_args, resolve_sizes

__all__ = ["COMMANDS", "error_message", "main", "run"]

_Handler = Callable[[Client, argparse.Namespace, Output], Any]

COMMANDS: dict[str, _Handler] = {
    "volume": volumes.volume,
    "write": host_io.write,
    "read": host_io.read,
    "flush": host_io.flush,
    "checksum": host_io.checksum,
    "pair": pairs.pair,
    "stats": stats.stats,
    "verify": pairs.verify,
    "backup": backups.backup,
    "backups": backups.backups,
    "backup-schedule": backups.schedule,
    "backup-check": backups.check,
    "backup-verify": backups.verify,
    "restore": restore.restore,
    "events": events.events,
}


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file) as fh:
            return fh.read().strip() or None
    return os.environ.get(ENV_TOKEN) or None


async def run(args: argparse.Namespace, out: Output) -> None:
    async with Client(args.server, tls_dir=args.tls_dir, identity=args.identity, token=_token(args)) as client:
        await COMMANDS[args.command](client, args, out)


# ---------------------------------------------------------------------- errors


def error_message(err: BaseException, server: str = "") -> str:
    """The one line shown for ``err`` (without the ``splitmirror: error:`` prefix)."""
    if isinstance(err, ClientError):
        message = err.message
        if err.code == "UNAVAILABLE":
            lowered = message.lower()
            if "handshake failed" in lowered:
                found = re.search(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:]+))?", message)
                reason = f"{found[1]} ({found[2].strip()})" if found and found[2] else found[1] if found else ""
                reason = f": {reason}" if reason else ""
                message = (f"TLS handshake with splitmirror server at {server} failed{reason}; "
                           "check that --tls-dir holds the CA that signed the server's certificate "
                           "and a client certificate the server accepts")
            elif "failed parsing http/2" in lowered:
                message = f"{server} is not a gRPC server: {_what_is_there(server)}"
            elif lowered.startswith("failed to connect to all addresses"):
                reason = message.rsplit(": ", 1)[-1]
                if reason == "Socket closed":
                    reason += " (a server that requires TLS closes plaintext connections: pass --tls-dir)"
                message = f"cannot reach splitmirror server at {server}: {reason}"
            elif "dns resolution failed" in lowered or "errors resolving" in lowered:
                reason = message.rsplit(": ", 1)[-1].strip(" ]")
                message = f"cannot resolve splitmirror server address {server}: {reason}"
        elif err.code == "UNIMPLEMENTED":
            if message.startswith("that is the"):  # a daemon's other port says what it is
                message = f"{server}: {message}"
            else:
                message = (f"the gRPC server at {server} does not offer the splitmirror host API "
                           f"(it answered: {message})")
    elif isinstance(err, SplitmirrorError):
        message = err.message
    elif isinstance(err, OSError) and err.strerror:
        message = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        message = str(err) or type(err).__name__
    return " ".join(message.split())


def _what_is_there(server: str) -> str:
    """Peek at what answers on ``server`` (only after gRPC failed to talk to it)."""
    host, _, port = server.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=2) as sock:
            sock.settimeout(2)
            greeting = sock.recv(8)
    except (OSError, ValueError):
        greeting = b""
    if greeting.startswith(b"NBDMAGIC"):
        return "it is an NBD server (a daemon's --nbd port); the host API is elsewhere (the daemon's --listen)"
    if greeting.startswith(b"HTTP/"):
        return "it speaks HTTP/1, not HTTP/2"
    return "it does not speak HTTP/2"


def _fail(message: str, stderr: IO[str] | None = None) -> None:
    stream = stderr if stderr is not None else sys.stderr
    stream.write(f"{PROG}: error: {message}\n")
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    out = Output(args.json)
    try:
        resolve_sizes(args)
        if args.command == "read" and args.length == 0:
            raise SplitmirrorError("--length: must be greater than 0")
        if args.command == "certs":
            certs.certs(args, out)
        elif args.command == "completion":
            completion.completion(args, out)
        else:
            asyncio.run(run(args, out))
    except (ClientError, SplitmirrorError, AgentError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            # The reader of our stdout went away (e.g. "| head"): stop quietly.
            _silence_stdout()
            return 1
        _fail(error_message(err, args.server))
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    return 0


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass

"""``--metrics HOST:PORT``: the Prometheus text exposition over HTTP(S).

A deliberately small HTTP/1.1 responder on the daemon's event loop: a scrape
runs the collectors on the same thread that changes pairs and volumes, so
nothing is locked and nothing is copied ahead of time (``prometheus_client``'s
own servers run the collectors on a thread of their own).  It answers
``GET``/``HEAD /metrics`` (and a one-line ``/``), closes the connection after
each answer, and treats every byte as hostile: the request head is at most
8 KiB and must arrive within 10 s, at most :data:`MAX_CLIENTS` connections
are served at once.  With TLS (``--tls-dir``) the client must present a
certificate of the deployment's CA with a client role; the viewer role is
enough (Prometheus scrapes with ``client-viewer.pem``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("splitmirror.metrics")

#: The classic text format, which every Prometheus 2.x reads (the names are plain ASCII).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8 << 10
HEAD_TIMEOUT = 10.0
MAX_CLIENTS = 16

#: (DER client certificate or None, client address) -> why refused, or None.
ScrapeAdmission = Callable[[bytes | None, str], str | None]


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, address: str, tls: ssl.SSLContext | None = None,
                 admit: ScrapeAdmission | None = None) -> None:
        self.registry = registry
        self.address = address
        self.tls = tls
        self.admit = admit
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.scrapes = 0

    async def start(self) -> int:
        host, _, port = self.address.rpartition(":")
        tls = {"ssl": self.tls, "ssl_handshake_timeout": HEAD_TIMEOUT} if self.tls is not None else {}
        self._server = await asyncio.start_server(self._client, host.strip("[]"), int(port), limit=MAX_HEAD,
                                                  **tls)  # type: ignore[arg-type]
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = self._answer(head, writer)
            send_body = not head.startswith(b"HEAD ")
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status, REASONS[status], content_type.encode(), len(body)) + (body if send_body else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ssl.SSLError,
                asyncio.CancelledError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, text, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"only GET and HEAD\n"
        if self.admit is not None:
            ssl_object = writer.get_extra_info("ssl_object")
            cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            peer = writer.get_extra_info("peername")
            refusal = self.admit(cert, f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))
            if refusal is not None:
                return 403, text, f"permission denied: {refusal}\n".encode()
        if target == b"/metrics":
            self.scrapes += 1
            return 200, CONTENT_TYPE, generate_latest(self.registry)
        if target == b"/":
            return 200, text, b"splitmirror metrics: /metrics\n"
        return 404, text, b"not found: the metrics are at /metrics\n"


REASONS = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed"}

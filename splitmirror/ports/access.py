"""Who may call which host API method, how often, and the audit trail of refusals.

Roles (one table, :data:`METHOD_ROLES`):

- ``viewer``: display and status;
- ``host``: what a viewer may, plus I/O on volumes (optionally only the
  volumes named for that identity);
- ``admin``: everything (volumes, pairs, backups, restores).

An identity comes from the verified client certificate (TLS) or from a bearer
token (``authorization: Bearer ...`` metadata, tokens from a file). NBD
exports follow the same roles by the client certificate of NBD's STARTTLS
(:meth:`AccessPolicy.export_refusal`). Without TLS and without a token file,
access control is off (every caller is admin), as before. Token values never
reach a log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import hmac
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, PermissionDenied, ResourceExhausted
from ..tls import ROLES, SYSTEM_OU, Subject, cert_subject, subject_from_der

audit = logging.getLogger("splitmirror.audit")

VIEWER = frozenset({"ListVolumes", "GetVolume", "DisplayPairs", "ListBackups", "ListSchedules", "GetStats",
                    "Events"})
HOST_IO = frozenset({"Write", "Read", "Flush", "Checksum"})
#: The least role each method needs; methods not listed need ``admin``.
METHOD_ROLES: Mapping[str, str] = {**{m: "viewer" for m in VIEWER}, **{m: "host" for m in HOST_IO}}
_RANK = {"viewer": 0, "host": 1, "admin": 2}


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    role: str
    via: str  # "cert", "token", "none"

    def __str__(self) -> str:
        return f"{self.name} ({self.role}, {self.via})"


ANONYMOUS_ADMIN = Identity("anonymous", "admin", "none")


def load_tokens(path: Path) -> dict[str, Identity]:
    """A token file: one ``NAME ROLE TOKEN`` per line; '#' starts a comment.

    Refused, as ssh refuses a private key, when its group or others may read
    or write it; refused when one token is on two lines (which line's role
    would it carry?)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise InvalidArgument(f"token file {path}: its mode {mode & 0o777:04o} lets group or others access "
                                  f"it; run chmod 600 {path}")
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"token file {path}: not UTF-8 text") from None
    tokens: dict[str, Identity] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        # The line itself may hold a secret: never echo it.
        if len(parts) != 3:
            raise InvalidArgument(f"token file {path} line {number}: expected NAME ROLE TOKEN")
        name, role, token = parts
        if role not in ROLES:
            raise InvalidArgument(f"token file {path} line {number}: role must be one of {', '.join(ROLES)}")
        if len(token) < 16:
            raise InvalidArgument(f"token file {path} line {number}: token shorter than 16 characters")
        if token in lines:
            raise InvalidArgument(f"token file {path} line {number}: the same token as line {lines[token]}; "
                                  "give every identity its own token")
        lines[token] = number
        tokens[token] = Identity(name, role, "token")
    return tokens


class TokenBucket:
    """``rate`` requests per second on average, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = time.monotonic()

    def take(self, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1:
            self.level -= 1
            return True
        return False


class RateLimiter:
    """One token bucket per client key; idle buckets are forgotten."""

    MAX_CLIENTS = 10_000

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, TokenBucket] = {}
        self.refused = 0
        self._last_refusal_log = 0.0

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.MAX_CLIENTS:
                self._sweep(now)
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        if bucket.take(now):
            return True
        self.refused += 1
        if now - self._last_refusal_log > 10:  # a flood must not flood the log
            self._last_refusal_log = now
            audit.warning("rate limit: refusing requests from %s (%d refused so far)", key, self.refused)
        return False

    def _sweep(self, now: float) -> None:
        idle = self.burst / self.rate if self.rate else 0
        for key, bucket in list(self.buckets.items()):
            if now - bucket.stamp > idle:
                del self.buckets[key]
        while len(self.buckets) >= self.MAX_CLIENTS:
            self.buckets.pop(next(iter(self.buckets)))


def _peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` -> ``127.0.0.1`` (the port changes per connection)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer


class AccessPolicy:
    """Identifies the caller of a host API method, checks its role and rate."""

    def __init__(self, tls: bool, tokens: Mapping[str, Identity] | None = None,
                 host_volumes: Mapping[str, list[str]] | None = None, rate: float = 0.0,
                 burst: float = 0.0, max_inflight: int = 0) -> None:
        self.tls = tls
        self.tokens = dict(tokens or {})
        self.host_volumes = dict(host_volumes or {})
        self.limiter = RateLimiter(rate, burst or max(rate * 2, 1.0))
        #: Calls one client may have running at once (0: no limit), so that
        #: one client cannot take every slot of --max-concurrent-rpcs.
        self.max_inflight = max_inflight
        self._inflight: dict[str, int] = {}

    @property
    def enforcing(self) -> bool:
        return self.tls or bool(self.tokens)

    def identify(self, context: Any) -> Identity | None:
        """The caller, or None when it presented nothing valid."""
        metadata = dict(context.invocation_metadata() or ())
        auth = metadata.get("authorization", "")
        if isinstance(auth, str) and auth[:7].lower() == "bearer " and self.tokens:
            given = auth[7:].strip().encode()
            for token, identity in self.tokens.items():
                if hmac.compare_digest(given, token.encode()):
                    return identity
            return None
        if self.tls:
            subject = cert_subject(context)
            if subject is not None and subject.kind != SYSTEM_OU:
                return Identity(subject.name, subject.kind, "cert")
            return None
        if not self.tokens:
            return ANONYMOUS_ADMIN
        return None

    @contextlib.contextmanager
    def admitted(self, method: str, context: Any, volume: str | None = None) -> Iterator[Identity]:
        """:meth:`check` the call, and count it against its client's calls in
        flight until the block ends."""
        identity = self.check(method, context, volume)
        key = self._client_key(identity, context)
        with self._counted(key, self.max_inflight, f"too many requests from {key} in flight "
                                                   f"(at most {self.max_inflight}): wait for some to finish"):
            yield identity

    @contextlib.contextmanager
    def bounded(self, what: str, limit: int, context: Any) -> Iterator[None]:
        """At most ``limit`` calls of kind ``what`` (e.g. whole-volume
        checksums) from one client at once; more are RESOURCE_EXHAUSTED."""
        identity = self.identify(context) if self.enforcing else ANONYMOUS_ADMIN
        key = self._client_key(identity, context)
        with self._counted(f"{what}\0{key}", limit, f"too many {what} calls from {key} running (at most "
                                                     f"{limit} per client): wait for one to finish"):
            yield

    @contextlib.contextmanager
    def _counted(self, key: str, limit: int, refusal: str) -> Iterator[None]:
        running = self._inflight.get(key, 0)
        if limit and running >= limit:
            raise ResourceExhausted(refusal)
        self._inflight[key] = running + 1
        try:
            yield
        finally:
            left = self._inflight[key] - 1
            if left:
                self._inflight[key] = left
            else:
                del self._inflight[key]

    @staticmethod
    def _client_key(identity: Identity | None, context: Any) -> str:
        """Whom limits count against: the identity, or the address when anonymous."""
        return identity.name if identity is not None and identity.via != "none" else _peer_host(context.peer())

    def check(self, method: str, context: Any, volume: str | None = None) -> Identity:
        """Raise PermissionDenied (after one audit line) or ResourceExhausted."""
        identity = self.identify(context) if self.enforcing else ANONYMOUS_ADMIN
        key = self._client_key(identity, context)
        if not self.limiter.allow(key):
            raise ResourceExhausted(f"too many requests from {key}: slow down and retry")
        if identity is None:
            self._deny("unauthenticated", method, context, "no valid client certificate or token")
        assert identity is not None
        needed = METHOD_ROLES.get(method, "admin")
        if _RANK[identity.role] < _RANK[needed]:
            self._deny(str(identity), method, context, f"role {identity.role} may not call {method}")
        if volume is not None and method in HOST_IO:
            refusal = self.volume_refusal(identity, volume)
            if refusal is not None:
                self._deny(str(identity), method, context, refusal)
        return identity

    def volume_refusal(self, identity: Identity, volume: str) -> str | None:
        """Why ``identity`` may not do I/O on ``volume``, or None: ``--host-volumes
        NAME=PATTERN`` narrows a ``host`` identity to the matching volumes."""
        patterns = self.host_volumes.get(identity.name)
        if identity.role == "host" and patterns is not None and not any(
                fnmatch.fnmatchcase(volume, p) for p in patterns):
            return f"volume {volume!r} is not one of {identity.name}'s"
        return None

    def export_refusal(self, subject: Subject | None, export: str) -> str | None:
        """Why the NBD client whose verified TLS certificate names ``subject`` may
        not attach ``export``, or None.

        The roles mean what they mean on the host API: ``admin`` attaches every
        export; ``host`` those its ``--host-volumes`` patterns match (all without
        an entry); ``viewer`` none, not even read-only, because a viewer may not
        Read a volume over gRPC either (display and status only: an export would
        hand it the data). A system certificate is a peer daemon, not a host.
        """
        if subject is None or subject.kind not in _RANK:
            return f"a host or admin client certificate is needed to attach export {export!r}"
        identity = Identity(subject.name, subject.kind, "cert")
        if _RANK[identity.role] < _RANK["host"]:
            return f"role {identity.role} may not attach export {export!r} (host or admin needed)"
        return self.volume_refusal(identity, export)

    def scrape_refusal(self, cert: bytes | None, address: str) -> str | None:
        """Why a metrics scrape whose verified TLS client certificate is ``cert``
        (DER) is refused, or None: any client role may read metrics (viewer is
        enough); a peer's system certificate or none may not."""
        subject = subject_from_der(cert) if cert else None
        if subject is not None and subject.kind in _RANK:
            return None
        why = "a viewer, host or admin client certificate is needed to read metrics"
        who = str(Identity(subject.name, subject.kind, "cert")) if subject is not None else "unauthenticated"
        _audit(who, "metrics", address, why)
        return why

    def audit_export(self, subject: Subject | None, export: str, address: str, why: str) -> None:
        """One audit line for a refused NBD attach, like a refused host API call."""
        who = str(Identity(subject.name, subject.kind, "cert")) if subject is not None else "unauthenticated"
        _audit(who, f"NBD:{export}", address, why)

    def _deny(self, who: str, method: str, context: Any, why: str) -> None:
        _audit(who, method, context.peer(), why)
        raise PermissionDenied(f"permission denied: {why}")


def _audit(who: str, what: str, peer: str, why: str) -> None:
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    audit.warning("audit: denied who=%s what=%s when=%s from=%s: %s", who, what, when, peer, why)

"""Async client library and ``splitmirror`` CLI for the splitmirror host API."""

import os

# Every gRPC failure reaches the caller as one ClientError (and the CLI's one
# error line); gRPC's own INFO lines, such as a failed TLS handshake, would
# repeat it on stderr.  Read when grpc is imported; an explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .library import Client, ClientError

__all__ = ["Client", "ClientError"]

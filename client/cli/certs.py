"""``splitmirror certs init``: the certificates for mutual TLS (no server needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import Output

__all__ = ["certs"]


def certs(args: argparse.Namespace, out: Output) -> None:
    from splitmirror import tls  # loads cryptography: only this command pays for it

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    written = tls.init_dir(Path(args.dir), tls.parse_systems(args.systems), tls.parse_clients(args.clients), hosts)
    if out.as_json:
        out.json([str(p) for p in written])
    else:
        for path in written:
            out.stdout.write(f"{path}\n")

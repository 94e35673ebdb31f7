"""Async client library and ``splitmirror`` CLI for the splitmirror host API."""

from .library import Client, ClientError

__all__ = ["Client", "ClientError"]

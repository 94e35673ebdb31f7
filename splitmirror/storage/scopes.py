"""Write-intent scopes: under which name a volume's hot extents are recorded.

A volume's own writes (from hosts, or copies into it) are recorded under the
volume's name; the writes a remote mirror end applies for its primary under
:func:`replicated_scope` (see :mod:`splitmirror.storage.intent` for why they
are kept apart).  The write-intent log records and clears extents by scope;
the copy table persists them and forgets every scope of a deleted volume.
"""

from __future__ import annotations

_REPLICATED = "/replicated"  # '/' never occurs in a volume name


def replicated_scope(volume: str) -> str:
    """The intent scope of the writes a remote mirror end applies to ``volume``."""
    return volume + _REPLICATED


def intent_scopes(volume: str) -> tuple[str, str]:
    """Every intent scope of ``volume``: its own writes, then the replicated ones."""
    return volume, replicated_scope(volume)


def parse_scope(scope: str) -> tuple[str, bool]:
    """``(volume, replicated)`` of an intent scope."""
    if scope.endswith(_REPLICATED):
        return scope[:-len(_REPLICATED)], True
    return scope, False

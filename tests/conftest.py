"""Shared fixtures: real daemon processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import Site


@pytest.fixture
def sites(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Site, Site]]:
    """A started primaryd (1001) and secondaryd (2001), peered; ``@pytest.mark.link_timeout(S)``
    for a test that must not see a loaded machine's late keepalive as a lost link."""
    marker = request.node.get_closest_marker("link_timeout")
    timeout = float(marker.args[0]) if marker is not None else 2.0
    primary = Site("primary", 1001, tmp_path, link_timeout=timeout)
    secondary = Site("secondary", 2001, tmp_path, link_timeout=timeout)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()


@pytest.fixture
def manual_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    """Like ``sites`` but with auto-resync off (operators resync by hand)."""
    primary = Site("primary", 1001, tmp_path, auto_resync=False)
    secondary = Site("secondary", 2001, tmp_path, auto_resync=False)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()

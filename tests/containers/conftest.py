"""Fixtures for the container tests: the image, and one fresh deployment per test.

The whole package is skipped, saying why, when no Docker engine is reachable,
when neither ``docker compose`` nor ``docker-compose`` is installed, when
``/dev/fuse`` is missing, when the image cannot be built, or when
``SPLITMIRROR_SKIP_CONTAINERS=1``.  ``SPLITMIRROR_PREBUILT_IMAGE=1`` uses the
image as it is (``SPLITMIRROR_IMAGE``, default ``splitmirror:latest``)
instead of running scripts/build-images.sh.

Every deployment has its own compose project, named after this pytest
process (``smt<pid>x<random>t<n>``): ``docker-compose down -v`` removes its
containers, networks and volumes after each test, pass or fail; at the end
of the session anything still labelled with this session's prefix is
removed, and at its start so is anything left by a session whose process is
gone (a run that was killed).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.containers import compose_demo

LINK_TIMEOUT = 2.0
PROJECT_LABEL = "com.docker.compose.project"
_PROJECT_RE = re.compile(r"^smt(\d+)x[0-9a-f]{6}")
_counter = itertools.count(1)


def _labelled_projects() -> set[str]:
    """Compose projects that own a container, network or volume on this engine."""
    found: set[str] = set()
    for cmd in (["docker", "ps", "-a"], ["docker", "network", "ls"], ["docker", "volume", "ls"]):
        proc = subprocess.run([*cmd, "--filter", f"label={PROJECT_LABEL}", "--format",
                               f'{{{{.Label "{PROJECT_LABEL}"}}}}'], capture_output=True, text=True, timeout=60)
        found.update(line.strip() for line in proc.stdout.splitlines() if line.strip())
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_project(project: str) -> None:
    with contextlib.suppress(Exception):
        compose_demo.Compose(project).down()


def _sweep(prefix: str | None) -> list[str]:
    """Remove this session's projects (``prefix``), or those of dead sessions (None)."""
    removed = []
    for project in sorted(_labelled_projects()):
        match = _PROJECT_RE.match(project)
        if not match:
            continue
        if (prefix is not None and project.startswith(prefix)) or (
                prefix is None and not _pid_alive(int(match.group(1)))):
            _remove_project(project)
            removed.append(project)
    return removed


#: Why the container tests were skipped, for the summary at the end of the run.
_skipped: list[str] = []


def _skip(reason: str) -> None:
    _skipped.append(reason)
    pytest.skip(f"container tests skipped: {reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say why, even under ``pytest -q`` (which lists no skip reasons)."""
    if _skipped:
        terminalreporter.write_line(f"tests/containers: SKIPPED, {_skipped[0]}", yellow=True, bold=True)


@pytest.fixture(scope="session")
def container_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Docker is usable and the image is built; yields this session's project prefix."""
    if _skipped:
        pytest.skip(f"container tests skipped: {_skipped[0]}")
    if os.environ.get("SPLITMIRROR_SKIP_CONTAINERS", "") not in ("", "0"):
        _skip("SPLITMIRROR_SKIP_CONTAINERS is set")
    problem = compose_demo.docker_problem()
    if problem:
        _skip(problem)
    stale = _sweep(None)
    if stale:
        print(f"removed deployments left by killed sessions: {', '.join(stale)}")
    log = tmp_path_factory.mktemp("images") / "build-images.log"
    started = time.monotonic()
    if os.environ.get("SPLITMIRROR_PREBUILT_IMAGE", "") not in ("", "0"):
        for image in (compose_demo.IMAGE, compose_demo.PROMETHEUS_IMAGE):
            if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
                _skip(f"SPLITMIRROR_PREBUILT_IMAGE is set but there is no image {image}")
    else:
        try:
            with open(log, "w") as out:
                compose_demo.build_images(out)
        except (compose_demo.ComposeError, subprocess.TimeoutExpired) as exc:
            _skip(f"the image could not be built ({' '.join(str(exc).split())}); log: {log}")
    print(f"image ready in {time.monotonic() - started:.1f}s (log: {log})")
    prefix = compose_demo.unique_project("smt")
    yield prefix
    _sweep(prefix)


@pytest.fixture
def sites(container_session: str) -> Iterator[compose_demo.Compose]:
    """A fresh three-site deployment (link timeout LINK_TIMEOUT s); torn down
    after the test, volumes included, whatever happened."""
    compose = compose_demo.Compose(f"{container_session}t{next(_counter)}", link_timeout=LINK_TIMEOUT)
    try:
        print(f"project {compose.project}: up and healthy in {compose.up():.1f}s")
        yield compose
    finally:
        for service in ("primary-a", "primary-c", "secondary"):
            with contextlib.suppress(Exception):
                print(f"--- {service} log (tail)\n{compose.logs(service)[-4000:]}")
        started = time.monotonic()
        compose.down()
        print(f"project {compose.project}: removed in {time.monotonic() - started:.1f}s")
        left = compose.project in _labelled_projects()
        assert not left, f"project {compose.project} left containers, networks or volumes behind"

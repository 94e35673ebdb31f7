"""Start-up failures of the real daemons: one line naming the flag and value, exit 2, nothing left behind."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import ROOT, Site, free_port

START_TIMEOUT = 60


def run_daemon(site: Site) -> subprocess.CompletedProcess[str]:
    """Run the daemon as configured and expect it to give up by itself."""
    return subprocess.run(site.argv(), capture_output=True, text=True, timeout=START_TIMEOUT, cwd=ROOT)


def one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_second_daemon_on_one_data_dir_exits(tmp_path: Path) -> None:
    first = Site("primary", 1001, tmp_path)
    first.start(timeout=START_TIMEOUT)
    try:
        assert first.proc is not None
        second = Site("primary", 1001, tmp_path)  # same data directory, its own ports
        assert second.data_dir == first.data_dir
        line = one_line_failure(run_daemon(second), "--data-dir", str(first.data_dir), str(first.proc.pid))
        assert line.startswith("primaryd: error: ")
        # The first one is untouched and still serves.
        assert first.cli_json("volume", "list") == []
        assert (first.data_dir / "daemon.lock").read_text().strip() == str(first.proc.pid)
    finally:
        first.stop()
    # Its lock went with it: the directory starts again.
    again = Site("primary", 1001, tmp_path)
    again.start(timeout=START_TIMEOUT)
    again.stop()
    assert "clean start" in again.log()


@pytest.mark.parametrize("flag", ["--listen", "--interconnect", "--nbd", "--metrics"])
def test_port_in_use(tmp_path: Path, listener: socket.socket, flag: str) -> None:
    port = listener.getsockname()[1]
    site = Site("secondary", 2001, tmp_path, nbd=True, metrics=True)
    attribute = {"--listen": "listen_port", "--interconnect": "peer_port", "--nbd": "nbd_port",
                 "--metrics": "metrics_port"}[flag]
    setattr(site, attribute, port)
    line = one_line_failure(run_daemon(site), f"{flag} 127.0.0.1:{port}", "address already in use")
    assert line.startswith("secondaryd: error: ")
    # Nothing half-started: no copy table, no volume directory; the lock is free.
    assert sorted(p.name for p in site.data_dir.iterdir()) == ["daemon.lock"]
    setattr(site, attribute, free_port())
    site.start(timeout=START_TIMEOUT)
    site.stop()


def test_same_address_twice(tmp_path: Path) -> None:
    site = Site("primary", 1001, tmp_path)
    site.peer_port = site.listen_port
    one_line_failure(run_daemon(site), f"--interconnect 127.0.0.1:{site.listen_port}", "--listen")


def test_bad_toml(tmp_path: Path) -> None:
    config = tmp_path / "primaryd.toml"
    config.write_text("system_id = = 3\n")
    site = Site("primary", 1001, tmp_path)
    site.extra_args = ["--config", str(config)]
    one_line_failure(run_daemon(site), f"--config {config}", "not valid TOML", "line 1")


def test_missing_data_dir_parent(tmp_path: Path) -> None:
    site = Site("primary", 1001, tmp_path)
    site.data_dir = tmp_path / "no-such-dir" / "data"
    one_line_failure(run_daemon(site), f"--data-dir {site.data_dir}", "does not exist")
    assert not (tmp_path / "no-such-dir").exists()


def test_data_dir_is_a_file(tmp_path: Path) -> None:
    site = Site("primary", 1001, tmp_path)
    site.data_dir.write_text("not a directory")
    one_line_failure(run_daemon(site), f"--data-dir {site.data_dir}", "not a directory")


def test_unreadable_certificate(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    subprocess.run([*Site("primary", 1001, tmp_path).argv()[:1], "-m", "client", "certs", "init", str(tls),
                    "--systems", "1001"], check=True, capture_output=True, timeout=120, cwd=ROOT)
    site = Site("primary", 1001, tmp_path, tls_dir=tls)
    (tls / "1001.pem").write_text("garbage\n")
    one_line_failure(run_daemon(site), f"--tls-dir {tls}", "1001.pem is not a PEM certificate")
    (tls / "1001.pem").unlink()
    (tls / "1001.pem").mkdir()  # unreadable as a file
    one_line_failure(run_daemon(site), f"--tls-dir {tls}", "1001.pem")
    (tls / "1001.pem").rmdir()
    one_line_failure(run_daemon(site), f"--tls-dir {tls}", "No such file")


def test_unreadable_token_file(tmp_path: Path) -> None:
    site = Site("primary", 1001, tmp_path)
    site.extra_args = ["--token-file", str(tmp_path / "tokens")]
    one_line_failure(run_daemon(site), f"--token-file {tmp_path / 'tokens'}", "No such file")

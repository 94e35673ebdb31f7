"""Issue 15, finding 3 against real daemons: in token mode (a token file, no
TLS) NBD and the interconnect authenticate nobody, so the daemons refuse to
start with either (or a peer) off loopback; on loopback the host API serves
a token holder and refuses a caller without one, and nothing listens on the
host's other addresses."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

import grpc
import pytest

from splitmirror.testing import ROOT, Site, free_port
from splitmirror.v1 import host_pb2, host_pb2_grpc

TOKEN = "s3cr3t-admin-token-0001"


def _token_site(tmp_path: Path, nbd: str = "", interconnect: str = "", peer: str = "") -> Site:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops admin {TOKEN}\n")
    tokens.chmod(0o600)
    site = Site("primary", 1001, tmp_path)
    site.extra_args += ["--token-file", str(tokens)]
    if nbd:
        site.extra_args += ["--nbd", nbd]
    if interconnect:
        site.extra_args += ["--interconnect", interconnect]  # the later flag wins
    if peer:
        site.extra_args += ["--peer", peer]
    return site


@pytest.mark.parametrize(("nbd", "interconnect", "peer", "setting"), [
    ("0.0.0.0:PORT", "", "", "'nbd'"),
    ("", "0.0.0.0:PORT", "", "'interconnect'"),
    ("", "[::]:PORT", "", "'interconnect'"),
    ("", "", "2001=192.0.2.7:7001", "'peer 2001'"),
    ("", "", "2001=storage-b.example:7001", "'peer 2001'"),
])
def test_token_mode_refuses_nbd_or_interconnect_off_loopback(tmp_path: Path, nbd: str, interconnect: str,
                                                             peer: str, setting: str) -> None:
    """The attack needs a port reachable from elsewhere that serves volume data
    without proof: the daemon does not start with one, and says why in one line."""
    # The port is chosen when the test runs: ids must be the same in every
    # pytest-xdist worker, so nothing random goes into the parameters.
    nbd, interconnect = (a.replace("PORT", str(free_port())) for a in (nbd, interconnect))
    site = _token_site(tmp_path, nbd, interconnect, peer)
    result = subprocess.run(site.argv(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setting in lines[0] and "authenticate nobody" in lines[0] and "--tls-dir" in lines[0], lines[0]


def _other_address() -> str | None:
    """An address of this host that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_token_mode_on_loopback_serves_token_holders_only(tmp_path: Path) -> None:
    site = _token_site(tmp_path, nbd=f"127.0.0.1:{free_port()}")
    site.start(timeout=60)
    try:
        with site.channel() as ch:
            stub = host_pb2_grpc.HostApiStub(ch)
            with pytest.raises(grpc.RpcError) as err:  # no token: nothing, not even a read
                stub.Read(host_pb2.ReadRequest(volume="v", offset=0, length=4096), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            md = (("authorization", f"Bearer {TOKEN}"),)
            stub.CreateVolume(host_pb2.CreateVolumeRequest(name="v", size=1 << 20), metadata=md, timeout=10)
            stub.Write(host_pb2.WriteRequest(volume="v", offset=0, data=b"\x42" * 4096), metadata=md, timeout=10)
            data = stub.Read(host_pb2.ReadRequest(volume="v", offset=0, length=4096), metadata=md, timeout=10).data
            assert data == b"\x42" * 4096
        other = _other_address()
        if other is not None:  # NBD and the interconnect are out of reach from anywhere but this host
            for port in (site.peer_port, int(site.extra_args[site.extra_args.index("--nbd") + 1].rsplit(":")[1])):
                with pytest.raises(OSError), contextlib.closing(socket.create_connection((other, port), 2)):
                    pass
    finally:
        site.kill()

"""The set-up a new user follows: the system-deps script and the README's commands as written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from splitmirror.testing import ROOT, free_port

SCRIPT = ROOT / "scripts" / "install-system-deps.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _fake_bin(tmp_path: Path, apt_get: str) -> Path:
    """A PATH with the script's helpers and a stand-in apt-get, and none of the tools it installs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("grep", "sort", "id", "sleep", "cat"):
        found = shutil.which(tool)
        assert found is not None
        (fake / tool).symlink_to(found)
    script = fake / "apt-get"
    script.write_text(f"#!{BASH}\n{apt_get}")
    script.chmod(0o755)
    return fake


def test_system_deps_wait_for_the_package_managers_lock(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    # Busy twice (another install holds the lock), then free.
    fake = _fake_bin(tmp_path, f"""
echo "$@" >> {calls}
n=$(cat {calls} | grep -c .)
if [ "$n" -le 2 ]; then
  echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)" >&2
  exit 100
fi
exit 0
""")
    env = {"PATH": str(fake), "SPLITMIRROR_APT_RETRY_SECONDS": "0.1", "HOME": str(tmp_path)}
    result = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("waiting for another package manager") == 2
    lines = calls.read_text().splitlines()
    assert len(lines) == 4  # update (busy, busy, done), install
    assert all("DPkg::Lock::Timeout=" in line for line in lines)
    assert "install" in lines[-1] and "qemu-utils" in lines[-1]


def test_system_deps_other_failures_are_not_retried(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = _fake_bin(tmp_path, f'echo "$@" >> {calls}\necho "E: Unable to locate package nbdfuse" >&2\nexit 100\n')
    env = {"PATH": str(fake), "SPLITMIRROR_APT_RETRY_SECONDS": "0.1", "HOME": str(tmp_path)}
    result = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 100
    assert "Unable to locate package" in result.stderr
    assert len(calls.read_text().splitlines()) == 1


README = ROOT / "README.md"


def _block_after(text: str, heading: str) -> str:
    """The first ```sh block after ``heading``."""
    rest = text[text.index(heading):]
    start = rest.index("```sh\n") + len("```sh\n")
    return rest[start:rest.index("```", start)]


def _commands(block: str) -> list[str]:
    """Shell commands of a README block: continuations joined, comments and [optional] parts dropped."""
    joined = block.replace("\\\n", " ")
    out: list[str] = []
    for line in joined.splitlines():
        line = re.sub(r"\s#\s.*$", "", line).strip()
        line = re.sub(r"\[[^\]]*\]", "", line).strip()
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split(" ; "))
    return out


def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    """The README's daemons and its 'Using it' commands, with only the host names,
    the data directories, the ports (tests run in parallel) and the volume size replaced;
    ``splitmirror``, ``primaryd`` and ``secondaryd`` found on the PATH as the README sets it."""
    text = README.read_text()
    daemons = _commands(_block_after(text, "## Running the daemons"))
    using = _commands(_block_after(text, "## Using it"))
    assert [c.split()[0] for c in daemons] == ["secondaryd", "primaryd"]
    ports = sorted({m for c in daemons + using for m in re.findall(r":(\d{4,5})\b", c)})
    mapping = {p: str(free_port()) for p in ports}

    def local(command: str) -> str:
        command = command.replace("primary.example", "127.0.0.1").replace("secondary.example", "127.0.0.1")
        command = command.replace("/var/lib/", f"{tmp_path}/")
        # 16 GiB as written works too, but copying and verifying it takes minutes on a loaded machine.
        command = command.replace("--size 16G", "--size 256M")
        return re.sub(r":(\d{4,5})\b", lambda m: ":" + mapping.get(m[1], m[1]), command)

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("SPLITMIRROR_SERVER", None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for command in daemons:
            argv = shlex.split(local(command).removesuffix("&"))
            log = open(tmp_path / f"{argv[0]}.log", "wb")  # noqa: SIM115 - the daemon's
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
        (tmp_path / "data.bin").write_bytes(os.urandom(64 << 10))
        first = True
        for command in using:
            if command.split()[0] in ("qemu-io",) and shutil.which(command.split()[0]) is None:
                continue
            result = subprocess.run(local(command), shell=True, env=env, cwd=tmp_path, capture_output=True,
                                    text=True, timeout=300, executable=BASH)
            if first and result.returncode != 0:  # the daemons may still be starting
                deadline = time.monotonic() + 60
                while result.returncode != 0 and time.monotonic() < deadline:
                    time.sleep(0.5)
                    result = subprocess.run(local(command), shell=True, env=env, cwd=tmp_path,
                                            capture_output=True, text=True, timeout=300, executable=BASH)
            first = first and command.startswith("export ")
            assert result.returncode == 0, (command, result.stdout, result.stderr,
                                            [(tmp_path / f).read_text() for f in ("primaryd.log", "secondaryd.log")])
            if command.startswith("export "):
                name, _, value = local(command).removeprefix("export ").partition("=")
                env[name] = value
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""Pre- and post-backup hooks: their order against the backup point, failures, timeouts."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, ClientError
from splitmirror.testing import Site, wait_for, wait_status
from splitmirror.v1 import host_pb2

MiB = 1 << 20
HOOK = """#!/bin/sh
phase=$1
echo "$phase pair=$SPLITMIRROR_PAIR gen=$SPLITMIRROR_GENERATION phase=$SPLITMIRROR_PHASE \
result=$SPLITMIRROR_BACKUP_RESULT sched=$SPLITMIRROR_SCHEDULE" >> {log}
mode=$(cat {ctl})
if [ "$phase" = pre ]; then
  case $mode in
    ok) PYTHONFAULTHANDLER=1 {py} -X faulthandler -m client --server {addr} write db --file {pre} --offset 0 ;;
    fail) echo "cannot freeze /mnt/db"; exit 3 ;;
    sleep) sleep 60 ;;
    kill) kill -9 $(cat {pid}) ;;
  esac
elif [ "$mode" = ok ]; then
  PYTHONFAULTHANDLER=1 {py} -m client --server {addr} write db --file {post} --offset 8192
fi
"""


@pytest.fixture
def hook_sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Path]]:
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    files = {name: tmp_path / name for name in ("log", "ctl", "pre", "post", "pid")}
    files["pre"].write_bytes(b"P" * 8192)
    files["post"].write_bytes(b"Q" * 8192)
    files["ctl"].write_text("ok")
    script = tmp_path / "hook.sh"
    script.write_text(HOOK.format(py=sys.executable, addr=primary.address, **files))
    script.chmod(0o755)
    primary.extra_args = ["--pre-backup-hook", f"{script} pre", "--post-backup-hook", f"{script} post",
                          "--backup-hook-timeout", "20"]
    secondary.start()
    primary.start()
    yield primary, secondary, tmp_path
    primary.kill()
    secondary.kill()


def hook_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


async def test_hooks_order_failures_and_timeouts(hook_sites: tuple[Site, Site, Path]) -> None:
    primary, secondary, tmp = hook_sites
    async with Client(primary.address) as c, Client(secondary.address) as s:
        await c.create_volume("db", 2 * MiB)
        await c.create_pair("p", "db", "db-r", peer=2001)
        await c.wait_pair("p", timeout=30)
        for i in (1, 2):
            secondary.cli("pair", "create", f"g{i}", "--pvol", "db-r", "--svol", f"s{i}", "--wait")

        # The pre-hook's write is in the backup; the post-hook's is not (but is on the PVOL).
        reply = await c.backup("p", wait=True)
        b = reply.backups[0]
        assert b.state == "done" and not reply.warning
        assert await s.read(b.svol, 0, 8192) == b"P" * 8192
        assert await s.read(b.svol, 8192, 8192) == bytes(8192)
        assert await c.read("db", 8192, 8192) == b"Q" * 8192
        assert hook_log(tmp) == [f"pre pair=p gen={b.generation} phase=pre-backup result= sched=",
                                 f"post pair=p gen={b.generation} phase=post-backup result=point-fixed sched="]

        second = (await c.backup("p", wait=True)).backups[0]  # both generations hold a backup now
        assert second.state == "done" and second.generation != b.generation
        ring = {g.local_pair: (g.status, g.backup_time, g.sequence) for g in await s.list_backups("p")}

        # A failing pre-hook cancels the backup with a clear error and an event; the post-hook runs.
        # The ring's next generation (the oldest, b's) keeps its backup: it is brought in sync only
        # once the pre-hook passed.
        (tmp / "ctl").write_text("fail")
        (tmp / "log").unlink()
        since = [e async for e in c.events()][-1].seq
        with pytest.raises(ClientError) as err:
            await c.backup("p", wait=True)
        assert err.value.code == "FAILED_PRECONDITION"
        assert err.value.message == ("backup of pair 'p' cancelled: pre-backup hook exited with 3: cannot freeze "
                                     "/mnt/db; no backup point was fixed and no generation changed")
        assert [line.split()[0] for line in hook_log(tmp)] == ["pre", "post"]
        assert "result=cancelled" in hook_log(tmp)[1]
        events = [e async for e in c.events(since) if e.kind == "backup"]
        assert [e.op for e in events] == ["cancelled"] and "exited with 3" in events[0].reason  # no point
        assert events[0].generation == b.generation
        assert {g.local_pair: (g.status, g.backup_time, g.sequence) for g in await s.list_backups("p")} == ring
        assert await s.read(b.svol, 8192, 8192) == bytes(8192)  # not resynced: the post-hook's write is not in it

        # A schedule's own hooks win over the daemon's; a pre-hook that hangs
        # is killed (with its children) at the schedule's timeout.
        (tmp / "ctl").write_text("ok")
        for name, hook, timeout, problem in (("failing", "exit 7", 0.0, "pre-backup hook exited with 7: no output"),
                                             ("hanging", "sleep 60", 1.5, "pre-backup hook timed out after 1.5s "
                                                                          "(killed)")):
            (tmp / "log").unlink(missing_ok=True)
            began = time.monotonic()
            await c.set_schedule(host_pb2.Schedule(pair="p", every_seconds=2, name=name, pre_hook=hook,
                                                   hook_timeout_seconds=timeout))
            wait_for(lambda: primary.cli_json("backup", "schedule", "list")[0]["runs"] >= 1, 30, 0.2,
                     "a scheduled run")
            assert time.monotonic() - began < 25
            sched = primary.cli_json("backup", "schedule", "list")[0]
            assert sched["last_result"] == "cancelled" and problem in sched["last_error"], sched
            lines = hook_log(tmp)
            assert lines and all(line.startswith("post ") for line in lines), lines  # the daemon's post-hook
            assert f"sched={name}" in lines[0] and "result=cancelled" in lines[0]
            await c.delete_schedule(name)

        # The post-hook runs also when the backup fails after the pre-hook:
        # here the pre-hook kills the secondary.
        assert secondary.proc is not None
        (tmp / "pid").write_text(str(secondary.proc.pid))
        (tmp / "ctl").write_text("kill")
        deadline = time.monotonic() + 20
        while True:  # the last scheduled run may still be finishing
            (tmp / "log").unlink(missing_ok=True)
            with pytest.raises(ClientError) as err:
                await c.backup("p", wait=True)
            if "already running" not in err.value.message or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert err.value.code in ("UNAVAILABLE", "FAILED_PRECONDITION")
        log = hook_log(tmp)
        # The point was fixed (the link was not yet known lost), the post-hook
        # ran (thawing the application) and the split then failed.
        assert [line.split()[0] for line in log] == ["pre", "post"], log
        assert "result=point-fixed" in log[1] or "result=failed" in log[1]
        assert "no backup taken" in err.value.message or "unreachable" in err.value.message, err.value.message
    secondary.proc.wait(timeout=10)
    secondary.proc = None
    secondary.start()
    wait_status(primary, "p", ["DUPLEX"], timeout=30)

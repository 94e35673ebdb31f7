"""Daemon configuration, size strings and the write-intent log."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from splitmirror.daemon.config import DaemonConfig, load_config
from splitmirror.errors import InvalidArgument
from splitmirror.sizes import format_size, parse_size
from splitmirror.storage.copytable import CopyTable
from splitmirror.storage.intent import IntentLog

BASE_FLAGS = [
    "--system-id", "1001",
    "--data-dir", "/var/lib/sm",
    "--listen", "127.0.0.1:7001",
    "--interconnect", "0.0.0.0:7101",
]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "splitmirror.toml"
    path.write_text(text)
    return str(path)


FULL_TOML = """
system_id = 2001
data_dir = "/srv/secondary"
listen = "10.0.0.2:8001"
interconnect = "10.0.0.2:8101"
nbd = "10.0.0.2:10809"
link_timeout = 7
auto_resync = false
log_level = "DEBUG"

[peers]
1001 = "127.0.0.1:7002"
1002 = "10.0.0.3:7101"
"""


# ---------------------------------------------------------------------- load_config


def test_flags_only() -> None:
    cfg = load_config("primary", [*BASE_FLAGS, "--peer", "2001=127.0.0.1:7102", "--peer", "3001=h:1",
                                  "--nbd", "127.0.0.1:10809", "--link-timeout", "2.5",
                                  "--auto-resync", "off", "--log-level", "WARNING"])
    assert cfg == DaemonConfig(
        role="primary",
        system_id=1001,
        data_dir=Path("/var/lib/sm"),
        listen="127.0.0.1:7001",
        interconnect="0.0.0.0:7101",
        peers={2001: "127.0.0.1:7102", 3001: "h:1"},
        nbd="127.0.0.1:10809",
        link_timeout=2.5,
        auto_resync=False,
        log_level="WARNING",
        data="0.0.0.0:0",
    )


def test_flags_defaults() -> None:
    cfg = load_config("secondary", BASE_FLAGS)
    assert cfg.role == "secondary"
    assert cfg.peers == {}
    assert cfg.nbd == ""
    assert cfg.link_timeout == 5.0
    assert cfg.auto_resync is True
    assert cfg.log_level == "INFO"


def test_auto_resync_on_flag() -> None:
    assert load_config("primary", [*BASE_FLAGS, "--auto-resync", "on"]).auto_resync is True


def test_file_only(tmp_path: Path) -> None:
    cfg = load_config("secondary", ["--config", write(tmp_path, FULL_TOML)])
    assert cfg == DaemonConfig(
        role="secondary",
        system_id=2001,
        data_dir=Path("/srv/secondary"),
        listen="10.0.0.2:8001",
        interconnect="10.0.0.2:8101",
        peers={1001: "127.0.0.1:7002", 1002: "10.0.0.3:7101"},
        nbd="10.0.0.2:10809",
        link_timeout=7.0,
        auto_resync=False,
        log_level="DEBUG",
        data="10.0.0.2:0",
    )
    assert isinstance(cfg.link_timeout, float)


def test_file_peers_as_list(tmp_path: Path) -> None:
    text = FULL_TOML.split("[peers]")[0].replace("system_id", 'peers = ["1001=127.0.0.1:7002"]\nsystem_id')
    cfg = load_config("secondary", ["--config", write(tmp_path, text)])
    assert cfg.peers == {1001: "127.0.0.1:7002"}


def test_flags_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    cfg = load_config("secondary", [
        "--config", path,
        "--system-id", "2999",
        "--listen", "127.0.0.1:9001",
        "--link-timeout", "1.5",
        "--auto-resync", "on",
        "--log-level", "ERROR",
        "--peer", "1001=192.168.1.1:7000",
    ])
    assert cfg.system_id == 2999
    assert cfg.listen == "127.0.0.1:9001"
    assert cfg.link_timeout == 1.5
    assert cfg.auto_resync is True
    assert cfg.log_level == "ERROR"
    # Peers merge; a flag replaces the file's address for the same id.
    assert cfg.peers == {1001: "192.168.1.1:7000", 1002: "10.0.0.3:7101"}
    # Untouched settings still come from the file.
    assert cfg.data_dir == Path("/srv/secondary")
    assert cfg.interconnect == "10.0.0.2:8101"


def test_file_and_flags_combine(tmp_path: Path) -> None:
    path = write(tmp_path, 'data_dir = "/d"\nlisten = "h:1"\n')
    cfg = load_config("primary", ["--config", path, "--system-id", "5", "--interconnect", "h:2"])
    assert (cfg.system_id, cfg.data_dir, cfg.listen, cfg.interconnect) == (5, Path("/d"), "h:1", "h:2")


def test_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "system_id = = 3\n[peers\n")
    with pytest.raises(InvalidArgument, match=r"--config .*: not valid TOML") as info:
        load_config("primary", ["--config", path])
    assert path in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(InvalidArgument, match="--config") as info:
        load_config("primary", ["--config", path])
    assert path in str(info.value)


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML.replace("log_level", "log_levle"))
    with pytest.raises(InvalidArgument, match="log_levle"):
        load_config("primary", ["--config", path])


def test_role_is_not_a_file_setting(tmp_path: Path) -> None:
    path = write(tmp_path, 'role = "secondary"\n' + FULL_TOML)
    with pytest.raises(InvalidArgument, match="'role'"):
        load_config("primary", ["--config", path])


@pytest.mark.parametrize("flag", ["--listen", "--interconnect", "--nbd"])
@pytest.mark.parametrize("bad", ["nohostport", "host:", ":7000", "host:port", "host:70000", "host:-1"])
def test_bad_host_port_flag(flag: str, bad: str) -> None:
    flags = [f for f in BASE_FLAGS]
    if flag in flags:
        flags[flags.index(flag) + 1] = bad
    else:
        flags += [flag, bad]
    setting = flag.removeprefix("--")
    with pytest.raises(InvalidArgument, match=setting) as info:
        load_config("primary", flags)
    assert repr(bad) in str(info.value)


def test_bad_host_port_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML.replace('listen = "10.0.0.2:8001"', 'listen = "10.0.0.2"'))
    with pytest.raises(InvalidArgument, match="listen"):
        load_config("secondary", ["--config", path])


def test_wrong_type_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML.replace('listen = "10.0.0.2:8001"', "listen = 8001"))
    with pytest.raises(InvalidArgument, match="listen"):
        load_config("secondary", ["--config", path])
    path = write(tmp_path, FULL_TOML.replace("system_id = 2001", 'system_id = "2001"'))
    with pytest.raises(InvalidArgument, match="system_id"):
        load_config("secondary", ["--config", path])


def test_ipv6_address_accepted() -> None:
    flags = [*BASE_FLAGS, "--nbd", "[::1]:10809"]
    assert load_config("primary", flags).nbd == "[::1]:10809"


@pytest.mark.parametrize("bad", ["2001", "2001=", "x=127.0.0.1:1", "=127.0.0.1:1", "2001=127.0.0.1"])
def test_bad_peer_flag(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="--peer"):
        load_config("primary", [*BASE_FLAGS, "--peer", bad])


def test_bad_peer_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML.replace('1002 = "10.0.0.3:7101"', 'abc = "10.0.0.3:7101"'))
    with pytest.raises(InvalidArgument, match="peer"):
        load_config("secondary", ["--config", path])
    path = write(tmp_path, FULL_TOML.replace('1002 = "10.0.0.3:7101"', '1002 = "10.0.0.3"'))
    with pytest.raises(InvalidArgument, match="peer"):
        load_config("secondary", ["--config", path])


def test_peers_wrong_type_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'peers = 3\n' + FULL_TOML.split("[peers]")[0])
    with pytest.raises(InvalidArgument, match="peers"):
        load_config("secondary", ["--config", path])


def test_missing_system_id() -> None:
    flags = BASE_FLAGS[2:]
    with pytest.raises(InvalidArgument, match="system_id") as info:
        load_config("primary", flags)
    assert "--system-id" in str(info.value)


def test_missing_system_id_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML.replace("system_id = 2001\n", ""))
    with pytest.raises(InvalidArgument, match="system_id"):
        load_config("secondary", ["--config", path])


@pytest.mark.parametrize("name", ["data_dir", "listen", "interconnect"])
def test_other_required_settings(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    i = BASE_FLAGS.index(flag)
    flags = BASE_FLAGS[:i] + BASE_FLAGS[i + 2:]
    with pytest.raises(InvalidArgument, match=name):
        load_config("primary", flags)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_system_id_must_be_positive(value: str) -> None:
    flags = list(BASE_FLAGS)
    flags[1] = value
    with pytest.raises(InvalidArgument, match="system_id"):
        load_config("primary", flags)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_link_timeout_must_be_positive(value: str) -> None:
    with pytest.raises(InvalidArgument, match="link_timeout"):
        load_config("primary", [*BASE_FLAGS, f"--link-timeout={value}"])


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1M", 1048576),
        ("8K", 8192),
        ("16G", 16 << 30),
        ("1T", 1 << 40),
        ("2P", 2 << 50),
        ("10", 10),
        ("0", 0),
        ("64k", 65536),
        ("1MiB", 1 << 20),
        ("1mib", 1 << 20),
        ("4KB", 4096),
        ("512B", 512),
        ("  8K  ", 8192),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", " ", "M", "1.5G", "-1", "1X", "1KM", "abc", "1 M", "0x10", "1e3", "K1"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(bad)


def test_parse_size_rejects_superscript_digit() -> None:
    with pytest.raises(InvalidArgument):
        parse_size("1²")


def test_bad_port_superscript_digit() -> None:
    with pytest.raises(InvalidArgument, match="listen"):
        load_config("primary", [*BASE_FLAGS, "--listen", "127.0.0.1:²"])


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (1, "1B"),
        (512, "512B"),
        (8192, "8K"),
        (1 << 20, "1M"),
        (16 << 30, "16G"),
        (1 << 40, "1T"),
        (1536, "1.5 KiB"),
        ((1 << 30) + (1 << 29), "1536M"),
        ((1 << 30) + (1 << 29) + 1, "1.5 GiB"),
        (3 << 40, "3T"),
    ],
)
def test_format_size(value: int, text: str) -> None:
    assert format_size(value) == text


@pytest.mark.parametrize("value", [1, 1023, 4096, 8192, 1 << 20, 3 << 30, 1 << 40, 5 << 40])
def test_format_parse_round_trip(value: int) -> None:
    assert parse_size(format_size(value)) == value


# ---------------------------------------------------------------------- IntentLog


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[CopyTable]:
    t = CopyTable(tmp_path / "copytable.sqlite")
    await t.open()
    yield t
    await t.close()


MIB = 1 << 20


def test_extents_and_tracks_of() -> None:
    log = IntentLog(CopyTable(Path("/nonexistent")), extent_size=4 * MIB)
    assert log.extents(0, 1) == range(0, 1)
    assert log.extents(4 * MIB - 1, 2) == range(0, 2)
    assert log.extents(4 * MIB, 4 * MIB) == range(1, 2)
    assert log.tracks_of(1, 8192, 10_000) == (512, 1024)
    assert log.tracks_of(19, 8192, 10_000) == (9728, 10_000)  # clipped to the volume


async def test_covering_records_extents_before_body(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB)
    async with log.covering("vol1", MIB - 10, 20):  # straddles extents 0 and 1
        assert await table.load_intent() == {"vol1": {0, 1}}
    # Still recorded after the write: cleared lazily, not on exit.
    assert await table.load_intent() == {"vol1": {0, 1}}


async def test_covering_durable_across_reopen(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB)
    async with log.covering("vol1", 5 * MIB, 1):
        # Simulate a crash inside the write: another connection sees the record.
        other = CopyTable(table.path)
        await other.open()
        try:
            assert await other.load_intent() == {"vol1": {5}}
        finally:
            await other.close()


async def test_covering_only_records_new_extents(table: CopyTable) -> None:
    calls: list[tuple[str, list[int]]] = []

    class Recording(CopyTable):
        async def add_intent(self, volume: str, extents: Iterable[int]) -> None:
            calls.append((volume, list(extents)))
            await super().add_intent(volume, extents)

    rec = Recording(table.path)
    await rec.open()
    try:
        log = IntentLog(rec, extent_size=MIB)
        async with log.covering("v", 0, 10):
            pass
        async with log.covering("v", 0, 2 * MIB):
            pass
        async with log.covering("v", 100, 10):
            pass
        assert calls == [("v", [0]), ("v", [1])]
    finally:
        await rec.close()


async def test_clear_idle_keeps_inflight(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB)
    async with log.covering("a", 0, 1):
        pass
    async with log.covering("b", 3 * MIB, 1):
        pass
    inside = asyncio.Event()
    release = asyncio.Event()

    async def long_write() -> None:
        async with log.covering("a", 2 * MIB, 1):
            inside.set()
            await release.wait()

    task = asyncio.create_task(long_write())
    await asyncio.wait_for(inside.wait(), 2)
    assert await table.load_intent() == {"a": {0, 2}, "b": {3}}

    assert await log.clear_idle(0) == 2
    assert await table.load_intent() == {"a": {2}}

    release.set()
    await task
    assert await log.clear_idle(0) == 1
    assert await table.load_intent() == {}
    assert await log.clear_idle(0) == 0


async def test_clear_idle_respects_idle_time(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB, idle_seconds=3600)
    async with log.covering("a", 0, 1):
        pass
    assert await log.clear_idle() == 0
    assert await log.clear_idle(3600) == 0
    assert await table.load_intent() == {"a": {0}}
    assert await log.clear_idle(0) == 1


async def test_extent_recorded_again_after_clear(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB)
    async with log.covering("a", 0, 1):
        pass
    await log.clear_idle(0)
    assert await table.load_intent() == {}
    async with log.covering("a", 0, 1):
        assert await table.load_intent() == {"a": {0}}


async def test_forget_volume(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB)
    async with log.covering("a", 0, 1):
        pass
    log.forget_volume("a")
    assert await log.clear_idle(0) == 0
    log.forget_volume("never-seen")


async def test_cooler_task_clears(table: CopyTable) -> None:
    log = IntentLog(table, extent_size=MIB, idle_seconds=0.02)
    async with log.covering("a", 0, 1):
        pass
    log.start()
    try:
        for _ in range(100):
            if not await table.load_intent():
                break
            await asyncio.sleep(0.01)
        assert await table.load_intent() == {}
    finally:
        await log.stop()


async def test_concurrent_writer_waits_for_durable_extent(table: CopyTable) -> None:
    gate = asyncio.Event()

    class Slow(CopyTable):
        async def add_intent(self, volume: str, extents: Iterable[int]) -> None:
            await gate.wait()
            await super().add_intent(volume, extents)

    slow = Slow(table.path)
    await slow.open()
    try:
        log = IntentLog(slow, extent_size=MIB)
        seen: list[dict[str, set[int]]] = []

        async def first() -> None:
            async with log.covering("v", 0, 4096):
                pass

        async def second() -> None:
            async with log.covering("v", 8192, 4096):  # same extent 0
                seen.append(await slow.load_intent())

        t1 = asyncio.create_task(first())
        await asyncio.sleep(0)
        t2 = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asyncio.gather(t1, t2), 2)
        assert seen == [{"v": {0}}]
    finally:
        await slow.close()


async def test_failed_intent_record_is_retried(table: CopyTable) -> None:
    fail = [True]

    class Flaky(CopyTable):
        async def add_intent(self, volume: str, extents: Iterable[int]) -> None:
            if fail[0]:
                fail[0] = False
                raise OSError("disk full")
            await super().add_intent(volume, extents)

    flaky = Flaky(table.path)
    await flaky.open()
    try:
        log = IntentLog(flaky, extent_size=MIB)
        with pytest.raises(OSError):
            async with log.covering("v", 0, 1):
                pass
        async with log.covering("v", 0, 1):
            assert await flaky.load_intent() == {"v": {0}}
    finally:
        await flaky.close()


def test_data_port_settings_and_their_defaults(tmp_path: Path) -> None:
    cfg = load_config("primary", BASE_FLAGS)
    assert cfg.data == "0.0.0.0:0"  # auto: the interconnect's host, a port the system picks
    assert (cfg.data_max_connections, cfg.data_max_per_peer, cfg.data_handshake_timeout) == (64, 4, 10.0)
    assert (cfg.data_max_frame, cfg.data_inflight, cfg.data_pair_inflight) == (64 << 20, 256 << 20, 128 << 20)
    assert load_config("primary", [*BASE_FLAGS, "--data", "off"]).data == ""
    assert load_config("primary", [*BASE_FLAGS, "--data", "7103"]).data == "0.0.0.0:7103"
    cfg = load_config("primary", [*BASE_FLAGS, "--data", "10.1.1.1:7103", "--peer-data", "2001=10.2.2.2:9000",
                                  "--data-max-frame", "1M", "--data-pair-inflight", "2M"])
    assert cfg.data == "10.1.1.1:7103" and cfg.peer_data == {2001: "10.2.2.2:9000"}
    assert (cfg.data_max_frame, cfg.data_pair_inflight) == (1 << 20, 2 << 20)
    path = write(tmp_path, 'data = "7203"\ndata_max_per_peer = 2\n[peer_data]\n2001 = "h:1"\n')
    cfg = load_config("primary", [*BASE_FLAGS, "--config", path])
    assert (cfg.data, cfg.data_max_per_peer, cfg.peer_data) == ("0.0.0.0:7203", 2, {2001: "h:1"})


@pytest.mark.parametrize("flags,words", [
    (["--data", "nowhere"], "data: 'nowhere' is not HOST:PORT"),
    (["--data-max-per-peer", "0"], "limits must be positive"),
    (["--data-max-frame", "1K"], "'data_max_frame': must be between 4K"),
    (["--data-max-frame", "8M", "--data-pair-inflight", "4M"], "must hold at least one frame"),
], ids=["address", "zero", "tiny-frame", "pair-below-frame"])
def test_data_port_settings_refused(flags: list[str], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        load_config("primary", [*BASE_FLAGS, *flags])


def test_token_mode_keeps_the_data_port_on_loopback(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops admin 0123456789abcdef0123\n")
    tokens.chmod(0o600)
    flags = ["--system-id", "1", "--data-dir", "/x", "--listen", "127.0.0.1:1", "--interconnect", "127.0.0.1:2",
             "--token-file", str(tokens)]
    assert load_config("primary", flags).data == "127.0.0.1:0"
    with pytest.raises(InvalidArgument, match=re.escape("setting 'data': 0.0.0.0:7 is not a loopback address")):
        load_config("primary", [*flags, "--data", "0.0.0.0:7"])

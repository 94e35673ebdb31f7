"""Hypothesis fuzzing against running daemons: every host API and interconnect method; config parsing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _d
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitmirror.daemon.config import load_config
from splitmirror.errors import InvalidArgument
from splitmirror.replication.link import SYSTEM_ID_KEY
from splitmirror.storage.bitmap import TrackBitmap
from splitmirror.testing import Site
from splitmirror.v1 import host_pb2, host_pb2_grpc, interconnect_pb2, interconnect_pb2_grpc

SERVICE = host_pb2.DESCRIPTOR.services_by_name["HostApi"]
#: A daemon must answer any input with one of these, never INTERNAL/UNKNOWN or a crash.
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}

NAMES = st.one_of(st.sampled_from(["", "fz", "fz-r", "../fz", "/etc/passwd", "a" * 65, "a" * 4096, ".x", "fz\0",
                                   "fz/../../x", "CON", "fz.vol", "é"]), st.text(max_size=80))
_INT_BOUNDS = {
    _d.FieldDescriptor.TYPE_INT64: [0, 1, -1, 4095, 4096, 8192, 1 << 20, 1 << 40, -(1 << 63), (1 << 63) - 1],
    _d.FieldDescriptor.TYPE_UINT64: [0, 1, 4096, 8192, 1 << 20, 1 << 40, 1 << 62, (1 << 64) - 1],
    _d.FieldDescriptor.TYPE_INT32: [0, 1, -1, 1001, 2001, -(1 << 31), (1 << 31) - 1],
    _d.FieldDescriptor.TYPE_UINT32: [0, 1, 1001, 2001, (1 << 32) - 1],
}
_INT_RANGES = {
    _d.FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _d.FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    _d.FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    _d.FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
}


def _scalar(field: _d.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == _d.FieldDescriptor.TYPE_STRING:
        if field.name == "mode":
            return st.one_of(st.sampled_from(["", "sync", "async", "SYNC"]), st.text(max_size=10))
        return NAMES
    if t == _d.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"\0" * 8192, b"\xff" * 4097]))
    if t == _d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in _INT_BOUNDS:
        lo, hi = _INT_RANGES[t]
        return st.one_of(st.sampled_from(_INT_BOUNDS[t]), st.integers(lo, hi))
    if t == _d.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=False, width=32)
    raise NotImplementedError(field.full_name)


def messages(descriptor: _d.Descriptor, cls: type[Message]) -> st.SearchStrategy[Message]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == _d.FieldDescriptor.TYPE_MESSAGE:
            continue  # host API requests are flat
        strategy = _scalar(field)
        if getattr(field, "is_repeated", False) or getattr(field, "label", 1) == 3:  # LABEL_REPEATED
            strategy = st.lists(strategy, max_size=4)
        fields[field.name] = strategy
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, grpc.Channel]]:
    base = tmp_path_factory.mktemp("fuzz")
    site = Site("primary", 1001, base, link_timeout=0.5)
    site.peers[2001] = 1  # a configured peer that is never there
    site.start()
    site.cli("volume", "create", "fz", "--size", "1M")
    with site.channel() as channel:
        yield site, channel
    assert site.proc is not None and site.proc.poll() is None, "the daemon died under fuzzing"
    site.kill()
    assert "Traceback" not in site.log(), site.log()[-3000:]


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_fuzz_host_api_method(daemon: tuple[Site, grpc.Channel], method: str) -> None:
    site, channel = daemon
    desc = SERVICE.methods_by_name[method]
    request_cls = getattr(host_pb2, desc.input_type.name)
    reply_cls = getattr(host_pb2, desc.output_type.name)
    path = f"/{SERVICE.full_name}/{method}"
    if desc.server_streaming:  # Events: read what comes within a deadline, as a client would
        stream = channel.unary_stream(path, request_serializer=request_cls.SerializeToString,
                                      response_deserializer=reply_cls.FromString)

        def call(request: Message, timeout: float) -> object:
            return list(stream(request, timeout=2 if getattr(request, "follow", False) else timeout))
    else:
        call = channel.unary_unary(path, request_serializer=request_cls.SerializeToString,
                                   response_deserializer=reply_cls.FromString)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(messages(desc.input_type, request_cls))
    def run(request: Message) -> None:
        try:
            call(request, timeout=15)
        except grpc.RpcError as exc:
            # A followed stream ends only when its client stops it: here, at its deadline.
            follows = desc.server_streaming and getattr(request, "follow", False)
            expected = EXPECTED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if follows else set())
            assert exc.code() in expected, (method, request, exc.code(), exc.details())

    run()
    # Garbage bytes that are not a valid message at all.
    raw = channel.unary_unary(f"/{SERVICE.full_name}/{method}", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    for junk in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x08"):
        try:
            raw(junk, timeout=15)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, junk, exc.code())
    with site.channel() as fresh:
        probe = fresh.unary_unary(f"/{SERVICE.full_name}/GetStats",
                                  request_serializer=host_pb2.StatsRequest.SerializeToString,
                                  response_deserializer=host_pb2.Stats.FromString)
        assert probe(host_pb2.StatsRequest(), timeout=5).system_id == 1001


# ---------------------------------------------------------------------- interconnect

IC_SERVICE = interconnect_pb2.DESCRIPTOR.services_by_name["Interconnect"]
def _bitmap(tracks: int, bits: list[int]) -> bytes:
    return TrackBitmap(tracks, bits).to_bytes()


#: Mostly the pair the fixture attached (re-attached before each example), else anything.
IC_PAIRS = st.one_of(st.just("fz"), st.just("fz"), st.sampled_from(["fz-gone", "fz-r", ""]), NAMES)
#: Bitmaps a peer might send: empty and valid ones, with tracks in and beyond the volume's 128.
#: (Bytes that are no bitmap at all: test_interconnect_corrupt_bitmap_is_invalid_argument.)
IC_BITMAPS = st.one_of(
    st.sampled_from([b"", *(_bitmap(128, bits) for bits in ([0], [0, 127], list(range(128)), [128, 1 << 20],
                                                            [(1 << 32) - 1]))]),
    st.builds(lambda bits: _bitmap(1 << 16, bits), st.lists(st.integers(0, (1 << 32) - 1), max_size=8)))


def ic_messages(descriptor: _d.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any interconnect message, nested ones included (the entries of a ReplicateBatch)."""
    cls = getattr(interconnect_pb2, descriptor.name)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == _d.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 1:
                continue
            strategy: st.SearchStrategy[Any] = ic_messages(field.message_type, depth + 1)
        elif field.name == "pair":
            strategy = IC_PAIRS
        elif field.type == _d.FieldDescriptor.TYPE_BYTES and field.name in ("tracks", "pending_bitmap"):
            strategy = IC_BITMAPS
        elif field.type == _d.FieldDescriptor.TYPE_ENUM:
            strategy = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                                 st.integers(-(1 << 31), (1 << 31) - 1))  # proto3 enums are open
        else:
            strategy = _scalar(field)
        if getattr(field, "is_repeated", False) or getattr(field, "label", 1) == 3:  # LABEL_REPEATED
            strategy = st.lists(strategy, max_size=4)
        fields[field.name] = strategy
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


IC_SEED = interconnect_pb2.AttachMirrorRequest(pair="fz", pvol="fz", svol="fz-r", size=1 << 20, track_size=8192,
                                               mode="sync")


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Site, int]]]:
    """A primaryd and a secondaryd, each with a configured peer that is never
    there: the fuzzing client claims that peer's system id in the metadata."""
    base = tmp_path_factory.mktemp("icfuzz")
    primary = Site("primary", 1001, base, link_timeout=0.5)
    secondary = Site("secondary", 2001, base, link_timeout=0.5)
    primary.peers[2001] = secondary.peers[1001] = 1  # nothing listens on port 1
    daemons = {"primary": (primary, 2001), "secondary": (secondary, 1001)}
    for site, peer in daemons.values():
        site.start()
        with grpc.insecure_channel(site.interconnect) as ch:  # a remote pair's secondary end to fuzz with
            interconnect_pb2_grpc.InterconnectStub(ch).AttachMirror(IC_SEED, metadata=_as_peer(peer), timeout=10)
    yield daemons
    for site, _ in daemons.values():
        alive = site.proc is not None and site.proc.poll() is None
        site.kill()
        assert alive, f"{site.role}d died under fuzzing:\n{site.log()[-3000:]}"
        assert "Traceback" not in site.log(), site.log()[-3000:]


def _as_peer(system_id: int) -> tuple[tuple[str, str]]:
    return ((SYSTEM_ID_KEY, str(system_id)),)


def _ic_call(channel: grpc.Channel, method: str) -> Any:
    desc = IC_SERVICE.methods_by_name[method]
    request_cls = getattr(interconnect_pb2, desc.input_type.name)
    reply_cls = getattr(interconnect_pb2, desc.output_type.name)
    path = f"/{IC_SERVICE.full_name}/{method}"
    factory = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
               (True, True): channel.stream_stream}[desc.client_streaming, desc.server_streaming]
    return factory(path, request_serializer=request_cls.SerializeToString, response_deserializer=reply_cls.FromString)


@pytest.mark.parametrize("role", ["secondary", "primary"])
@pytest.mark.parametrize("method", [m.name for m in IC_SERVICE.methods])
def test_fuzz_interconnect_method(peers: dict[str, tuple[Site, int]], role: str, method: str) -> None:
    """Any request from a configured peer gets a status, not a hang, crash or UNKNOWN."""
    site, peer = peers[role]
    desc = IC_SERVICE.methods_by_name[method]
    with grpc.insecure_channel(site.interconnect) as channel:
        call = _ic_call(channel, method)
        requests = ic_messages(desc.input_type)
        if desc.client_streaming:
            requests = st.lists(requests, min_size=1, max_size=3)

        attach = _ic_call(channel, "AttachMirror")

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(requests)
        def run(request: Any) -> None:
            with contextlib.suppress(grpc.RpcError):  # an earlier example may have deleted it
                attach(IC_SEED, metadata=_as_peer(peer), timeout=10)
            try:
                if desc.client_streaming:
                    list(call(iter(request), metadata=_as_peer(peer), timeout=10))
                elif desc.server_streaming:
                    list(call(request, metadata=_as_peer(peer), timeout=10))
                else:
                    call(request, metadata=_as_peer(peer), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() in EXPECTED, (role, method, request, exc.code(), exc.details())

        run()
        # Still serving: the peer's keepalive and the host API both answer.
        hello = interconnect_pb2_grpc.InterconnectStub(channel).Hello(
            interconnect_pb2.HelloRequest(system_id=peer, role="x"), metadata=_as_peer(peer), timeout=5)
        assert hello.system_id == site.system_id
    with site.channel() as host:
        assert host_pb2_grpc.HostApiStub(host).GetStats(host_pb2.StatsRequest(), timeout=5).system_id == site.system_id


@pytest.fixture(scope="module")
def garbage_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, grpc.Channel]]:
    """A secondaryd of its own for the known failures below (their tracebacks
    must not spoil the log checked after the fuzzing above)."""
    site = Site("secondary", 2001, tmp_path_factory.mktemp("icgarbage"), link_timeout=0.5)
    site.peers[1001] = 1
    site.start()
    with grpc.insecure_channel(site.interconnect) as channel:
        _ic_call(channel, "AttachMirror")(IC_SEED, metadata=_as_peer(1001), timeout=10)
        yield site, channel
    site.kill()


def test_interconnect_malformed_message_is_invalid_argument(garbage_peer: tuple[Site, grpc.Channel]) -> None:
    site, channel = garbage_peer
    codes = set()
    for method in ("Hello", "AttachMirror", "PairCommand", "PairCommands", "TrackDigests", "RestoreControl"):
        raw = channel.unary_unary(f"/{IC_SERVICE.full_name}/{method}", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\xff\xff\xff\xff\x0f", metadata=_as_peer(1001), timeout=10)
        codes.add(err.value.code())
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert "Traceback" not in site.log()


def test_interconnect_malformed_stream_message_is_invalid_argument(garbage_peer: tuple[Site, grpc.Channel]) -> None:
    """The streaming methods too: a bad message in Replicate's request stream,
    or a bad ReadTracks request, ends the call with INVALID_ARGUMENT."""
    site, channel = garbage_peer
    garbage = b"\x0a\xff\xff\xff\xff\x0f"
    replicate = channel.stream_stream(f"/{IC_SERVICE.full_name}/Replicate", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(replicate(iter([garbage]), metadata=_as_peer(1001), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    read = channel.unary_stream(f"/{IC_SERVICE.full_name}/ReadTracks", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(read(garbage, metadata=_as_peer(1001), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "Traceback" not in site.log()


def test_interconnect_corrupt_bitmap_is_invalid_argument(garbage_peer: tuple[Site, grpc.Channel]) -> None:
    site, channel = garbage_peer
    read = _ic_call(channel, "ReadTracks")
    with pytest.raises(grpc.RpcError) as err:
        list(read(interconnect_pb2.ReadTracksRequest(pair="fz", tracks=b"\xe5\xd1\x89G\x7f"),
                  metadata=_as_peer(1001), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "Traceback" not in site.log()


# ---------------------------------------------------------------------- config

SETTINGS = ["system_id", "data_dir", "listen", "interconnect", "nbd", "link_timeout", "auto_resync", "async_queue",
            "log_level", "tls_dir", "token_file", "max_message", "rate_limit", "rate_burst", "max_concurrent_rpcs",
            "pre_restore_hook", "post_restore_hook", "peers", "nbd_allow", "host_volumes", "bogus"]
TOML_SCALARS = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.booleans(), st.floats(allow_nan=False,
                         allow_infinity=False), st.text(max_size=30),
                         st.sampled_from(["127.0.0.1:7001", "10809", "64M", "0", "-1", "1G", "on", "DEBUG",
                                          "10.0.0.0/8", "::1", "[::1]:7001", ":", "a:b"]))
TOML_VALUES = st.one_of(TOML_SCALARS, st.lists(TOML_SCALARS, max_size=3),
                        st.dictionaries(st.sampled_from(["2001", "db", "*", "x y", "host"]),
                                        st.one_of(TOML_SCALARS, st.lists(st.text(max_size=12), max_size=3)),
                                        max_size=3))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


FLAGS = ["--system-id", "--data-dir", "--listen", "--interconnect", "--peer", "--nbd", "--link-timeout",
         "--auto-resync", "--async-queue", "--tls-dir", "--token-file", "--max-message", "--rate-limit",
         "--rate-burst", "--max-concurrent-rpcs", "--nbd-allow", "--host-volumes", "--log-level"]


@settings(max_examples=300, deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(SETTINGS), TOML_VALUES, max_size=8),
       st.lists(st.tuples(st.sampled_from(FLAGS), st.one_of(st.text(max_size=20), st.sampled_from(
           ["1001", "127.0.0.1:1", "2001=h:1", "db=10.0.0.0/8", "x=", "1e9", "-5", "nan", "inf"]))), max_size=4))
def test_fuzz_config_parsing(tmp_path_factory: pytest.TempPathFactory, table: dict[str, Any],
                             flags: list[tuple[str, str]]) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()))
    argv = ["--config", str(path)] + [f"{f}={v}" for f, v in flags]
    try:
        config = load_config("primary", argv)
    except InvalidArgument as exc:
        assert exc.message and "\n" not in exc.message.strip()
    except SystemExit as exc:  # argparse refused a flag (usage error, exit 2)
        assert exc.code == 2
    else:
        assert config.system_id > 0 and config.link_timeout > 0 and config.max_message_bytes >= 4096
        assert config.rate_limit >= 0 and config.max_concurrent_rpcs >= 1


def test_config_reads_security_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('system_id = 1\ndata_dir = "/d"\nlisten = "127.0.0.1:1"\ninterconnect = "127.0.0.1:2"\n'
                    'nbd = "10809"\nmax_message = "8M"\nrate_limit = 50\n'
                    '[nbd_allow]\ndb = ["10.0.0.0/8", "127.0.0.1"]\n[host_volumes]\nhostA = ["db*"]\n')
    config = load_config("primary", ["--config", str(path)])
    assert config.nbd == "127.0.0.1:10809"
    assert config.max_message_bytes == 8 << 20 and config.rate_limit == 50.0 and config.rate_burst == 100.0
    assert config.nbd_allow == {"db": ["10.0.0.0/8", "127.0.0.1"]} and config.host_volumes == {"hostA": ["db*"]}
    with pytest.raises(InvalidArgument, match="TLS"):
        load_config("primary", ["--config", str(path), "--tls-dir", str(tmp_path / "none")])
    with pytest.raises(InvalidArgument, match="nbd-allow"):
        load_config("primary", ["--config", str(path), "--nbd-allow", "db=not-a-net"])

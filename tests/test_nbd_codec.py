"""Unit and fuzz tests for the sans-I/O NBD codec."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitmirror.nbd.codec import (
    CommandRejected,
    CommandRequest,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    NbdCodec,
    NeedData,
    OptionRequest,
    ProtocolError,
    State,
)
from splitmirror.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

SIZE = 1 << 20
MAX_REQUEST = 64 * 1024
FLAGS = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
)


# ------------------------------------------------------------------ wire helpers


def client_flags(flags: int = 3) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


def request(cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split bytes into (option, reply type, data) triples."""
    out = []
    while raw:
        magic, opt, rtype, length = struct.unpack_from(">QIII", raw)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, rtype, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return out


def feed(codec: NbdCodec, data: bytes) -> Event:
    codec.receive_data(data)
    return codec.next_event()


def new_codec() -> NbdCodec:
    codec = NbdCodec(max_request=MAX_REQUEST)
    codec.send_greeting()
    return codec


def in_options() -> NbdCodec:
    codec = new_codec()
    codec.receive_data(client_flags())
    assert isinstance(codec.next_event(), NeedData)
    return codec


def transmitting(*, structured: bool = False, meta: bool = False, flags: TransmissionFlag = FLAGS) -> NbdCodec:
    codec = in_options()
    if structured:
        assert isinstance(feed(codec, option(Option.STRUCTURED_REPLY)), OptionRequest)
        codec.send_option_ack(Option.STRUCTURED_REPLY)
    if meta:
        feed(codec, option(Option.SET_META_CONTEXT, meta_data("vol", (BASE_ALLOCATION,))))
        codec.send_meta_context(Option.SET_META_CONTEXT, 7, BASE_ALLOCATION)
        codec.send_option_ack(Option.SET_META_CONTEXT)
    assert isinstance(feed(codec, option(Option.GO, go_data("vol"))), OptionRequest)
    codec.send_export_info(Option.GO, SIZE, flags)
    codec.send_option_ack(Option.GO)
    assert codec.state is State.TRANSMISSION
    return codec


# ---------------------------------------------------------------------- handshake


def test_greeting_bytes() -> None:
    codec = NbdCodec()
    assert codec.send_greeting() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert codec.state is State.CLIENT_FLAGS
    with pytest.raises(LocalProtocolError):
        codec.send_greeting()


def test_next_event_before_greeting_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        NbdCodec().next_event()


def test_client_flags_split_and_no_zeroes() -> None:
    codec = new_codec()
    assert isinstance(feed(codec, b"\0\0"), NeedData)
    assert isinstance(feed(codec, b"\0\x03"), NeedData)
    assert codec.state is State.OPTIONS
    assert codec.no_zeroes


def test_unknown_client_flags_close() -> None:
    codec = new_codec()
    event = feed(codec, client_flags(0x4))
    assert isinstance(event, ProtocolError)
    assert "client flags" in event.message
    assert codec.state is State.CLOSED
    assert codec.next_event() == ConnectionClosed(False, event.message)


def test_truncated_handshake_is_unclean_close() -> None:
    codec = new_codec()
    codec.receive_data(b"\0")
    codec.receive_data(b"")
    event = codec.next_event()
    assert isinstance(event, ConnectionClosed) and not event.clean


def test_eof_between_options_is_clean() -> None:
    codec = in_options()
    codec.receive_data(b"")
    assert codec.next_event() == ConnectionClosed(True, "client closed the connection")


def test_wrong_option_magic() -> None:
    codec = in_options()
    event = feed(codec, struct.pack(">QII", NBDMAGIC, Option.GO, 0))
    assert isinstance(event, ProtocolError)


def test_oversize_option_refused_from_header_alone() -> None:
    codec = in_options()
    event = feed(codec, struct.pack(">QII", IHAVEOPT, Option.GO, 64 * 1024 + 1))
    assert isinstance(event, ProtocolError)
    assert "too large" in event.message


def test_option_waits_for_payload() -> None:
    codec = in_options()
    raw = option(Option.EXPORT_NAME, b"vol")
    for byte in raw[:-1]:
        assert isinstance(feed(codec, bytes([byte])), NeedData)
    assert feed(codec, raw[-1:]) == OptionRequest(Option.EXPORT_NAME, b"vol", name="vol")


@pytest.mark.parametrize(("no_zeroes", "length"), [(True, 10), (False, 134)])
def test_export_name(no_zeroes: bool, length: int) -> None:
    codec = new_codec()
    codec.receive_data(client_flags(1 | (2 if no_zeroes else 0)))
    event = feed(codec, option(Option.EXPORT_NAME, b"vol"))
    assert isinstance(event, OptionRequest) and event.name == "vol"
    with pytest.raises(LocalProtocolError):
        codec.send_option_ack(Option.EXPORT_NAME)
    reply = codec.send_export_name_reply(SIZE, FLAGS)
    assert len(reply) == length
    assert struct.unpack_from(">QH", reply) == (SIZE, FLAGS | TransmissionFlag.HAS_FLAGS)
    assert codec.state is State.TRANSMISSION and codec.export_name == "vol"


def test_export_name_not_utf8_is_invalid() -> None:
    event = feed(in_options(), option(Option.EXPORT_NAME, b"\xff"))
    assert isinstance(event, OptionRequest) and event.invalid


@pytest.mark.parametrize("opt", [Option.INFO, Option.GO])
def test_info_and_go(opt: Option) -> None:
    codec = in_options()
    event = feed(codec, option(opt, go_data("vol", (Info.NAME, Info.BLOCK_SIZE))))
    assert event == OptionRequest(opt, go_data("vol", (1, 3)), name="vol", info_requests=(1, 3))
    with pytest.raises(LocalProtocolError, match="NBD_INFO_EXPORT"):
        codec.send_option_ack(opt)
    out = codec.send_export_info(opt, SIZE, FLAGS)
    out += codec.send_block_size_info(opt, 1, 4096, MAX_REQUEST)
    out += codec.send_text_info(opt, Info.NAME, "vol")
    out += codec.send_option_ack(opt)
    replies = option_replies(out)
    assert [r[1] for r in replies] == [OptionReply.INFO] * 3 + [OptionReply.ACK]
    assert replies[0][2] == struct.pack(">HQH", Info.EXPORT, SIZE, FLAGS | 1)
    assert replies[1][2] == struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, MAX_REQUEST)
    assert replies[2][2] == b"\0\x01vol"
    assert codec.state is (State.TRANSMISSION if opt is Option.GO else State.OPTIONS)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        struct.pack(">I", 10) + b"vol",  # name longer than payload
        go_data("vol") + b"x",  # trailing garbage
        go_data("vol", (1,))[:-1],  # truncated request list
        struct.pack(">I", 5000) + b"x" * 5000 + b"\0\0",  # name > 4096
    ],
)
def test_malformed_go_is_invalid(payload: bytes) -> None:
    codec = in_options()
    event = feed(codec, option(Option.GO, payload))
    assert isinstance(event, OptionRequest) and event.invalid
    reply = codec.send_option_error(Option.GO, OptionReply.ERR_INVALID, event.invalid)
    assert option_replies(reply)[0][1] == OptionReply.ERR_INVALID
    assert codec.state is State.OPTIONS


def test_go_unknown_export_error_then_retry() -> None:
    codec = in_options()
    feed(codec, option(Option.GO, go_data("nope")))
    out = codec.send_option_error(Option.GO, OptionReply.ERR_UNKNOWN, "no such export")
    assert option_replies(out) == [(Option.GO, OptionReply.ERR_UNKNOWN, b"no such export")]
    assert isinstance(feed(codec, option(Option.GO, go_data("vol"))), OptionRequest)


def test_list() -> None:
    codec = in_options()
    assert feed(codec, option(Option.LIST)) == OptionRequest(Option.LIST)
    out = codec.send_server_entry("vol") + codec.send_server_entry("db", "database")
    out += codec.send_option_ack(Option.LIST)
    assert option_replies(out) == [
        (Option.LIST, OptionReply.SERVER, b"\0\0\0\x03vol"),
        (Option.LIST, OptionReply.SERVER, b"\0\0\0\x02dbdatabase"),
        (Option.LIST, OptionReply.ACK, b""),
    ]


def test_list_with_data_is_invalid() -> None:
    event = feed(in_options(), option(Option.LIST, b"x"))
    assert isinstance(event, OptionRequest) and event.invalid


def test_abort() -> None:
    codec = in_options()
    assert isinstance(feed(codec, option(Option.ABORT)), OptionRequest)
    assert option_replies(codec.send_option_ack(Option.ABORT)) == [(Option.ABORT, OptionReply.ACK, b"")]
    assert codec.state is State.CLOSED
    assert codec.next_event() == ConnectionClosed(True, "client sent NBD_OPT_ABORT")


def test_unknown_option_and_pending_rules() -> None:
    codec = in_options()
    assert feed(codec, option(99, b"abc")) == OptionRequest(99, b"abc")
    with pytest.raises(LocalProtocolError):
        codec.next_event()  # the option is not answered yet
    with pytest.raises(LocalProtocolError):
        codec.send_option_ack(Option.LIST)  # answers the wrong option
    with pytest.raises(LocalProtocolError):
        codec.send_server_entry("vol")
    codec.send_option_error(99, OptionReply.ERR_UNSUP)
    assert codec.state is State.OPTIONS


def test_structured_reply_and_meta_context() -> None:
    codec = in_options()
    event = feed(codec, option(Option.SET_META_CONTEXT, meta_data("vol", (BASE_ALLOCATION,))))
    assert isinstance(event, OptionRequest) and event.invalid  # needs structured replies first
    codec.send_option_error(Option.SET_META_CONTEXT, OptionReply.ERR_INVALID)

    feed(codec, option(Option.STRUCTURED_REPLY))
    codec.send_option_ack(Option.STRUCTURED_REPLY)
    assert codec.structured_replies

    event = feed(codec, option(Option.LIST_META_CONTEXT, meta_data("vol", ("base:",))))
    assert isinstance(event, OptionRequest) and event.queries == ("base:",)
    codec.send_meta_context(Option.LIST_META_CONTEXT, 0, BASE_ALLOCATION)
    codec.send_option_ack(Option.LIST_META_CONTEXT)
    assert codec.meta_contexts == {}

    event = feed(codec, option(Option.SET_META_CONTEXT, meta_data("vol", (BASE_ALLOCATION, "x-a:b"))))
    assert isinstance(event, OptionRequest)
    assert event.name == "vol" and event.queries == (BASE_ALLOCATION, "x-a:b")
    out = codec.send_meta_context(Option.SET_META_CONTEXT, 5, BASE_ALLOCATION)
    assert option_replies(out)[0][2] == b"\0\0\0\x05" + BASE_ALLOCATION.encode()
    codec.send_option_ack(Option.SET_META_CONTEXT)
    assert codec.meta_contexts == {5: BASE_ALLOCATION}


def test_meta_contexts_dropped_when_go_names_other_export() -> None:
    codec = in_options()
    feed(codec, option(Option.STRUCTURED_REPLY))
    codec.send_option_ack(Option.STRUCTURED_REPLY)
    feed(codec, option(Option.SET_META_CONTEXT, meta_data("other", (BASE_ALLOCATION,))))
    codec.send_meta_context(Option.SET_META_CONTEXT, 1, BASE_ALLOCATION)
    codec.send_option_ack(Option.SET_META_CONTEXT)
    feed(codec, option(Option.GO, go_data("vol")))
    codec.send_export_info(Option.GO, SIZE, FLAGS)
    codec.send_option_ack(Option.GO)
    assert codec.meta_contexts == {}


def test_meta_context_query_overflow_is_invalid() -> None:
    codec = in_options()
    feed(codec, option(Option.STRUCTURED_REPLY))
    codec.send_option_ack(Option.STRUCTURED_REPLY)
    payload = struct.pack(">I", 0) + struct.pack(">I", 0xFFFFFFFF) + struct.pack(">I", 3) + b"ab"
    event = feed(codec, option(Option.SET_META_CONTEXT, payload))
    assert isinstance(event, OptionRequest) and event.invalid


# ------------------------------------------------------------------- transmission


def test_read_request_and_simple_reply() -> None:
    codec = transmitting()
    event = feed(codec, request(Command.READ, 7, 4096, 512))
    assert event == CommandRequest(7, Command.READ, CommandFlag(0), 4096, 512)
    reply = codec.send_read_reply(7, 4096, b"a" * 512)
    assert reply == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 7) + b"a" * 512
    assert codec.send_error(7, Errno.EIO, "ignored") == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, 7)


def test_write_payload_split_across_chunks() -> None:
    codec = transmitting()
    raw = request(Command.WRITE, 1, 100, 1000, CommandFlag.FUA, b"w" * 1000) + request(Command.FLUSH, 2)
    events = []
    for i in range(0, len(raw), 37):
        codec.receive_data(raw[i : i + 37])
        while not isinstance(event := codec.next_event(), NeedData):
            events.append(event)
    assert events == [
        CommandRequest(1, Command.WRITE, CommandFlag.FUA, 100, 1000, b"w" * 1000),
        CommandRequest(2, Command.FLUSH, CommandFlag(0), 0, 0),
    ]


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (Command.TRIM, CommandFlag.FUA),
        (Command.WRITE_ZEROES, CommandFlag.NO_HOLE | CommandFlag.FUA),
        (Command.FLUSH, CommandFlag(0)),
    ],
)
def test_payloadless_commands(cmd: Command, flags: CommandFlag) -> None:
    codec = transmitting()
    event = feed(codec, request(cmd, 3, 0, SIZE, flags))
    assert event == CommandRequest(3, cmd, flags, 0, SIZE)
    assert codec.send_ok(3) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 3)


def test_disc_ends_input_but_allows_pending_replies() -> None:
    codec = transmitting()
    feed(codec, request(Command.READ, 1, 0, 10))
    event = feed(codec, request(Command.DISC, 2) + b"ignored trailing bytes")
    assert event == ConnectionClosed(True, "client sent NBD_CMD_DISC")
    assert codec.state is State.CLOSING
    assert codec.next_event() == event
    assert codec.send_read_reply(1, 0, bytes(10)).endswith(bytes(10))


def test_eof_mid_request_is_unclean() -> None:
    codec = transmitting()
    codec.receive_data(request(Command.WRITE, 1, 0, 100, data=b"x" * 50))
    assert isinstance(codec.next_event(), NeedData)
    codec.receive_data(b"")
    event = codec.next_event()
    assert isinstance(event, ConnectionClosed) and not event.clean


def test_structured_read_and_error_chunks() -> None:
    codec = transmitting(structured=True)
    feed(codec, request(Command.READ, 9, 8, 4))
    chunk = codec.send_read_reply(9, 8, b"data")
    assert chunk == struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.OFFSET_DATA, 9, 12) + (
        struct.pack(">Q", 8) + b"data"
    )
    error = codec.send_error(9, Errno.EIO, "disk on fire")
    head = struct.unpack_from(">IHHQI", error)
    assert head == (STRUCTURED_REPLY_MAGIC, 1, ReplyType.ERROR, 9, 6 + 12)
    assert error[20:] == struct.pack(">IH", 5, 12) + b"disk on fire"
    empty = codec.send_read_reply(9, 0, b"")
    assert struct.unpack_from(">IHHQI", empty) == (STRUCTURED_REPLY_MAGIC, 1, ReplyType.NONE, 9, 0)
    with pytest.raises(LocalProtocolError):
        codec.send_simple_reply(9, 0, b"data")
    with pytest.raises(LocalProtocolError):
        codec.send_structured_error(9, 0)


def test_long_error_message_truncated() -> None:
    codec = transmitting(structured=True)
    chunk = codec.send_structured_error(1, Errno.EIO, "é" * 5000)
    (length,) = struct.unpack_from(">H", chunk, 24)
    assert length <= 4096 and chunk[26:].decode() == "é" * (length // 2)


def test_structured_chunks_need_negotiation() -> None:
    codec = transmitting()
    with pytest.raises(LocalProtocolError):
        codec.send_structured_read(1, 0, b"x")
    with pytest.raises(LocalProtocolError):
        codec.send_structured_done(1)


def test_block_status() -> None:
    codec = transmitting(structured=True, meta=True)
    event = feed(codec, request(Command.BLOCK_STATUS, 4, 0, 8192, CommandFlag.REQ_ONE))
    assert event == CommandRequest(4, Command.BLOCK_STATUS, CommandFlag.REQ_ONE, 0, 8192)
    chunk = codec.send_block_status(4, 7, [(4096, 0), (4096, 3)])
    assert struct.unpack_from(">IHHQI", chunk) == (STRUCTURED_REPLY_MAGIC, 1, ReplyType.BLOCK_STATUS, 4, 20)
    assert chunk[20:] == struct.pack(">IIIII", 7, 4096, 0, 4096, 3)
    with pytest.raises(LocalProtocolError):
        codec.send_block_status(4, 8, [(1, 0)])  # context never selected
    with pytest.raises(LocalProtocolError):
        codec.send_block_status(4, 7, [])


def _rejected(codec: NbdCodec, raw: bytes) -> CommandRejected:
    event = feed(codec, raw)
    assert isinstance(event, CommandRejected), event
    return event


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (request(42, 1), Errno.EINVAL),  # unknown command
        (request(Command.CACHE, 1, 0, 10), Errno.EINVAL),  # not supported
        (request(Command.READ, 1, 0, 10, CommandFlag.NO_HOLE), Errno.EINVAL),
        (request(Command.READ, 1, 0, 10, CommandFlag.DF), Errno.EINVAL),  # DF not advertised
        (request(Command.READ, 1, 0, 0x8000, 0x100), Errno.EINVAL),  # unknown flag bit
        (request(Command.READ, 1, 0, MAX_REQUEST + 1), Errno.EINVAL),
        (request(Command.READ, 1, SIZE - 1, 2), Errno.EINVAL),
        (request(Command.READ, 1, 2**64 - 1, 1), Errno.EINVAL),
        (request(Command.TRIM, 1, SIZE, 1), Errno.EINVAL),
        (request(Command.WRITE_ZEROES, 1, SIZE, 1), Errno.ENOSPC),
        (request(Command.WRITE_ZEROES, 1, 0, 1, CommandFlag.FAST_ZERO), Errno.EINVAL),
        (request(Command.BLOCK_STATUS, 1, 0, 10), Errno.EINVAL),  # no context negotiated
    ],
)
def test_rejected_requests(raw: bytes, error: Errno) -> None:
    codec = transmitting()
    assert _rejected(codec, raw + request(Command.FLUSH, 2)).error == error
    assert isinstance(codec.next_event(), CommandRequest)  # stream still in sync


def test_commands_not_advertised() -> None:
    codec = transmitting(flags=TransmissionFlag(0))
    for cmd in (Command.FLUSH, Command.TRIM, Command.WRITE_ZEROES):
        assert _rejected(codec, request(cmd, 1)).error == Errno.EINVAL
    assert _rejected(codec, request(Command.WRITE, 1, 0, 1, CommandFlag.FUA, b"x")).error == Errno.EINVAL


def test_read_only_export_refuses_writes() -> None:
    codec = transmitting(flags=FLAGS | TransmissionFlag.READ_ONLY)
    for cmd in (Command.TRIM, Command.WRITE_ZEROES):
        assert _rejected(codec, request(cmd, 1, 0, 10)).error == Errno.EPERM
    event = _rejected(codec, request(Command.WRITE, 2, 0, 3, data=b"abc") + request(Command.READ, 3, 0, 1))
    assert event.error == Errno.EPERM
    assert isinstance(codec.next_event(), CommandRequest)


def test_refused_write_payload_is_skipped() -> None:
    codec = transmitting()
    too_big = MAX_REQUEST + 10
    # The refusal comes once the payload is consumed: a reply that overtakes the
    # request it answers confuses libnbd, which drops the connection.
    assert isinstance(feed(codec, request(Command.WRITE, 1, 0, too_big)), NeedData)
    for _ in range(0, too_big - 4096, 4096):
        assert isinstance(feed(codec, b"z" * 4096), NeedData)
    assert _rejected(codec, b"z" * (too_big % 4096 or 4096)).error == Errno.EINVAL
    assert _rejected(codec, request(Command.WRITE, 2, SIZE - 1, 2, data=b"zz")).error == Errno.ENOSPC
    assert feed(codec, request(Command.READ, 3, 0, 1)) == CommandRequest(3, Command.READ, CommandFlag(0), 0, 1)


def test_unskippable_write_closes() -> None:
    codec = transmitting()
    event = feed(codec, request(Command.WRITE, 1, 0, 2 * MAX_REQUEST + 1))
    assert isinstance(event, ProtocolError)
    assert codec.state is State.CLOSING


def test_bad_request_magic() -> None:
    codec = transmitting()
    event = feed(codec, b"\0" * 28)
    assert isinstance(event, ProtocolError) and "magic" in event.message


def test_max_request_validated() -> None:
    with pytest.raises(ValueError):
        NbdCodec(max_request=0)
    with pytest.raises(ValueError):
        NbdCodec(max_request=2**32)


# ----------------------------------------------------------------------- fuzzing


class _HangUp(Exception):
    pass


def respond(codec: NbdCodec, event: Event) -> None:
    """A minimal well-behaved server answering every event."""
    if isinstance(event, OptionRequest):
        opt = event.option
        if event.invalid is not None:
            if opt == Option.EXPORT_NAME:
                raise _HangUp
            codec.send_option_error(opt, OptionReply.ERR_INVALID, event.invalid)
        elif opt == Option.EXPORT_NAME:
            if event.name != "vol":
                raise _HangUp
            codec.send_export_name_reply(SIZE, FLAGS)
        elif opt in (Option.INFO, Option.GO):
            if event.name != "vol":
                codec.send_option_error(opt, OptionReply.ERR_UNKNOWN, "unknown")
                return
            codec.send_export_info(opt, SIZE, FLAGS | TransmissionFlag.SEND_DF)
            codec.send_option_ack(opt)
        elif opt == Option.LIST:
            codec.send_server_entry("vol")
            codec.send_option_ack(opt)
        elif opt in (Option.ABORT, Option.STRUCTURED_REPLY):
            codec.send_option_ack(opt)
        elif opt in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            if BASE_ALLOCATION in event.queries:
                codec.send_meta_context(opt, 1, BASE_ALLOCATION)
            codec.send_option_ack(opt)
        else:
            codec.send_option_error(opt, OptionReply.ERR_UNSUP)
    elif isinstance(event, CommandRequest):
        if event.type is Command.READ:
            codec.send_read_reply(event.handle, event.offset, bytes(event.length))
        elif event.type is Command.BLOCK_STATUS:
            codec.send_block_status(event.handle, 1, [(event.length, 0)])
        else:
            codec.send_ok(event.handle)
    elif isinstance(event, CommandRejected):
        codec.send_error(event.handle, event.error, event.message)


def drive(chunks: list[bytes], codec: NbdCodec | None = None) -> list[Event]:
    """Feed chunks then EOF, answering events; bounded number of steps."""
    codec = codec or new_codec()
    events: list[Event] = []
    budget = sum(len(c) for c in chunks) + 2 * len(chunks) + 10
    for chunk in [*chunks, b""]:
        codec.receive_data(chunk)
        while True:
            budget -= 1
            assert budget > 0, "codec is not making progress"
            event = codec.next_event()
            if isinstance(event, NeedData):
                break
            events.append(event)
            if isinstance(event, ConnectionClosed | ProtocolError):
                return events
            try:
                respond(codec, event)
            except _HangUp:
                return events
    raise AssertionError("EOF did not end the connection")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


VALID_STREAM = (
    client_flags()
    + option(Option.STRUCTURED_REPLY)
    + option(Option.LIST)
    + option(Option.SET_META_CONTEXT, meta_data("vol", (BASE_ALLOCATION,)))
    + option(Option.INFO, go_data("vol", (Info.BLOCK_SIZE,)))
    + option(77, b"junk")
    + option(Option.GO, go_data("vol"))
    + request(Command.WRITE, 1, 0, 16, CommandFlag.FUA, b"w" * 16)
    + request(Command.READ, 2, 0, 16, CommandFlag.DF)
    + request(Command.BLOCK_STATUS, 3, 0, 4096)
    + request(Command.TRIM, 4, 0, 4096)
    + request(Command.WRITE_ZEROES, 5, 0, 4096, CommandFlag.NO_HOLE)
    + request(Command.READ, 6, SIZE, 1)
    + request(Command.FLUSH, 7)
    + request(Command.DISC, 8)
)


def test_valid_stream_event_sequence() -> None:
    events = drive([VALID_STREAM])
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["OptionRequest"] * 6 + ["CommandRequest"] * 5 + ["CommandRejected"] + [
        "CommandRequest",
        "ConnectionClosed",
    ]
    assert events[-1] == ConnectionClosed(True, "client sent NBD_CMD_DISC")


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    drive(split(data, cuts))


@FUZZ
@given(
    prefix=st.sampled_from([client_flags(), client_flags() + option(Option.GO, go_data("vol"))]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_fuzz_random_after_valid_prefix(prefix: bytes, data: bytes, cuts: list[int]) -> None:
    drive(split(prefix + data, cuts))


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.sampled_from(["set", "insert", "delete"]), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_fuzz_mutated_valid_stream(edits: list[tuple[int, str, int]], cuts: list[int]) -> None:
    stream = bytearray(VALID_STREAM)
    for position, kind, value in edits:
        index = position % (len(stream) + 1)
        if kind == "insert":
            stream.insert(index, value)
        elif index < len(stream):
            if kind == "set":
                stream[index] = value
            else:
                del stream[index]
    drive(split(bytes(stream), cuts))


def test_bytes_after_starttls_hang_up() -> None:
    codec = in_options()
    event = feed(codec, option(Option.STARTTLS) + option(Option.EXPORT_NAME, b"victim"))
    assert isinstance(event, ProtocolError) and "after NBD_OPT_STARTTLS" in event.message
    assert codec.state is State.CLOSED
    # Alone in its read, STARTTLS is an ordinary option.
    codec = in_options()
    assert feed(codec, option(Option.STARTTLS)) == OptionRequest(Option.STARTTLS)
    assert not codec.mid_message


def test_at_most_32_options_before_an_export() -> None:
    codec = in_options()
    for _ in range(32):
        assert isinstance(feed(codec, option(Option.LIST)), OptionRequest)
        codec.send_option_ack(Option.LIST)
    event = feed(codec, option(Option.GO, go_data("vol")))
    assert isinstance(event, ProtocolError) and "more than 32 options" in event.message

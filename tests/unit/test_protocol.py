"""The sans-IO codec on its own: framing, streaming of large messages, limits, builders and parsers."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from proxy import protocol as P
from proxy.protocol import MessageSplitter, ProtocolError

WATCH = frozenset(b"QZC")


def msgs(*pairs):
    return b"".join(P.message(t, body) for t, body in pairs)


def reassemble(items):
    """Bytes of all items in order: what the proxy would forward unchanged."""
    return b"".join(i[1] if type(i) is tuple else i for i in items)


def test_watched_messages_come_out_whole_with_their_header():
    data = msgs((ord("Q"), b"select 1\0"), (ord("Z"), b"I"))
    items = MessageSplitter(WATCH).feed(data)
    assert items == [(ord("Q"), P.message(ord("Q"), b"select 1\0")), (ord("Z"), P.message(ord("Z"), b"I"))]


def test_unwatched_runs_pass_through_as_one_span():
    data = msgs((ord("D"), b"a" * 10), (ord("D"), b"b" * 10), (ord("Z"), b"I"))
    items = MessageSplitter(WATCH).feed(data)
    assert items[0] == data[:-6]
    assert items[1][0] == ord("Z")


def test_a_large_unwatched_message_streams_without_buffering():
    body = b"x" * 100_000
    data = msgs((ord("D"), body), (ord("Z"), b"I"))
    s = MessageSplitter(WATCH)
    out = []
    for i in range(0, len(data), 4096):
        chunk_items = s.feed(data[i:i + 4096])
        out.extend(chunk_items)
        assert s.pending_bytes <= 5  # never holds the big row
    assert reassemble(out) == data
    assert out[-1] == (ord("Z"), P.message(ord("Z"), b"I"))


def test_a_watched_message_split_across_chunks_is_returned_once_complete():
    data = msgs((ord("Q"), b"select 'a long query'\0"))
    s = MessageSplitter(WATCH)
    assert s.feed(data[:3]) == []
    assert s.feed(data[3:10]) == []
    assert s.feed(data[10:]) == [(ord("Q"), data)]


@pytest.mark.parametrize("length", [0, 3, 2**31 + 5])
def test_invalid_lengths_are_refused_before_allocating(length):
    s = MessageSplitter(WATCH, max_len=1 << 20)
    with pytest.raises(ProtocolError):
        s.feed(b"Q" + struct.pack("!I", length) + b"abc")


def test_a_length_over_the_limit_is_refused():
    s = MessageSplitter(WATCH, max_len=1024)
    with pytest.raises(ProtocolError):
        s.feed(b"Q" + struct.pack("!I", 2000))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(b"QZCDdTN"), st.binary(max_size=300)), max_size=20),
       st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=50))
def test_any_chunking_reassembles_the_stream_exactly(messages, cuts):
    data = msgs(*messages)
    s = MessageSplitter(WATCH)
    out, pos, k = [], 0, 0
    while pos < len(data):
        step = cuts[k % len(cuts)]
        out.extend(s.feed(data[pos:pos + step]))
        pos += step
        k += 1
    assert reassemble(out) == data
    assert [i[0] for i in out if type(i) is tuple] == [t for t, _ in messages if t in WATCH]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_either_splits_or_raises_protocol_error(garbage):
    s = MessageSplitter(WATCH, max_len=1 << 20)
    try:
        s.feed(garbage)
    except ProtocolError:
        pass


def test_startup_packet_parameters():
    pkt = P.startup_message({"user": "alice", "database": "app", "options": "-c search_path=x"})
    code, params = P.parse_startup(pkt[4:])
    assert code == P.PROTOCOL_V3
    assert params == {"user": "alice", "database": "app", "options": "-c search_path=x"}


def test_options_string_settings():
    assert P.parse_options(r"-c search_path=a,b --statement-timeout=5s -c x=with\ space") == {
        "search_path": "a,b", "statement_timeout": "5s", "x": "with space"}


def test_error_response_round_trip():
    raw = P.error_response("08P01", "bad message", detail="d", hint="h")
    fields = P.parse_error_fields(raw)
    assert fields["S"] == "ERROR" and fields["C"] == "08P01" and fields["M"] == "bad message"
    assert fields["D"] == "d" and fields["H"] == "h"
    assert P.error_sqlstate(raw) == "08P01"


@pytest.mark.parametrize("tag,rows", [("SELECT 5", 5), ("INSERT 0 3", 3), ("UPDATE 0", 0), ("BEGIN", None)])
def test_command_tag_rows(tag, rows):
    assert P.command_tag_rows(P.command_complete(tag)) == rows


def test_cancel_request_round_trip():
    pkt = P.cancel_request(1234, 99)
    assert P.unpack_i32(pkt, 4) == P.CANCEL_REQUEST
    assert P.parse_cancel(pkt[4:]) == (1234, 99)

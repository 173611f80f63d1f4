"""Sans-IO PostgreSQL v3 wire codec: split byte streams into messages and build the messages the proxy sends.

No asyncio here: bytes in, messages out. The splitter parses headers only (type + length) and hands back
message bodies untouched; bodies are decoded only for the few message types the proxy acts on.
"""
from __future__ import annotations

import struct

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!cI")

PROTOCOL_V3 = 196608            # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_PACKET = 10_000     # as PostgreSQL's MAX_STARTUP_PACKET_LENGTH

# Frontend (client -> server) message types.
F_QUERY, F_PARSE, F_BIND, F_EXECUTE, F_DESCRIBE, F_CLOSE = b"QPBEDC"
F_SYNC, F_FLUSH, F_TERMINATE, F_FUNCTION_CALL = b"SHXF"
F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_PASSWORD = b"dcfp"
FRONTEND_TYPES = frozenset(b"QPBEDCSHXFdcfp")

# Backend (server -> client) message types.
B_AUTH, B_KEY_DATA, B_PARAMETER_STATUS, B_READY = b"RKSZ"
B_PARSE_COMPLETE, B_BIND_COMPLETE, B_CLOSE_COMPLETE = b"123"
B_COMMAND_COMPLETE, B_DATA_ROW, B_ROW_DESCRIPTION, B_PARAM_DESCRIPTION = b"CDTt"
B_NO_DATA, B_PORTAL_SUSPENDED, B_EMPTY_QUERY = b"nsI"
B_ERROR, B_NOTICE, B_NOTIFICATION = b"ENA"
B_COPY_IN, B_COPY_OUT, B_COPY_BOTH, B_COPY_DATA, B_COPY_DONE = b"GHWdc"
B_FUNCTION_RESULT, B_NEGOTIATE_VERSION = b"Vv"


class ProtocolError(Exception):
    """Malformed input from a peer; answered with SQLSTATE 08P01 and the connection closed."""

    sqlstate = "08P01"


class MessageSplitter:
    """Split a byte stream into messages.

    feed() returns a list of items, in stream order: a `(type, raw)` tuple for each whole message whose type
    is in `watch` (raw includes the 5-byte header), and plain bytes for runs of other messages, which are
    opaque and may end part-way through a message (large DataRows and CopyData stream through without
    being buffered whole). A length outside [4, max_len] raises ProtocolError before anything is allocated.
    """

    __slots__ = ("watch", "valid", "max_len", "_buf", "_need", "_skip")

    def __init__(self, watch: frozenset[int], max_len: int = 0x7FFFFFFF, valid: frozenset[int] | None = None):
        self.watch = watch
        self.valid = valid       # when given, any other message type is a ProtocolError
        self.max_len = max_len
        self._buf: bytearray | None = None  # an incomplete watched message (or header)
        self._need = 0                      # total bytes that message needs
        self._skip = 0                      # bytes left of a pass-through message already forwarded in part

    def feed(self, data: bytes) -> list:
        items: list = []
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return [data]
            items.append(data[:self._skip])
            data = data[self._skip:]
            self._skip = 0
        if self._buf is not None:
            self._buf += data
            if len(self._buf) < self._need:
                return items
            data = bytes(self._buf)
            self._buf = None
        n = len(data)
        pos = span = 0
        watch = self.watch
        unpack = _U32.unpack_from
        while n - pos >= 5:
            ln = unpack(data, pos + 1)[0]
            if ln < 4 or ln > self.max_len:
                raise ProtocolError(f"invalid message length {ln}")
            end = pos + 1 + ln
            if data[pos] in watch:
                if end > n:
                    break
                if span < pos:
                    items.append(data[span:pos])
                items.append((data[pos], data[pos:end]))
                pos = span = end
            elif self.valid is not None and data[pos] not in self.valid:
                raise ProtocolError(f"invalid frontend message type {data[pos]}")
            elif end > n:
                self._skip = end - n
                pos = n
                break
            else:
                pos = end
        if span < pos:
            items.append(data if span == 0 and pos == n else data[span:pos])
        if pos < n:
            rest = data[pos:]
            self._buf = bytearray(rest)
            self._need = 5 if len(rest) < 5 else 1 + _U32.unpack_from(rest, 1)[0]
        return items

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) if self._buf is not None else 0


# ---------------------------------------------------------------------------------------------- decoding

def read_cstring(buf: bytes, pos: int) -> tuple[bytes, int]:
    """The NUL-terminated string at pos, and the position after its NUL."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("missing string terminator")
    return buf[pos:end], end + 1


def check_parse(raw: bytes) -> None:
    """A Parse message's body is name, query, int16 n, n int32 type OIDs, and nothing more."""
    _, pos = read_cstring(raw, 5)
    _, pos = read_cstring(raw, pos)
    if pos + 2 > len(raw):
        raise ProtocolError("invalid Parse message format")
    n = _I16.unpack_from(raw, pos)[0]
    if n < 0 or pos + 2 + 4 * n != len(raw):
        raise ProtocolError("invalid Parse message format")


def check_query(raw: bytes) -> None:
    """A Query message's body is one NUL-terminated string."""
    if raw.find(b"\0", 5) != len(raw) - 1:
        raise ProtocolError("invalid string in Query message")


def parse_startup(packet: bytes) -> tuple[int, dict[str, str]]:
    """A startup-phase packet without its length word: (protocol code, parameters)."""
    if len(packet) < 4:
        raise ProtocolError("invalid length of startup packet")
    code = _U32.unpack_from(packet, 0)[0]
    params: dict[str, str] = {}
    if code >> 16 == 3:
        pos = 4
        while pos < len(packet) and packet[pos] != 0:
            key, pos = read_cstring(packet, pos)
            val, pos = read_cstring(packet, pos)
            params[key.decode("utf-8", "replace")] = val.decode("utf-8", "replace")
    return code, params


def parse_cancel(packet: bytes) -> tuple[int, int]:
    if len(packet) != 12:
        raise ProtocolError("invalid length of cancel request")
    return _U32.unpack_from(packet, 4)[0], _U32.unpack_from(packet, 8)[0]


def parse_error_fields(raw: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse (raw message with header) by field code letter."""
    fields: dict[str, str] = {}
    pos = 5
    n = len(raw)
    while pos < n and raw[pos] != 0:
        code = chr(raw[pos])
        val, pos = read_cstring(raw, pos + 1)
        fields[code] = val.decode("utf-8", "replace")
    return fields


def error_sqlstate(raw: bytes) -> str:
    """The SQLSTATE of an ErrorResponse, cheaply."""
    i = raw.find(b"\0C", 4)
    if i < 0:
        return "XX000"
    return raw[i + 2:i + 7].decode("ascii", "replace")


def parse_options(options: str) -> dict[str, str]:
    """GUC settings from a startup `options` string: '-c a=b --c=d -c e=f\\ g'."""
    out: dict[str, str] = {}
    tokens: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            setting = tokens[i + 1]
            i += 2
        elif tok.startswith("-c"):
            setting = tok[2:]
            i += 1
        elif tok.startswith("--"):
            setting = tok[2:]
            i += 1
        else:
            i += 1
            continue
        name, sep, value = setting.partition("=")
        if sep:
            out[name.replace("-", "_")] = value
    return out


# ---------------------------------------------------------------------------------------------- encoding

def message(mtype: int, body: bytes = b"") -> bytes:
    return _HDR.pack(bytes((mtype,)), len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


PARSE_COMPLETE = message(B_PARSE_COMPLETE)
BIND_COMPLETE = message(B_BIND_COMPLETE)
CLOSE_COMPLETE = message(B_CLOSE_COMPLETE)
NO_DATA = message(B_NO_DATA)
AUTH_OK = message(B_AUTH, _I32.pack(0))
SYNC = message(F_SYNC)
TERMINATE = message(F_TERMINATE)
READY = {s: message(B_READY, s) for s in (b"I", b"T", b"E")}


def ready_for_query(status: bytes) -> bytes:
    return READY[status]


def error_response(sqlstate: str, msg: str, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None, notice: bool = False) -> bytes:
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(msg)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return message(B_NOTICE if notice else B_ERROR, body + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(B_PARAMETER_STATUS, cstr(name) + cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(B_KEY_DATA, _U32.pack(pid) + _U32.pack(key))


def command_complete(tag: str) -> bytes:
    return message(B_COMMAND_COMPLETE, cstr(tag))


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unrecognized)) + b"".join(cstr(o) for o in unrecognized)
    return message(B_NEGOTIATE_VERSION, body)


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST) + _U32.pack(pid) + _U32.pack(key)


def query(sql: str) -> bytes:
    return message(F_QUERY, cstr(sql))


def parse(name: bytes, rest: bytes) -> bytes:
    """A Parse message from a statement name and the body after the name (query + parameter types)."""
    return message(F_PARSE, name + b"\0" + rest)


def password_message(payload: bytes) -> bytes:
    return message(F_PASSWORD, payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(F_PASSWORD, cstr(mechanism) + _I32.pack(len(data)) + data)


def command_tag_rows(raw: bytes) -> int | None:
    """Rows affected/returned from a CommandComplete (raw message): 'SELECT 5', 'INSERT 0 3', 'UPDATE 2'."""
    rows = _tag_rows.get(raw, _UNSEEN)
    if rows is _UNSEEN:
        tag = raw[5:-1]
        i = tag.rfind(b" ")
        tail = tag[i + 1:]
        rows = int(tail) if i >= 0 and tail.isdigit() else None
        if len(_tag_rows) >= 4096:
            _tag_rows.clear()
        _tag_rows[raw] = rows
    return rows


# Tags repeat (every statement of a template often returns as many rows): one dictionary lookup, not a parse.
_tag_rows: dict[bytes, int | None] = {}
known_tag_rows = _tag_rows.get   # (raw, default): command_tag_rows of a message seen before, without the call
_UNSEEN = object()


def unpack_i32(buf: bytes, pos: int) -> int:
    return _I32.unpack_from(buf, pos)[0]


def unpack_i16(buf: bytes, pos: int) -> int:
    return _I16.unpack_from(buf, pos)[0]

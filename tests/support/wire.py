"""A minimal PostgreSQL v3 frontend over a raw socket, for tests that must send bytes no driver would send."""
from __future__ import annotations

import socket
import struct
import time

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Message types a frontend may send after startup; any other first byte is an unknown message type.
FRONTEND_TYPES = frozenset(b"BCDEFHPQScdfpX")


def message(kind: bytes, body: bytes = b"") -> bytes:
    """A typed protocol message: one type byte, an int32 length counting itself, the body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def startup_packet(user: str, database: str, **params: str) -> bytes:
    """A protocol 3.0 StartupMessage."""
    pairs = {"user": user, "database": database, **params}
    body = struct.pack("!I", PROTOCOL_3_0)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def special_request(code: int) -> bytes:
    """An SSLRequest / GSSENCRequest: length 8 and the request code."""
    return struct.pack("!II", 8, code)


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse / NoticeResponse body, keyed by their one-letter code."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


class ServerClosed(Exception):
    """The server closed the connection."""


class RawConnection:
    """A socket speaking just enough of the protocol to start up, send raw bytes and read whole messages."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, source_ip: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source_ip, 0) if source_ip else None)
        self.timeout = timeout
        self._buf = bytearray()
        self._pos = 0  # start of unread data in _buf; consumed bytes are dropped in bulk, not per message

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def finish_sending(self) -> None:
        """Half-close: the server sees end of input but can still answer."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete message from the server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no complete message from the server in time") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ServerClosed(f"server closed the connection ({self._unread()} bytes of a partial message left)")
        if self._pos > 65536:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk

    def _unread(self) -> int:
        return len(self._buf) - self._pos

    def read_byte(self, timeout: float | None = None) -> bytes:
        """One unframed byte, as the answer to SSLRequest / GSSENCRequest."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self._unread():
            self._fill(deadline)
        self._pos += 1
        return bytes(self._buf[self._pos - 1:self._pos])

    def read_message(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """The next (type, body); raises ServerClosed at end of stream and TimeoutError when nothing comes."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._unread() < 5:
            self._fill(deadline)
        (length,) = struct.unpack_from("!I", self._buf, self._pos + 1)
        while self._unread() < 1 + length:
            self._fill(deadline)  # may compact the buffer: positions are taken only after it
        start = self._pos
        kind = bytes(self._buf[start:start + 1])
        body = bytes(self._buf[start + 5:start + 1 + length])
        self._pos = start + 1 + length
        return kind, body

    def read_until_closed(self, timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        """Every message until the server closes; TimeoutError if it neither closes nor answers in time."""
        deadline = time.monotonic() + (timeout or self.timeout)
        messages = []
        while True:
            try:
                messages.append(self.read_message(max(deadline - time.monotonic(), 0.001)))
            except ServerClosed:
                return messages

    def read_until_ready(self, timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        """Every message up to and including ReadyForQuery."""
        deadline = time.monotonic() + (timeout or self.timeout)
        messages = []
        while True:
            kind, body = self.read_message(max(deadline - time.monotonic(), 0.001))
            messages.append((kind, body))
            if kind == b"Z":
                return messages

    def start(self, user: str, database: str, **params: str) -> list[tuple[bytes, bytes]]:
        """Send a StartupMessage and read to the first ReadyForQuery (trust authentication only)."""
        self.send(startup_packet(user, database, **params))
        messages = []
        while not messages or messages[-1][0] != b"Z":
            kind, body = self.read_message()
            messages.append((kind, body))
            if kind == b"E":
                raise RuntimeError(f"startup failed: {error_fields(body)}")
            if kind == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                raise RuntimeError("the server asked for a password; only trust authentication is supported here")
        return messages

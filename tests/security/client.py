"""A raw-socket login that answers SCRAM-SHA-256 and md5 itself, so tests see the exact refusal and pick the source address."""
from __future__ import annotations

import hashlib
import struct

import scramp

from tests.support.wire import RawConnection, error_fields, message, startup_packet


class SourcedConnection(RawConnection):
    """A RawConnection whose socket is bound to a chosen local address (127.0.0.2 is another host to the proxy)."""

    def __init__(self, host: str, port: int, source_ip: str, timeout: float = 10.0):
        super().__init__(host, port, timeout, source_ip=source_ip)


def login(proxy, user: str, database: str, password: str | None = None, source_ip: str | None = None,
          **params: str) -> dict[str, str] | None:
    """Log in through the proxy; None when let in (ReadyForQuery), else the ErrorResponse's fields."""
    conn = (SourcedConnection(proxy.host, proxy.port, source_ip) if source_ip
            else RawConnection(proxy.host, proxy.port))
    with conn:
        conn.send(startup_packet(user, database, **params))
        scram = None
        while True:
            kind, body = conn.read_message()
            if kind == b"E":
                return error_fields(body)
            if kind == b"Z":
                return None
            if kind != b"R":
                continue
            (code,) = struct.unpack("!I", body[:4])
            if code == 5:   # md5
                inner = hashlib.md5(((password or "") + user).encode()).hexdigest()
                outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                conn.send(message(b"p", b"md5" + outer.encode() + b"\0"))
            elif code == 10:   # SASL: SCRAM-SHA-256 without channel binding
                scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password or "")
                first = scram.get_client_first().encode()
                conn.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            elif code == 11:
                scram.set_server_first(body[4:].decode())
                conn.send(message(b"p", scram.get_client_final().encode()))
            elif code == 12:
                scram.set_server_final(body[4:].decode())   # raises if the server could not prove it knows the secret

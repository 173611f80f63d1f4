"""Malformed protocol input: every bad connection gets 08P01 or is closed, the proxy stays up, others see nothing.

A seeded generator builds 1,000 cases across the ways a client can break the protocol; a failure names the
case so it can be replayed.
"""
from __future__ import annotations

import random
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
import pytest

from tests.proxy.helpers import connect
from tests.support.wire import (FRONTEND_TYPES, RawConnection, ServerClosed, error_fields, message, query,
                                startup_packet)

SEED = 5432
CASES = 1000
ONE_GB = 1 << 30
UNKNOWN_TYPES = bytes(b for b in range(256) if b not in FRONTEND_TYPES)


@dataclass
class Case:
    index: int
    kind: str
    payload: bytes
    after_startup: bool  # sent once the connection is ready for queries
    half_close: bool     # the client then signals end of input (needed where only EOF reveals the fault)
    must_error: bool     # an ErrorResponse 08P01 is required, not just a close
    codes: frozenset = frozenset({"08P01"})

    def __str__(self) -> str:
        return f"case {self.index} ({self.kind}): {self.payload[:40].hex()}{'...' if len(self.payload) > 40 else ''}"


def valid_messages(rng: random.Random) -> list[bytes]:
    n = rng.randrange(1000)
    return [
        query(f"SELECT {n}"),
        message(b"P", b"s1\0SELECT $1::int + " + str(n).encode() + b"\0\0\x01\0\0\0\x17"),
        message(b"B", b"\0s1\0\0\0\0\x01\0\0\0\x01" + str(n % 10).encode() + b"\0\0"),
        message(b"E", b"\0\0\0\0\0"),
        message(b"D", b"Ss1\0"),
    ]


def generate(rng: random.Random, index: int) -> Case:
    kind = rng.choice([
        "garbage before startup", "startup length out of range", "truncated startup",
        "unknown message type", "length below 4", "length over 1 GB", "truncated message",
        "garbage after startup", "wrong length",
    ])
    garbage = rng.randbytes(rng.randrange(1, 64))
    if kind == "garbage before startup":
        # An unsupported protocol version is refused as PostgreSQL does, with 0A000.
        return Case(index, kind, garbage, False, True, False, frozenset({"08P01", "0A000"}))
    if kind == "startup length out of range":
        length = rng.choice([rng.randrange(0, 8), rng.randrange(ONE_GB + 1, 1 << 32)])
        return Case(index, kind, struct.pack("!I", length) + garbage[:16], False, False, False)
    if kind == "truncated startup":
        packet = startup_packet("fuzz", "postgres")
        return Case(index, kind, packet[:rng.randrange(1, len(packet))], False, True, False)
    if kind == "unknown message type":
        body = garbage[:rng.randrange(0, 32)]
        return Case(index, kind, bytes([rng.choice(UNKNOWN_TYPES)]) + struct.pack("!I", len(body) + 4) + body,
                    True, False, True)
    if kind == "length below 4":
        return Case(index, kind, bytes([rng.choice(b"QPBEDSHCdf")]) + struct.pack("!I", rng.randrange(0, 4)),
                    True, False, False)
    if kind == "length over 1 GB":
        return Case(index, kind, bytes([rng.choice(b"QPBEDCdf")]) + struct.pack("!I", rng.randrange(ONE_GB, 1 << 32))
                    + garbage[:16], True, False, False)
    if kind == "truncated message":
        msg = rng.choice(valid_messages(rng))
        return Case(index, kind, msg[:rng.randrange(1, len(msg))], True, True, False)
    if kind == "garbage after startup":
        return Case(index, kind, bytes([rng.choice(UNKNOWN_TYPES)]) + garbage, True, True, False)
    # wrong length: a Query or Parse whose length field no longer matches its body
    msg = rng.choice(valid_messages(rng)[:2])
    (length,) = struct.unpack("!I", msg[1:5])
    wrong = rng.choice([n for n in range(4, length + 64) if n != length])
    return Case(index, kind, msg[:1] + struct.pack("!I", wrong) + msg[5:], True, True, False)


def run_case(proxy, dbname: str, case: Case) -> str | None:
    """Send the case; return None if the proxy answered acceptably, else what went wrong."""
    try:
        with RawConnection(proxy.host, proxy.port, timeout=10) as conn:
            if case.after_startup:
                conn.start("fuzz", dbname)
            try:
                conn.send(case.payload)
            except OSError:
                pass  # the proxy may close before taking every byte; what it said before closing still counts
            if case.half_close:
                conn.finish_sending()
            answers = conn.read_until_closed(timeout=10)
    except TimeoutError:
        return "the proxy neither answered nor closed the connection"
    except (OSError, RuntimeError, ServerClosed) as e:
        return f"{type(e).__name__}: {e}"
    codes = []
    for kind, body in answers:
        if kind == b"Z":
            continue  # PostgreSQL reports some framing faults as a plain ERROR and stays ready
        if kind != b"E":
            return f"unexpected {kind!r} message: {body[:80]!r}"
        codes.append(error_fields(body).get("C"))
    if any(code not in case.codes for code in codes):
        return f"ErrorResponse with SQLSTATE {codes}, expected {sorted(case.codes)}"
    if case.must_error and not codes:
        return "closed without an ErrorResponse 08P01"
    return None


class HealthyClient(threading.Thread):
    """A well-behaved client looping queries until told to stop."""

    def __init__(self, proxy, dbname: str):
        super().__init__(daemon=True)
        self.proxy, self.dbname = proxy, dbname
        self.stop = threading.Event()
        self.queries = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with connect(self.proxy, self.dbname) as conn:
                while not self.stop.is_set():
                    value = conn.execute("SELECT %s::int + 1", [self.queries]).fetchone()[0]
                    if value != self.queries + 1:
                        self.errors.append(f"wrong answer {value} to query {self.queries}")
                    self.queries += 1
        except psycopg.Error as e:
            self.errors.append(f"{type(e).__name__}: {e}")


@pytest.mark.timeout(120)
def test_malformed_input_gets_08P01_or_a_close_and_the_proxy_stays_up(fresh_db, proxy_factory):
    proxy = proxy_factory(dbname=fresh_db, pool_size=4)
    rng = random.Random(SEED)
    cases = [generate(rng, i) for i in range(CASES)]
    healthy = HealthyClient(proxy, fresh_db)
    healthy.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda case: run_case(proxy, fresh_db, case), cases))
    finally:
        healthy.stop.set()
        healthy.join(30)

    failures = [f"{case}: {outcome}" for case, outcome in zip(cases, outcomes) if outcome]
    assert failures == [], f"{len(failures)} bad answers, first ones:\n" + "\n".join(failures[:15]) + \
        f"\nproxy log tail:\n{proxy.log()[-3000:]}"
    assert proxy.alive(), proxy.log()[-3000:]
    assert healthy.errors == [] and healthy.queries > 0
    with connect(proxy, fresh_db) as after:
        assert after.execute("SELECT 'still serving'").fetchone()[0] == "still serving"

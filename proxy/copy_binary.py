"""PostgreSQL's binary COPY format, for the query log's group rows.

A group row carries one array per statement field (pgpilot.query_event_groups). In COPY's text format every
element of those arrays is formatted by Python (str() of each integer, repr() of each score) and parsed again by
the backend; in the binary format a whole array of fixed-width values is one numpy assignment here and one
memcpy-like pass there. Variable-width values (names, table lists, the session) are encoded once per statement
or session and reused.

Format (PostgreSQL docs, "COPY ... Binary Format"): a header, then per row an int16 field count and per field an
int32 length (-1 for NULL) followed by the value in the type's send format; an int16 -1 ends the data.
"""
from __future__ import annotations

import ipaddress
import struct

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)

# Element type OIDs (pg_type), as array_recv checks them.
OID_BOOL, OID_INT8, OID_INT4, OID_TEXT, OID_FLOAT4 = 16, 20, 23, 25, 700

_I32 = struct.Struct(">i")
_I16 = struct.Struct(">h")
_TIMESTAMP = struct.Struct(">iq")             # field length 8, then microseconds since 2000-01-01 UTC
_ARRAY_HEAD = struct.Struct(">iiiIii")        # field length, ndim 1, has nulls, element OID, length, lower bound 1
_EMPTY_ARRAY = struct.Struct(">iiiI")         # field length 12, ndim 0, has nulls 0, element OID
_PG_EPOCH_US = 946_684_800 * 1_000_000        # 2000-01-01 in microseconds since 1970-01-01

# Fixed-width elements as they travel in an array without NULLs: an int32 length (always the width), the value.
_ELEMENT = {
    OID_INT8: (np.dtype([("n", ">i4"), ("v", ">i8")]), 8, struct.Struct(">iq")),
    OID_INT4: (np.dtype([("n", ">i4"), ("v", ">i4")]), 4, struct.Struct(">ii")),
    OID_BOOL: (np.dtype([("n", ">i4"), ("v", "?")]), 1, struct.Struct(">i?")),
    OID_FLOAT4: (np.dtype([("n", ">i4"), ("v", ">f4")]), 4, struct.Struct(">if")),
}
_INTEGER = frozenset((OID_INT8, OID_INT4))   # numpy refuses None for these; bool and float4 would take it


def row_head(fields: int) -> bytes:
    return _I16.pack(fields)


def timestamp_us(us: int) -> bytes:
    """A timestamptz field from whole microseconds since the Unix epoch (UTC)."""
    return _TIMESTAMP.pack(8, us - _PG_EPOCH_US)


def text(value) -> bytes:
    """A text field (NULL for None)."""
    if value is None:
        return NULL
    data = str(value).encode("utf-8", "replace")
    return _I32.pack(len(data)) + data


def text_array(values) -> bytes:
    """A one-dimensional text[] field (NULL for None, NULL elements for None elements)."""
    if values is None:
        return NULL
    values = list(values)
    if not values:
        return _EMPTY_ARRAY.pack(12, 0, 0, OID_TEXT)
    body = b"".join(NULL if v is None else text(v) for v in values)
    has_nulls = 1 if None in values else 0
    return _ARRAY_HEAD.pack(20 + len(body), 1, has_nulls, OID_TEXT, len(values), 1) + body


def inet(addr: str | None) -> bytes:
    """An inet field from its text form (an address, or an address with a prefix length)."""
    if addr is None:
        return NULL
    iface = ipaddress.ip_interface(addr)
    packed = iface.ip.packed
    # PGSQL_AF_INET is AF_INET (2) and PGSQL_AF_INET6 is AF_INET + 1, whatever the platform's AF_INET6.
    family = 2 if iface.version == 4 else 3
    return _I32.pack(4 + len(packed)) + bytes((family, iface.network.prefixlen, 0, len(packed))) + packed


def fixed_array(values, oid: int) -> bytes:
    """A one-dimensional array field of a fixed-width type; NULL when every element is None."""
    n = len(values)
    dtype, width, element = _ELEMENT[oid]
    if values[0] is None and values.count(None) == n:
        return NULL
    if oid in _INTEGER:
        # numpy refuses None in an integer array (TypeError): the common case, no NULL, costs no scan for it.
        try:
            return _packed(values, n, dtype, width, oid)
        except TypeError:
            pass
    elif None not in values:
        return _packed(values, n, dtype, width, oid)
    body = b"".join(NULL if v is None else element.pack(width, v) for v in values)
    return _ARRAY_HEAD.pack(20 + len(body), 1, 1, oid, n, 1) + body


def _packed(values, n: int, dtype, width: int, oid: int) -> bytes:
    a = np.empty(n, dtype)
    a["n"] = width
    a["v"] = values
    body = a.tobytes()
    return _ARRAY_HEAD.pack(20 + len(body), 1, 0, oid, n, 1) + body


def offsets_array(ts: list, base_us: int) -> bytes:
    """bigint[] of each time (seconds since the epoch, float) minus base_us, in whole microseconds (truncated, as
    int() does)."""
    dtype, width, _ = _ELEMENT[OID_INT8]
    a = np.empty(len(ts), dtype)
    a["n"] = width
    a["v"] = (np.array(ts, dtype=np.float64) * 1e6).astype(np.int64) - base_us
    body = a.tobytes()
    return _ARRAY_HEAD.pack(20 + len(body), 1, 0, OID_INT8, len(ts), 1) + body

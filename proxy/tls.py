"""TLS on both sides of the proxy: the context clients' SSLRequests are upgraded with, and encrypted upstream connections.

Clients ask for TLS with an SSLRequest; the session answers 'S' and upgrades its transport with
`loop.start_tls` using `ClientTls.context`. Towards the upstream, `open_upstream` sends the SSLRequest itself
and starts TLS on the same socket before the StartupMessage, following libpq's sslmode meanings.
"""
from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Callable

from scramp.core import CBindData

from proxy import protocol as P

if TYPE_CHECKING:
    from proxy.config import Database, TlsConfig

SSL_REQUEST = struct.pack("!ii", 8, P.SSL_REQUEST)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class UpstreamTlsError(ConnectionError):
    """The upstream could not give the encryption its sslmode asks for."""


class ClientTls:
    """TLS towards clients: the server-side context, the mode, and the channel-binding data of our certificate."""

    def __init__(self, mode: str, context: ssl.SSLContext, channel_binding: bytes | None,
                 handshake_timeout: float):
        self.mode = mode
        self.context = context
        self.channel_binding = channel_binding   # tls-server-end-point hash for SCRAM-SHA-256-PLUS
        self.handshake_timeout = handshake_timeout

    @property
    def required(self) -> bool:
        return self.mode == "require"

    @classmethod
    def from_config(cls, cfg: "TlsConfig") -> "ClientTls | None":
        """None when client TLS is disabled; raises OSError (ssl.SSLError) when the files are unusable."""
        if cfg.client_mode == "disable":
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = _VERSIONS[cfg.client_min_version]
        ctx.load_cert_chain(cfg.client_cert_file, cfg.client_key_file)
        return cls(cfg.client_mode, ctx, server_end_point(cfg.client_cert_file), cfg.handshake_timeout)


def server_end_point(cert_file: str) -> bytes | None:
    """RFC 5929 tls-server-end-point data of the first certificate in a PEM file (None if it cannot be hashed)."""
    with open(cert_file) as f:
        pem = f.read()
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        return None
    der = ssl.PEM_cert_to_DER_cert(pem[begin:end + len("-----END CERTIFICATE-----")] + "\n")
    try:
        return bytes(CBindData.from_der(der))
    except Exception:   # an unusual signature algorithm: offer SCRAM without channel binding
        return None


# ------------------------------------------------------------------------------------------------ upstream

@functools.lru_cache(maxsize=32)
def upstream_context(sslmode: str, sslrootcert: str | None) -> ssl.SSLContext:
    """The client-side context for an upstream sslmode, as libpq reads it.

    require checks nothing (unless a root certificate is given: then it is verify-ca, as in libpq),
    verify-ca checks the chain, verify-full also the host name. Without sslrootcert the system CAs are used.
    """
    verify = sslmode in ("verify-ca", "verify-full") or (sslmode == "require" and sslrootcert is not None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if sslrootcert:
            ctx.load_verify_locations(cafile=sslrootcert)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = sslmode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_upstream(protocol_factory: Callable[[], asyncio.Protocol], db: "Database",
                        encrypt: bool | None = None) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Connect to an upstream, negotiating TLS first when its sslmode (or `encrypt`) asks for it.

    The protocol's connection_made runs once the channel is ready (after the handshake), so it can send the
    StartupMessage straight away. Raises OSError (UpstreamTlsError, ssl.SSLError) on failure.
    """
    loop = asyncio.get_running_loop()
    if encrypt is None:
        encrypt = db.sslmode not in ("disable", "allow")
    if not encrypt:
        return await loop.create_connection(protocol_factory, db.host, db.port)
    sock = await _connect_socket(loop, db.host, db.port)
    try:
        await loop.sock_sendall(sock, SSL_REQUEST)
        answer = await loop.sock_recv(sock, 1)
        if answer == b"S":
            ctx = upstream_context(db.sslmode if db.sslmode != "allow" else "require", db.sslrootcert)
            return await loop.create_connection(protocol_factory, sock=sock, ssl=ctx, server_hostname=db.host)
        if answer == b"N" and db.sslmode == "prefer":
            return await loop.create_connection(protocol_factory, sock=sock)
        if answer == b"N":
            raise UpstreamTlsError(f"server does not support SSL, but sslmode={db.sslmode} requires it")
        raise UpstreamTlsError(f"unexpected answer to SSLRequest: {answer!r}")
    except BaseException:
        sock.close()
        raise


async def _connect_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to the first address of host that answers."""
    last: OSError | None = None
    for family, type_, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            last = e
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(f"no address for {host}")

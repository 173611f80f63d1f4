"""Client authentication at the proxy: hba-style rules, SCRAM-SHA-256 and md5 exchanges, secrets from an
auth_file or an auth_query, and a brake on repeated failed logins from one address.

`ClientAuth.authenticate` runs during a session's startup, after the StartupMessage and before the session
sends AuthenticationOk. It refuses a client itself (a FATAL with Postgres' SQLSTATE and wording) and
returns False, so a refused login never touches a backend. Without an `auth` section in the config every
client is trusted, as before authentication existed; TLS towards clients (proxy/tls.py) is enforced here too.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import scramp
from scramp.core import ServerError

from proxy import protocol as P
from proxy.protocol import ProtocolError
from proxy.tls import ClientTls, upstream_context

if TYPE_CHECKING:
    from proxy.config import AuthConfig, Config, Database, HbaRule
    from proxy.session import ClientSession

log = logging.getLogger("pgpilot.auth")

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"

# AuthenticationRequest codes.
AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 5, 10, 11, 12


def auth_request(code: int, payload: bytes = b"") -> bytes:
    """An AuthenticationRequest ('R') message."""
    return P.message(P.B_AUTH, struct.pack("!i", code) + payload)


# ================================================================================================ secrets

_SCRAM_RE = re.compile(r"^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$")
_MD5_RE = re.compile(r"^md5[0-9a-f]{32}$")


@dataclass(frozen=True)
class ScramVerifier:
    """What a server keeps of a SCRAM-SHA-256 password: salt, iterations, StoredKey and ServerKey."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> "ScramVerifier | None":
        """Postgres' form, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64), or None."""
        m = _SCRAM_RE.match(text)
        if m is None:
            return None
        try:
            salt, stored, server = (base64.b64decode(g, validate=True) for g in m.group(2, 3, 4))
        except ValueError:
            return None
        return cls(int(m.group(1)), salt, stored, server)

    @classmethod
    def from_password(cls, password: str, iterations: int = 4096, salt: bytes | None = None) -> "ScramVerifier":
        salt, stored, server, i = scramp.ScramMechanism(SCRAM).make_auth_info(
            password, iteration_count=iterations, salt=salt)
        return cls(i, salt, stored, server)

    def __str__(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        return f"SCRAM-SHA-256${self.iterations}:{b64(self.salt)}${b64(self.stored_key)}:{b64(self.server_key)}"

    def auth_info(self, _username: str = "") -> tuple[bytes, bytes, bytes, int]:
        """scramp's auth_fn answer; the user is the startup packet's, whatever the SCRAM message names."""
        return self.salt, self.stored_key, self.server_key, self.iterations


def md5_secret(user: str, password: str) -> str:
    """Postgres' md5 password hash: 'md5' + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


class Secret:
    """A stored credential: a SCRAM verifier, an md5 hash or a plaintext password (as in userlist.txt / pg_shadow)."""

    __slots__ = ("text", "kind", "_verifier", "_iterations")

    def __init__(self, text: str, iterations: int = 4096):
        self.text = text
        self._iterations = iterations
        self._verifier = ScramVerifier.parse(text) if text.startswith("SCRAM-SHA-256$") else None
        if self._verifier is not None:
            self.kind = "scram"
        elif _MD5_RE.match(text):
            self.kind = "md5"
        else:
            self.kind = "plain"

    def scram_verifier(self) -> ScramVerifier | None:
        """The verifier to check a SCRAM proof against: stored, or derived once from a plaintext password."""
        if self._verifier is None and self.kind == "plain":
            self._verifier = ScramVerifier.from_password(self.text, self._iterations)
        return self._verifier

    def md5_matches(self, user: str, salt: bytes, response: bytes) -> bool:
        """Whether a PasswordMessage answers the md5 challenge with `salt`."""
        if self.kind == "md5":
            inner = self.text[3:]
        elif self.kind == "plain":
            inner = md5_secret(user, self.text)[3:]
        else:
            return False
        expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
        return hmac.compare_digest(expected, response)


_USERLIST_TOKEN = re.compile(r'"((?:[^"]|"")*)"')


def parse_userlist(text: str) -> dict[str, str]:
    """PgBouncer's userlist.txt: `"user" "secret"` per line, `""` for a quote; other lines are comments."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.lstrip().startswith('"'):
            continue
        tokens = [t.replace('""', '"') for t in _USERLIST_TOKEN.findall(line)]
        if len(tokens) >= 2:
            entries[tokens[0]] = tokens[1]
    return entries


class AuthFile:
    """Secrets from a userlist.txt file, re-read whenever the file changes on disk."""

    def __init__(self, path: str, iterations: int = 4096):
        """Reads the file now: OSError if it cannot be read (a config error at startup or reload)."""
        self.path = path
        self.iterations = iterations
        self._stamp: tuple | str | None = None
        self._secrets: dict[str, Secret] = {}
        self._read()

    def get(self, user: str) -> Secret | None:
        try:
            self._read()
        except OSError as e:
            if self._stamp != "unreadable":
                log.error("cannot read auth_file %s: %s (keeping the secrets read before)", self.path, e)
                self._stamp = "unreadable"
        return self._secrets.get(user)

    def _read(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        with open(self.path, encoding="utf-8") as f:
            entries = parse_userlist(f.read())
        self._secrets = {u: Secret(s, self.iterations) for u, s in entries.items()}
        self._stamp = stamp
        log.info("auth_file %s: %d users", self.path, len(self._secrets))


class AuthLookupError(Exception):
    """auth_query could not be run (upstream down, wrong auth_user...)."""


class AuthQuery:
    """Secrets looked up in the upstream with auth_query as auth_user, one connection per upstream, cached briefly."""

    def __init__(self, cfg: "AuthConfig", databases: dict[str, "Database"], auth_file: AuthFile | None,
                 connect_timeout: float):
        self.cfg = cfg
        self.databases = databases
        self.connect_timeout = connect_timeout
        self.password = cfg.auth_password
        if self.password is None and auth_file is not None:
            own = auth_file.get(cfg.auth_user)
            if own is not None and own.kind == "plain":
                self.password = own.text
        self._cache: dict[tuple[str, str], tuple[float, Secret | None]] = {}
        self._conns: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def target_for(self, database: str) -> str | None:
        """The databases entry auth_query runs in for a client of `database`."""
        if self.cfg.auth_dbname:
            return self.cfg.auth_dbname
        if database in self.databases:
            return database
        return next(iter(self.databases), None)

    async def lookup(self, user: str, database: str) -> Secret | None:
        target = self.target_for(database)
        if target is None or target not in self.databases:
            raise AuthLookupError(f"auth_dbname {target!r} is not a configured database")
        now = time.monotonic()
        hit = self._cache.get((target, user))
        if hit is not None and hit[0] > now:
            return hit[1]
        text = await self._fetch(target, user)
        secret = Secret(text, self.cfg.scram_iterations) if text else None
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[(target, user)] = (time.monotonic() + self.cfg.cache_seconds, secret)
        return secret

    async def _fetch(self, target: str, user: str) -> str | None:
        import asyncpg  # only proxies configured with auth_user pay for it

        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            conn = self._conns.get(target)
            try:
                if conn is None or conn.is_closed():
                    conn = self._conns[target] = await self._connect(target)
                row = await asyncio.wait_for(conn.fetchrow(self.cfg.auth_query, user), self.connect_timeout)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as e:
                self._conns.pop(target, None)
                if conn is not None:
                    conn.terminate()
                raise AuthLookupError(f"auth_query in {target} as {self.cfg.auth_user}: "
                                      f"{type(e).__name__}: {e}") from None
        return row[1] if row is not None else None

    async def _connect(self, target: str):
        import asyncpg

        db = self.databases[target]
        if db.sslmode == "disable":
            ssl = False
        elif db.sslmode in ("allow", "prefer"):
            ssl = "prefer"
        else:
            ssl = upstream_context(db.sslmode, db.sslrootcert)
        return await asyncpg.connect(
            host=db.host, port=db.port, user=self.cfg.auth_user, password=self.password, database=db.dbname,
            ssl=ssl, timeout=self.connect_timeout, statement_cache_size=0,
            server_settings={"application_name": "pgpilot auth_query"})

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # closing is best effort
                conn.terminate()


# ================================================================================================ rules

class HbaRules:
    """hba-style rules, compiled; first match wins."""

    def __init__(self, rules: list["HbaRule"]):
        self._rules = []
        for r in rules:
            dbs = _names(r.database)
            users = _names(r.user)
            net = None if r.address == "all" else ipaddress.ip_network(r.address, strict=False)
            self._rules.append((r.type, dbs, users, net, r.method))

    def method_for(self, database: str, user: str, addr: str | None, encrypted: bool) -> str | None:
        ip = _ip(addr)
        for kind, dbs, users, net, method in self._rules:
            if kind == "hostssl" and not encrypted or kind == "hostnossl" and encrypted:
                continue
            if dbs is not None and database not in dbs or users is not None and user not in users:
                continue
            if net is not None and (ip is None or ip.version != net.version or ip not in net):
                continue
            return method
        return None


def _names(value: str | list[str]) -> frozenset[str] | None:
    names = [value] if isinstance(value, str) else value
    return None if "all" in names else frozenset(names)


def _ip(addr: str | None):
    if addr is None:
        return None
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class LoginThrottle:
    """Failed logins per client address: `max_failures` within `window` seconds lock it out for `lockout` seconds."""

    def __init__(self, max_failures: int, window: float, lockout: float):
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def locked(self, addr: str, now: float) -> bool:
        until = self._locked_until.get(addr)
        if until is None:
            return False
        if until > now:
            return True
        del self._locked_until[addr]
        return False

    def failed(self, addr: str, now: float) -> bool:
        """Count one failure; True when it locks the address out."""
        if not self.max_failures:
            return False
        times = self._failures.get(addr)
        if times is None:
            if len(self._failures) > 10_000:
                self._forget_older_than(now - self.window)
            times = self._failures[addr] = deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.max_failures:
            self._locked_until[addr] = now + self.lockout
            del self._failures[addr]
            return True
        return False

    def _forget_older_than(self, limit: float) -> None:
        self._failures = {a: t for a, t in self._failures.items() if t and t[-1] > limit}


# ================================================================================================ exchanges

class ClientAuth:
    """Decides whether a starting client may come in, and runs the password exchange with it."""

    def __init__(self, config: "Config"):
        self.cfg = config.auth
        self.tls = ClientTls.from_config(config.tls)
        self._mock_key = os.urandom(32)
        self._scram = scramp.ScramMechanism(SCRAM)
        cfg = self.cfg
        if cfg is None:
            self.rules = None
            self.auth_file = None
            self.auth_query = None
            self.throttle = None
            return
        self.rules = HbaRules(cfg.hba) if cfg.hba else None
        self.auth_file = AuthFile(cfg.auth_file, cfg.scram_iterations) if cfg.auth_file else None
        self.auth_query = (AuthQuery(cfg, config.databases, self.auth_file, config.timeouts.connect)
                           if cfg.auth_user else None)
        self.throttle = LoginThrottle(cfg.max_failures, cfg.failure_window, cfg.lockout)
        if self.auth_file is None and self.auth_query is None:
            log.warning("auth: neither auth_file nor auth_user is set; only trust rules can let clients in")

    async def authenticate(self, session: "ClientSession", params: dict[str, str]) -> bool:
        user, database, addr = session.user, session.database, session.client_addr
        encrypted = session.transport.get_extra_info("ssl_object") is not None
        if self.tls is not None and self.tls.required and not encrypted:
            session.fatal("28000", _hba_refusal("no pg_hba.conf entry for", addr, user, database, encrypted))
            return False
        cfg = self.cfg
        if cfg is None:
            return True
        if addr is not None and self.throttle.locked(addr, time.monotonic()):
            session.fatal("28000", "too many failed login attempts from this address; try again later")
            return False
        method = cfg.method if self.rules is None else self.rules.method_for(database, user, addr, encrypted)
        if method is None:
            session.fatal("28000", _hba_refusal("no pg_hba.conf entry for", addr, user, database, encrypted))
            return False
        if method == "trust":
            return True
        if method == "reject":
            session.fatal("28000", _hba_refusal("pg_hba.conf rejects connection for", addr, user, database, encrypted))
            return False
        try:
            secret = await self.secret_for(user, database)
        except AuthLookupError as e:
            log.error("cannot authenticate user %s: %s", user, e)
            session.fatal("08006", f'pgpilot: could not look up the credentials of user "{user}"')
            return False
        try:
            ok = await asyncio.wait_for(self._exchange(session, method, user, secret, encrypted), cfg.timeout)
        except asyncio.TimeoutError:
            session.fatal("08P01", "pgpilot: authentication timed out")
            return False
        if ok:
            return True
        log.info("password authentication failed for user %s from %s (database %s)", user, addr, database)
        if addr is not None and self.throttle.failed(addr, time.monotonic()):
            log.warning("too many failed logins from %s: refusing it for %gs", addr, cfg.lockout)
        session.fatal("28P01", f'password authentication failed for user "{user}"')
        return False

    async def secret_for(self, user: str, database: str) -> Secret | None:
        if self.auth_file is not None:
            secret = self.auth_file.get(user)
            if secret is not None:
                return secret
        if self.auth_query is not None:
            return await self.auth_query.lookup(user, database)
        return None

    async def _exchange(self, session: "ClientSession", method: str, user: str, secret: Secret | None,
                        encrypted: bool) -> bool:
        # Like Postgres, md5 upgrades to SCRAM when the stored secret is a SCRAM verifier.
        if method == "md5" and (secret is None or secret.kind != "scram"):
            return await self._md5(session, user, secret)
        verifier = secret.scram_verifier() if secret is not None else None
        # Unknown users go through a mock exchange (stable fake salt), so a refusal reveals nothing.
        return await self._scram_exchange(session, verifier or self._mock_verifier(user), encrypted,
                                          real=verifier is not None)

    async def _md5(self, session: "ClientSession", user: str, secret: Secret | None) -> bool:
        salt = os.urandom(4)
        session.transport.write(auth_request(AUTH_MD5, salt))
        raw = await _password_message(session)
        response, _ = P.read_cstring(raw, 5)
        return secret is not None and secret.md5_matches(user, salt, response)

    async def _scram_exchange(self, session: "ClientSession", verifier: ScramVerifier, encrypted: bool,
                              real: bool) -> bool:
        cb = self.tls.channel_binding if encrypted and self.tls is not None else None
        mechanisms = [SCRAM_PLUS, SCRAM] if cb else [SCRAM]
        session.transport.write(auth_request(AUTH_SASL, b"".join(P.cstr(m) for m in mechanisms) + b"\0"))

        raw = await _password_message(session)
        name, pos = P.read_cstring(raw, 5)
        mechanism = name.decode("ascii", "replace")
        if mechanism not in mechanisms:
            raise ProtocolError("client selected an invalid SASL authentication mechanism")
        if pos + 4 > len(raw) or P.unpack_i32(raw, pos) != len(raw) - pos - 4:
            raise ProtocolError("malformed SASLInitialResponse")
        client_first = _text(raw[pos + 4:])
        if (mechanism == SCRAM_PLUS) != client_first.startswith("p="):
            raise ProtocolError("SCRAM channel binding negotiation error: the flag does not match the mechanism")
        server = self._scram.make_server(
            verifier.auth_info, channel_binding=("tls-server-end-point", cb) if cb else None)
        try:
            _set_client_first(server, client_first)
        except scramp.ScramException as e:
            raise ProtocolError(f"malformed SCRAM message: {e}") from None
        session.transport.write(auth_request(AUTH_SASL_CONTINUE, server.get_server_first().encode()))

        raw = await _password_message(session)
        try:
            server.set_client_final(_text(raw[5:]))
        except scramp.ScramException as e:
            if e.server_error == ServerError.INVALID_PROOF:
                return False
            if e.server_error == ServerError.CHANNEL_BINDINGS_DONT_MATCH:
                raise ProtocolError("SCRAM channel binding check failed") from None
            raise ProtocolError(f"malformed SCRAM message: {e}") from None
        if not real:
            return False
        session.transport.write(auth_request(AUTH_SASL_FINAL, server.get_server_final().encode()))
        return True

    def _mock_verifier(self, user: str) -> ScramVerifier:
        salt = hmac.new(self._mock_key, user.encode(), hashlib.sha256).digest()[:16]
        return ScramVerifier(4096, salt, os.urandom(32), os.urandom(32))

    async def close(self) -> None:
        if self.auth_query is not None:
            await self.auth_query.close()


def _set_client_first(server: scramp.ScramServer, client_first: str) -> None:
    """Feed the client-first message to scramp, accepting libpq's empty user name (`n=,`).

    Postgres ignores the SCRAM user name (the startup packet's counts) and libpq leaves it empty, which scramp
    refuses; it gets a placeholder, and the original message is put back for the signatures.
    """
    gs2_end = client_first.find(",", client_first.find(",") + 1) + 1
    bare = client_first[gs2_end:]
    if not bare.startswith("n=,"):
        server.set_client_first(client_first)
        return
    server.set_client_first(client_first[:gs2_end] + "n=user" + bare[2:])
    server.client_first_bare = bare   # what the client signed


async def _password_message(session: "ClientSession") -> bytes:
    t, raw = await session.read_startup_message()
    if t != P.F_PASSWORD:
        raise ProtocolError(f"expected password response, got message type {t}")
    return raw


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("malformed SCRAM message: not UTF-8") from None


def _hba_refusal(prefix: str, addr: str | None, user: str, database: str, encrypted: bool) -> str:
    """Postgres' wording for an hba refusal, so clients and log parsers recognise it."""
    return (f'{prefix} host "{addr or "[local]"}", user "{user}", database "{database}", '
            f'{"SSL encryption" if encrypted else "no encryption"}')

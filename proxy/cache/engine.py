"""The result cache as the session sees it: classify, writes, key, lookup, fill, invalidate, stats.

Hot-path calls (classify, writes, key) answer from dictionaries keyed by the exact statement text and the
context's scope; the first sight of a text costs a parse, and the catalog half of the safety analysis runs in
the background (a text not analysed yet is "pending": not cached this time). lookup and invalidate make one
round trip to the shared tier (the lookups queued in one event-loop iteration share one); fill returns at once
and stores in the background.

State that makes answers unsafe is never waited out, it is bypassed: a database is served only while its
change feed is live and its catalog snapshot loaded; nothing is served while the shared tier is down,
breaker-open or inconsistent. A catalog change first bumps `catalog_version` and forgets every verdict (so
no lookup or fill still acts on an old one: both carry the version they were made under), then flushes.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import struct
import time
from collections import Counter, deque

from proxy import analysis
from proxy.cache import safety as S
from proxy.cache.admission import AdmissionPolicy, HeuristicAdmission, TemplateStats, TemplateTable
from proxy.cache.catalog import CatalogSnapshot, ProbeResult, catalog_signature, load_snapshot, probe
from proxy.cache.context import CacheContext
from proxy.cache.decoding import ChangeFeed, DecodedTransaction, PollingFeed, StreamingFeed
from proxy.cache.l1 import L1Cache, L1Entry
from proxy.cache.store import LocalStore, RedisStore

log = logging.getLogger("pgpilot.cache")

FLUSH = "*"               # in writes(): the statement's write targets are unknown: flush every entry
CATALOG = "*catalog"      # in writes(): DDL: forget every verdict, then flush
NO_KEY = b""              # key(): bound parameters make the statement uncacheable ('now' as a date parameter)

_blake2b = hashlib.blake2b
_LEN = struct.Struct("<I")


class Verdict:
    """classify()'s answer: cacheable, or the reason code why not; `tables` are the generation keys read.

    A cacheable verdict is shared by every text of its template (texts differing only in constants), which
    `template` names (the text with its constants replaced, or the text itself) and `text` shows (the first
    text seen); `stats` is the template's TemplateStats once the engine needed them."""

    __slots__ = ("cacheable", "reason", "tables", "template", "text", "stats")

    def __init__(self, cacheable: bool, reason: str | None, tables: tuple = (), template: str = "",
                 text: str = ""):
        self.cacheable = cacheable
        self.reason = reason
        self.tables = tables
        self.template = template
        self.text = text
        self.stats: TemplateStats | None = None

    def __repr__(self) -> str:
        return f"Verdict({'cacheable' if self.cacheable else self.reason}, tables={tuple(self.tables)})"


class TableKeys(tuple):
    """Generation keys ("<database>/<schema.table>") with what lookup() needs: the database, the Redis hash
    fields to read, and the catalog version the verdict was made under. Compares and hashes as a tuple."""

    db: "DatabaseState"
    fields: tuple[str, ...]
    version: int


_UNCACHEABLE: dict[str, Verdict] = {}


def uncacheable(reason: str) -> Verdict:
    v = _UNCACHEABLE.get(reason)
    if v is None:
        v = _UNCACHEABLE[reason] = Verdict(False, reason)
    return v


PENDING = uncacheable(S.PENDING)


def _answer_future(fut: asyncio.Future, entry, token) -> None:
    if not fut.done():
        fut.set_result((entry, token))


def _make_room(d: dict, limit: int) -> None:
    """Forget the oldest eighth of a full dict at once (a dict skips deleted slots from its start on every
    iteration, so evicting one entry at a time would cost a scan per insertion)."""
    if len(d) >= limit:
        for k in list(itertools.islice(iter(d), max(1, limit // 8))):
            del d[k]


class DatabaseState:
    """One upstream database: its catalog snapshot and connection, its probe queue and its change feed."""

    def __init__(self, name: str, dsn: str, hash_key: str):
        self.name = name
        self.dsn = dsn
        self.hash_key = hash_key
        self.snapshot: CatalogSnapshot | None = None
        self.snapshot_stale = True
        self.feed: ChangeFeed | None = None
        self.feed_live = False
        self.conn = None
        self.lock: asyncio.Lock | None = None
        self.queue: asyncio.Queue | None = None
        self.check_now: asyncio.Event | None = None
        self.fresh: asyncio.Event | None = None      # set while the snapshot is loaded and not stale
        self.tasks: list[asyncio.Task] = []
        self.catalog_changes = 0
        self.last_error = ""

    @property
    def serving(self) -> bool:
        return self.feed_live and self.snapshot is not None

    async def connection(self, timeout: float):
        import asyncpg
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, timeout=timeout, statement_cache_size=32,
                                              server_settings={"application_name": "pgpilot-cache-catalog",
                                                               "search_path": "pg_catalog"})
        return self.conn

    def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()


class ResultCache:
    """The cache engine for one proxy process; see docs/cache.md."""

    def __init__(self, cfg, upstream_dsns: dict[str, str], admission: AdmissionPolicy | None = None):
        self.cfg = cfg
        if cfg.redis_url:
            self.store = RedisStore(cfg.redis_url, cfg.key_prefix, cfg.redis_timeout, cfg.breaker_failures,
                                    cfg.breaker_cooldown, on_message=self._on_message)
        else:
            self.store = LocalStore(cfg.key_prefix)
        self.l1 = L1Cache(cfg.l1_max_bytes, cfg.l1_eviction)
        self.templates = TemplateTable()
        self.admission: AdmissionPolicy = admission or HeuristicAdmission(
            cfg.admission_warmup, cfg.admission_min_saved_us, cfg.admission_explore_every, cfg.admission_size_scale,
            cfg.admission_lookup_us)
        self._dbs = {name: DatabaseState(name, dsn, self.store.hash_key(name)) for name, dsn in upstream_dsns.items()}
        self._verdicts: dict[tuple[bytes, int], Verdict] = {}
        self._shapes: dict[tuple[str, int], Verdict] = {}
        self._writes: dict[tuple[bytes, int], tuple[str, ...]] = {}
        self._write_shapes: dict[tuple[str, int], tuple[str, ...]] = {}
        self._facts: dict[str, S.SyntaxFacts] = {}
        self._elements: dict[str, tuple[str, str]] = {}
        self._probing: set[tuple[str, int]] = set()
        self.catalog_version = 0
        self._started = False
        self._stopping = False
        self._ttl_ms = int(cfg.default_ttl * 1000)
        self._stored: deque[list] = deque()   # [expiry second, bytes] of entries this process stored
        self._stored_bytes = 0
        self._batch: list[tuple] = []          # lookups waiting for the next call to the shared tier
        self._skip_after = max(1, cfg.admission_warmup)
        self._explore_every = max(1, cfg.admission_explore_every)
        # Counters for stats().
        self.batches = 0
        self.hits = 0
        self.hits_l1 = 0
        self.write_analyses = 0                # statements analysed for the tables they write (a new shape each)
        self.misses = 0
        self.bypass: Counter[str] = Counter()
        self.uncacheable: Counter[str] = Counter()
        self.fills = 0
        self.fill_bytes = 0
        self.fills_rejected: Counter[str] = Counter()
        self.invalidations = 0
        self.invalidated_keys = 0
        self.flushes = 0
        self.invalidation_failures = 0
        self.decoded_invalidations = 0
        self.probes = 0
        self.probe_errors = 0

    # ================================================================ lifecycle

    async def start(self) -> None:
        """Connect the shared tier and start each database's catalog, probe and change-feed tasks; returns
        quickly: databases start serving in the background once their feed is live."""
        loop = asyncio.get_running_loop()
        await self.store.start()
        for db in self._dbs.values():
            db.lock = asyncio.Lock()
            db.queue = asyncio.Queue(maxsize=10_000)
            db.check_now = asyncio.Event()
            db.check_now.set()       # load the catalog snapshot now
            db.fresh = asyncio.Event()
            db.tasks = [loop.create_task(self._catalog_loop(db), name=f"cache-catalog-{db.name}"),
                        loop.create_task(self._probe_loop(db), name=f"cache-probe-{db.name}")]
            callbacks = dict(on_changes=lambda txns, db=db: self._decoded(db, txns),
                             on_live=lambda db=db: self._feed_live(db),
                             on_lost=lambda err, db=db: self._feed_lost(db, err))
            if self.cfg.decoding == "poll":
                db.feed = PollingFeed(db.name, db.dsn, interval=self.cfg.decode_interval,
                                      batch=self.cfg.decode_batch, **callbacks)
            else:
                db.feed = StreamingFeed(db.name, db.dsn, **callbacks)
            db.feed.start()
        self._started = True

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once every database is served (feed live, catalog loaded) and the shared tier answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serving:
                return True
            await asyncio.sleep(0.02)
        return self.serving

    @property
    def serving(self) -> bool:
        return self._started and self.store.serving and all(db.serving for db in self._dbs.values())

    async def stop(self) -> None:
        """Drop the decoding slots, end the tasks, close connections; bounded in time."""
        self._started = False
        self._stopping = True
        feeds = [db.feed.stop() for db in self._dbs.values() if db.feed is not None]
        if feeds:
            await asyncio.gather(*feeds, return_exceptions=True)
        tasks = [t for db in self._dbs.values() for t in db.tasks]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for db in self._dbs.values():
            conn, db.conn = db.conn, None
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 1.0)
                except Exception:  # noqa: BLE001 - shutting down
                    conn.terminate()
        await self.store.stop()

    # ================================================================ classify

    def classify(self, sql: bytes, ctx: CacheContext) -> Verdict:
        v = self._verdicts.get((sql, ctx.scope))
        if v is not None:
            if not v.cacheable:
                self.uncacheable[v.reason] += 1
            return v
        try:
            v = self._classify_cold(sql, ctx)
        except Exception:  # noqa: BLE001 - never into the session: not cacheable, and logged
            log.exception("cache: classifying a statement failed")
            v = uncacheable("error")
        if not v.cacheable:
            self.uncacheable[v.reason] += 1
        return v

    def _classify_cold(self, sql: bytes, ctx: CacheContext) -> Verdict:
        if not self._started:
            return uncacheable(S.DISABLED)
        db = self._dbs.get(ctx.database)
        if db is None:
            return uncacheable(S.DISABLED)
        if ctx.refusal is not None:
            return self._remember(sql, None, ctx, uncacheable(ctx.refusal))
        try:
            text = sql.decode("utf-8")
        except UnicodeDecodeError:
            return self._remember(sql, None, ctx, uncacheable(S.UNPARSEABLE))
        shape, moving = S.shape_of(text)
        if moving:
            return self._remember(sql, None, ctx, uncacheable(S.VOLATILE))
        if shape is not None:
            v = self._shapes.get((shape, ctx.scope))
            if v is not None:
                return self._remember(sql, None, ctx, v)
        facts = self._syntax(text, shape)
        if facts.reason is not None:
            return self._remember(sql, shape, ctx, uncacheable(facts.reason))
        key = (shape if shape is not None else text, ctx.scope)
        if key not in self._probing:
            try:
                db.queue.put_nowait((key, text, sql, shape, facts, ctx))
                self._probing.add(key)
            except asyncio.QueueFull:
                pass
        return PENDING

    def _syntax(self, text: str, shape: str | None) -> S.SyntaxFacts:
        k = shape if shape is not None else text
        f = self._facts.get(k)
        if f is None:
            f = S.syntax_facts(text)
            _make_room(self._facts, self.cfg.analysis_cache_size)
            self._facts[k] = f
        return f

    def _remember(self, sql: bytes, shape: str | None, ctx: CacheContext, v: Verdict) -> Verdict:
        limit = self.cfg.analysis_cache_size
        _make_room(self._verdicts, limit)
        self._verdicts[(sql, ctx.scope)] = v
        if shape is not None:
            _make_room(self._shapes, limit)
            self._shapes[(shape, ctx.scope)] = v
        return v

    def _element(self, db: DatabaseState, field: str) -> str:
        e = f"{db.name}/{field}"
        if e not in self._elements:
            self._elements[e] = (db.hash_key, field)
        return e

    def _table_keys(self, db: DatabaseState, fields: tuple[str, ...], version: int) -> TableKeys:
        keys = TableKeys(self._element(db, f) for f in fields)
        keys.db = db
        keys.fields = ("epoch", *fields) if fields else ()
        keys.version = version
        return keys

    async def _probe_loop(self, db: DatabaseState) -> None:
        import asyncpg
        while True:
            key, text, sql, shape, facts, ctx = await db.queue.get()
            try:
                await db.fresh.wait()
                version = self.catalog_version
                snapshot = db.snapshot
                self.probes += 1
                try:
                    async with db.lock:
                        conn = await db.connection(self.cfg.analysis_timeout + 3)
                        result = await asyncio.wait_for(
                            probe(conn, text, facts, ctx, snapshot, self.cfg.analysis_timeout),
                            self.cfg.analysis_timeout + 3)
                except (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError) as e:
                    self.probe_errors += 1     # busy, not wrong: the next sight tries again
                    db.last_error = f"probe: {e}"
                    continue
                except asyncpg.PostgresError as e:
                    self.probe_errors += 1
                    db.last_error = f"probe: {e}"
                    result = ProbeResult(S.ANALYSIS_ERROR, detail=str(e))
                except (OSError, asyncpg.InterfaceError, asyncio.TimeoutError, ValueError) as e:
                    self.probe_errors += 1
                    db.last_error = f"probe: {e}"
                    db.drop_connection()
                    continue
                if version != self.catalog_version:
                    continue    # the catalog changed while probing: the next sight probes again
                if result.stale:
                    db.check_now.set()
                    continue
                if result.reason is not None:
                    v = uncacheable(result.reason)
                else:
                    v = Verdict(True, None, self._table_keys(db, result.fields, version),
                                shape if shape is not None else text, text)
                self._remember(sql, shape, ctx, v)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad text must not stop the analysis of others
                log.exception("cache: analysing a statement failed")
            finally:
                self._probing.discard(key)

    # ================================================================ writes

    def writes(self, sql: bytes, ctx: CacheContext) -> tuple[str, ...]:
        w = self._writes.get((sql, ctx.scope))
        if w is not None:
            return w
        try:
            return self._writes_cold(sql, ctx)
        except Exception:  # noqa: BLE001 - unknown write targets: flush, never fail the session
            log.exception("cache: finding a statement's writes failed")
            return (FLUSH,)

    def _writes_cold(self, sql: bytes, ctx: CacheContext) -> tuple[str, ...]:
        if not self._started:
            return ()
        db = self._dbs.get(ctx.database)
        if db is None:
            return ()
        try:
            text = sql.decode("utf-8")
        except UnicodeDecodeError:
            return ()
        # What a statement writes follows from its shape: constants name no table (the analysis and the syntax
        # facts _write_targets reads are the same for every text of one shape), so a simple-protocol text with
        # new constants is answered without analysing it again, as its read verdict is (_classify_cold).
        limit = self.cfg.analysis_cache_size
        shape = S.shape_of(text)[0]
        if shape is not None:
            w = self._write_shapes.get((shape, ctx.scope))
            if w is not None:
                _make_room(self._writes, limit)
                self._writes[(sql, ctx.scope)] = w
                return w
        self.write_analyses += 1
        w, cacheable = self._write_targets(db, ctx, analysis.analyze(text), self._syntax(text, shape))
        if cacheable:
            _make_room(self._writes, limit)
            self._writes[(sql, ctx.scope)] = w
            if shape is not None:
                _make_room(self._write_shapes, limit)
                self._write_shapes[(shape, ctx.scope)] = w
        return w

    def _write_targets(self, db: DatabaseState, ctx: CacheContext, info: analysis.StatementInfo,
                       facts: S.SyntaxFacts) -> tuple[tuple[str, ...], bool]:
        """(generation keys written, whether that answer can be remembered for the text)."""
        if S.flushes_on_sight(facts):
            return (FLUSH,), True
        kinds = {s.kind for s in info.statements}
        if "ddl" in kinds:
            targeted = {"TruncateStmt", "RefreshMatViewStmt"}
            ddl_nodes = {n for n in facts.statements if n not in ("SelectStmt", "InsertStmt", "UpdateStmt",
                                                                      "DeleteStmt", "MergeStmt", "CopyStmt",
                                                                      "TransactionStmt", "VariableSetStmt")}
            if not ddl_nodes <= targeted or facts.truncate_cascade:
                return (FLUSH, CATALOG), True
        if not db.serving:
            # Nothing of this database is served, and it gets a new epoch when it is served again.
            return (), False
        snap = db.snapshot
        if not facts.functions.isdisjoint(snap.volatile_names):
            return (FLUSH,), True     # a volatile user function may write anywhere
        if not info.tables_written:
            return (), True
        if db.snapshot_stale:
            return (FLUSH,), False    # names may resolve differently after the DDL just seen
        out: list[str] = []
        for name in info.tables_written:
            rels = snap.resolve(name, ctx.schemas)
            if rels is None:
                return (FLUSH,), True
            for r in rels:
                if r.kind == "v":
                    return (FLUSH,), True
                if r.kind != "f":
                    out.append(self._element(db, r.field))
        return tuple(dict.fromkeys(out)), True

    # ================================================================ key, lookup, fill

    def key(self, ctx: CacheContext, sql: bytes, params: bytes = b"", formats: bytes = b"") -> bytes:
        if params and S.params_have_moving_input(params):
            return NO_KEY
        if not params and not formats:
            return _blake2b(ctx.digest + sql, digest_size=16).digest()
        # Length prefixes keep the parts apart (no bytes can move from the text into the parameters).
        return _blake2b(b"".join((ctx.digest, _LEN.pack(len(sql)), sql, _LEN.pack(len(params)), params, formats)),
                        digest_size=16).digest()

    async def lookup(self, key: bytes, tables) -> tuple[bytes | None, object]:
        """(entry or None, token or None); never raises, bounded by redis_timeout."""
        fut = asyncio.get_running_loop().create_future()
        if self.lookup_soon(key, tables, _answer_future, fut) is not None:
            return None, None
        return await fut

    def admission_turn(self, verdict: Verdict) -> bool | None:
        """Whether this execution of a cacheable verdict's template is looked up: None when its results were
        declined `admission_warmup` times (each admission forgets an eighth of the count; counted as
        bypass:not_admitted), except 1 in `admission_explore_every` executions, which explore (True: their
        results are stored, keeping the template's statistics current); False for an admitted template.
        The gap between explorations doubles after each one that leaves the template declined, up to
        16 x admission_explore_every, and starts again from admission_explore_every once lookups resume or an
        exploration hits (the workload may have changed: explorations are how the template earns its way back).
        Decided before the key is built, so a declined template costs one counter."""
        stats = verdict.stats or self.template_stats(verdict)
        if stats.declined < self._skip_after:
            return False
        stats.skipped += 1
        if stats.skipped % (stats.explore_gap or self._explore_every):
            self.bypass["not_admitted"] += 1
            return None
        return True

    def lookup_soon(self, key: bytes, tables, done, arg, verdict: Verdict | None = None,
                    explore: bool = False) -> str | None:
        """Queue a lookup: done(arg, entry or None, token or None) runs once the shared tier answered (a token
        without an entry: a miss whose result may fill the cache; neither: go to Postgres without filling).

        Lookups queued while the event loop runs the current callbacks share one call to the shared tier, sent
        once they have run: every lookup of the batch began before its generations are read, so each sees
        every write acknowledged before it began. A lookup never joins a call already sent. Returns the bypass
        reason instead (counted; `done` is not called) when no lookup can be made now.

        The caller decided the template's admission first (`admission_turn`): `explore` when this lookup explores
        a declined template; the statement's `verdict` carries the statistics the answer updates."""
        reason = self._lookup_refusal(key, tables)
        stats = None
        if reason is None and verdict is not None:
            stats = verdict.stats or self.template_stats(verdict)
        if reason is not None:
            self.bypass[reason] += 1
            return reason
        batch = self._batch
        batch.append((key, tables, done, arg, explore, stats))
        if len(batch) == 1:
            asyncio.get_running_loop().call_soon(self._send_batch)
        return None

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self.batches += 1
            asyncio.get_running_loop().create_task(self._run_batch(batch))

    async def _run_batch(self, batch: list[tuple]) -> None:
        candidates: list = [None] * len(batch)
        try:
            l1_get = self.l1.get
            entry_key = self.store.entry_key
            items = []
            for i, (key, tables, _, _, _, _) in enumerate(batch):
                l1 = candidates[i] = l1_get(key)
                fields = tables.fields
                items.append((tables.db.hash_key if fields else None, fields, entry_key(key),
                              l1.tag if l1 is not None else ""))
            answers = await self.store.lookup_many(items)
        except Exception:  # noqa: BLE001 - a bug here must cost a bypass, never the client's query
            log.exception("cache: lookup failed")
            answers = [(None, None, "error")] * len(batch)
        for (key, tables, done, arg, explore, stats), l1, (tag, value, reason) in zip(batch, candidates, answers):
            try:
                entry, token = self._settle(key, tables, l1, tag, value, reason, explore, stats)
            except Exception:  # noqa: BLE001
                log.exception("cache: lookup failed")
                entry, token = None, None
            try:
                done(arg, entry, token)
            except Exception:  # noqa: BLE001 - one session's trouble must not keep the others waiting
                log.exception("cache: answering a lookup failed")

    def _settle(self, key: bytes, tables, l1: L1Entry | None, tag: str | None, value: bytes | None,
                reason: str | None, explore: bool = False, stats: TemplateStats | None = None
                ) -> tuple[bytes | None, object]:
        """One lookup's answer from the tags and value the shared tier returned. The token: (tag, catalog
        version, whether the lookup explores a template otherwise not looked up: its fill is stored)."""
        if tag is None:
            self.bypass[reason] += 1
            return None, None
        token = (tag, tables.version, explore)
        if explore and stats is not None and (l1 is not None and l1.tag == tag or value is not None):
            stats.explore_gap = 0      # a declined template's exploration hit: the workload may have changed
        if l1 is not None:
            if l1.tag == tag:
                self.hits += 1
                self.hits_l1 += 1
                self.l1.hit(key, l1)
                l1.stats.looked_up(True)
                return l1.payload, token
            self.l1.drop(key)
        if value is not None:
            start = len(tag) + 1
            end = value.find(b"\n", start)
            if end > 0:
                template = value[start:end].decode("utf-8", "replace")
                payload = value[end + 1:]
                stats = self.templates.get(template)
                self.l1.put(key, L1Entry(tag, payload, stats, tuple(tables)))
                self.hits += 1
                stats.looked_up(True)
                return payload, token
        self.misses += 1
        if stats is not None:
            stats.looked_up(False)
        return None, token

    def template_stats(self, verdict: Verdict) -> TemplateStats:
        """The statistics of a cacheable verdict's template (kept on the verdict)."""
        stats = verdict.stats
        if stats is None:
            stats = verdict.stats = self.templates.get(verdict.template or verdict.text, verdict.text)
        return stats

    def _lookup_refusal(self, key: bytes, tables) -> str | None:
        if not key:
            return "volatile_param"
        if not self._started:
            return S.DISABLED
        db = getattr(tables, "db", None)
        if db is None:
            return "not_a_verdict"      # lookup() needs the verdict's own tables object
        if tables.version != self.catalog_version:
            return "catalog_changed"
        if not db.serving:
            return "not_ready"
        if not self.store.serving:
            return self.store.bypass_reason
        return None

    def fill(self, key: bytes, tables, token, payload: bytes, exec_us: int, template: str = "",
             verdict: Verdict | None = None) -> None:
        """Offer a result read from Postgres after lookup() missed; stored in the background if admitted. The
        template's statistics are the verdict's when given, else those of `template`."""
        if token is None or not key:
            return
        try:
            stats = self.template_stats(verdict) if verdict is not None else self.templates.get(template or "")
            self._fill(key, tables, token, payload, exec_us, stats)
        except Exception:  # noqa: BLE001 - a fill that fails is a fill not made
            log.exception("cache: fill failed")
            self.fills_rejected["error"] += 1

    def _fill(self, key: bytes, tables, token, payload: bytes, exec_us: int, stats: TemplateStats) -> None:
        tag, version, explore = token
        if version != self.catalog_version or not self._started:
            self.fills_rejected["catalog_changed"] += 1
            return
        db = getattr(tables, "db", None)
        if db is None or not db.serving or not self.store.serving:
            self.fills_rejected["not_serving"] += 1
            return
        stats.executed(exec_us)
        stats.bytes_sum += len(payload)
        size = len(payload)
        if size > self.cfg.max_entry_bytes:
            self.fills_rejected["too_large"] += 1
            return
        current = self.l1.get(key)
        if current is not None and current.tag == tag:
            self.fills_rejected["in_flight"] += 1    # the same result is stored already (or on its way)
            return
        if self.admission.admit(stats):
            # One admission (an exploring one, often) must not reopen the lookups of a template declined many
            # times: the streak decays by an eighth per admission instead (from its cap, 14 in a row reopen them).
            stats.declined = stats.declined * 7 // 8
        else:
            stats.declined = min(stats.declined + 1, 8 * self._skip_after)
            if not explore:
                self.fills_rejected["not_admitted"] += 1
                return
        if stats.declined < self._skip_after:
            stats.explore_gap = 0      # looked up again: a later decline explores from the start
        elif explore:                  # still declined: explore half as often (each costs a lookup and a store)
            stats.explore_gap = min(2 * (stats.explore_gap or self._explore_every), 16 * self._explore_every)
        if self.store.shared:
            # Bytes stored within the last TTL, in one-second buckets: an estimate of what is still in Redis.
            now = time.monotonic()
            stored = self._stored
            while stored and stored[0][0] <= now:
                self._stored_bytes -= stored.popleft()[1]
            if self._stored_bytes + size > self.cfg.redis_max_bytes:
                self.fills_rejected["full"] += 1
                return
            expiry = int(now + self.cfg.default_ttl) + 1
            if stored and stored[-1][0] == expiry:
                stored[-1][1] += size
            else:
                stored.append([expiry, size])
            self._stored_bytes += size
            value = b"".join((tag.encode(), b"\n", stats.key.replace("\n", " ").encode(), b"\n", payload))
            self.store.store(self.store.entry_key(key), value, self._ttl_ms)
        stats.admitted += 1
        self.fills += 1
        self.fill_bytes += size
        self.l1.put(key, L1Entry(tag, payload, stats, tuple(tables), exec_us))

    # ================================================================ invalidation

    async def invalidate(self, tables) -> bool:
        """Bump these generation keys (FLUSH: everything; CATALOG: verdicts too) before the client hears back.

        True once the shared tier acknowledged; False if it could not be recorded, and then nothing is served
        until the generations are consistent again. Never raises; bounded by redis_timeout."""
        if not tables or not self._started:
            return True
        catalog = CATALOG in tables
        flush = catalog or FLUSH in tables
        if catalog:
            self._catalog_changed(None)
        groups: dict[str, list[str]] = {}
        for t in tables:
            if not t or t[0] == "*":
                continue
            parts = self._elements.get(t)
            if parts is None:
                name, _, field = t.partition("/")
                db = self._dbs.get(name)
                if db is None:
                    continue
                parts = (db.hash_key, field)
            groups.setdefault(parts[0], []).append(parts[1])
        if not groups and not flush:
            return True
        message = CATALOG if catalog else FLUSH if flush else "\n".join(t for t in tables if t and t[0] != "*")
        try:
            ok = await self.store.bump(flush, groups, message)
        except Exception:  # noqa: BLE001 - never raise into the session
            log.exception("cache: invalidation failed")
            ok = False
        if flush:
            self.l1.clear()
            self.flushes += 1
        else:
            self.l1.drop_tables(tables)
        self.invalidations += 1
        self.invalidated_keys += sum(len(f) for f in groups.values())
        if not ok:
            self.invalidation_failures += 1
        return ok

    def _on_message(self, data: bytes) -> None:
        """Another instance invalidated: forget local copies now (lookups would refuse them anyway)."""
        if data[:1] == b"*":
            self.l1.clear()
            if data == CATALOG.encode():
                for db in self._dbs.values():
                    if db.check_now is not None:
                        db.check_now.set()
            return
        self.l1.drop_tables(data.decode("utf-8", "replace").split("\n"))

    def _catalog_changed(self, db: DatabaseState | None) -> None:
        """Forget every verdict and remembered write set before anything else acts on the change."""
        self.catalog_version += 1
        self._verdicts.clear()
        self._shapes.clear()
        self._writes.clear()
        self._write_shapes.clear()
        for d in ([db] if db is not None else self._dbs.values()):
            d.catalog_changes += 1
            d.snapshot_stale = True
            if d.fresh is not None:
                d.fresh.clear()
                d.check_now.set()

    async def _catalog_loop(self, db: DatabaseState) -> None:
        """Load the snapshot; then compare the catalog signature every catalog_check_interval (or when hinted)."""
        import asyncpg
        interval = self.cfg.catalog_check_interval
        while True:
            try:
                await asyncio.wait_for(db.check_now.wait(), interval)
            except asyncio.TimeoutError:
                pass
            db.check_now.clear()
            try:
                await self._refresh_catalog(db)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as e:
                db.last_error = f"catalog: {e}"
                db.drop_connection()
                await asyncio.sleep(min(interval, 1.0))
            except Exception:  # noqa: BLE001
                log.exception("cache: catalog check of %s failed", db.name)
                await asyncio.sleep(interval)

    async def _refresh_catalog(self, db: DatabaseState) -> None:
        timeout = self.cfg.analysis_timeout + 3
        async with db.lock:
            conn = await db.connection(timeout)
            if db.snapshot is not None and not db.snapshot_stale:
                if await asyncio.wait_for(catalog_signature(conn), timeout) == db.snapshot.signature:
                    return
                changed = True
            else:
                changed = False   # first load, or a change already acted on (stale)
            version = self.catalog_version
            snap = await asyncio.wait_for(load_snapshot(conn), timeout)
        if changed:
            log.info("cache: catalog of %s changed; verdicts forgotten, entries flushed", db.name)
            self._catalog_changed(db)
            db.snapshot, db.snapshot_stale = snap, False
            db.fresh.set()
            await self.invalidate((FLUSH,))
            return
        if version != self.catalog_version:
            db.check_now.set()    # another change was acted on meanwhile: load again
            return
        db.snapshot, db.snapshot_stale = snap, False
        db.fresh.set()

    # ================================================================ change feed

    async def _feed_live(self, db: DatabaseState) -> None:
        """A new slot exists: from here on no write is missed. Load the catalog, retire older entries, serve."""
        while db.snapshot is None or db.snapshot_stale:
            db.check_now.set()
            await asyncio.sleep(0.02)
        await self.store.reset_db_epoch(db.hash_key)
        self.l1.clear()
        db.feed_live = True
        log.info("cache: %s served (decoding slot %s)", db.name, db.feed.slot if db.feed else None)

    def _feed_lost(self, db: DatabaseState, error: str) -> None:
        db.feed_live = False
        db.last_error = f"decoding: {error}"
        if not self._stopping:
            log.warning("cache: lost the decoding slot of %s (%s): not served until a new slot exists", db.name, error)
            asyncio.get_running_loop().create_task(self.store.reset_db_epoch(db.hash_key))

    async def _decoded(self, db: DatabaseState, txns: list[DecodedTransaction]) -> None:
        snap = db.snapshot
        elements: list[str] = []
        flush = False
        for t in txns:
            if t.catalog_only:
                db.check_now.set()     # DDL (or ANALYZE, a temp table...): the signature tells which
                continue
            for name in t.tables:
                rel = snap.by_name.get(name) if (snap is not None and name is not None) else None
                if rel is None:
                    flush = True       # a table the snapshot does not know yet
                    break
                elements.append(self._element(db, rel.field))
        if flush:
            elements = [FLUSH]
            db.check_now.set()
        if elements:
            self.decoded_invalidations += 1
            await self.invalidate(tuple(dict.fromkeys(elements)))

    # ================================================================ stats

    def stats(self) -> dict:
        dbs = {}
        lag_last = lag_max = 0.0
        for db in self._dbs.values():
            feed = db.feed.stats() if db.feed is not None else {}
            if feed:
                lag_last = max(lag_last, feed["lag"]["last_seconds"])
                lag_max = max(lag_max, feed["lag"]["max_seconds"])
            dbs[db.name] = {"serving": db.serving, "catalog_loaded": db.snapshot is not None,
                            "catalog_stale": db.snapshot_stale, "catalog_changes": db.catalog_changes,
                            "relations": len(db.snapshot.by_oid) if db.snapshot else 0,
                            "last_error": db.last_error, "decoding": feed}
        return {
            "serving": self.serving, "hits": self.hits, "hits_l1": self.hits_l1, "misses": self.misses,
            "bypass": dict(self.bypass), "uncacheable": dict(self.uncacheable),
            "lookup_batches": self.batches, "fills": self.fills, "fill_bytes": self.fill_bytes, "fills_rejected": dict(self.fills_rejected),
            "l1_bytes": self.l1.bytes, "l1_entries": len(self.l1), "l1_evictions": self.l1.evictions,
            "l1_turned_away": self.l1.turned_away, "write_analyses": self.write_analyses,
            "stored_bytes_estimate": self._stored_bytes,
            "invalidations": self.invalidations, "invalidated_keys": self.invalidated_keys, "flushes": self.flushes,
            "invalidation_failures": self.invalidation_failures, "decoded_invalidations": self.decoded_invalidations,
            "decoding_lag_seconds": lag_last, "decoding_lag_max_seconds": lag_max,
            "verdicts": len(self._verdicts), "probes": self.probes, "probe_errors": self.probe_errors,
            "probe_queue": sum(db.queue.qsize() for db in self._dbs.values() if db.queue is not None),
            "catalog_version": self.catalog_version, "templates": len(self.templates),
            "store": self.store.stats(), "databases": dbs,
        }

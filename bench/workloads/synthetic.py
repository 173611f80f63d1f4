"""A synthetic application workload (Zipfian reads over many templates, writes, analytics, a scheduler) and a labelled anomaly injector.

`setup(dsn, scale)` creates and fills the application's tables. `SyntheticApp(scale, seed).statements(n, start_ts)`
yields `Statement`s on a virtual clock: several applications and clients, reads drawn Zipf-wise from ~40
templates whose cost depends on their parameters (ranges, limits, hot customers), writes at a set fraction,
occasional heavy analytical queries, and one template that a scheduler runs every 10 seconds.
`inject_anomalies(stream, ...)` mixes labelled anomalies into such a stream: slow outliers of a normal template
(its index switched off), huge result scans from an unusual client, new templates from unusual clients,
error bursts, and SQL-injection-shaped statements built from known payload patterns.
Run it with bench.workloads.recorder.Recorder (direct, logging itself) or through a logging pgpilot proxy.
"""
from __future__ import annotations

import bisect
import datetime as dt
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import psycopg

from bench.workloads.recorder import Statement

ANOMALY_CLASSES = ("slow_outlier", "unusual_rows", "new_template", "error_burst", "injection")
SCHEDULED_SQL = "SELECT count(*) FROM orders WHERE status = $1"
SCHEDULER_PERIOD_S = 10.0
_EPOCH_DAY0 = dt.date(2024, 1, 1)  # orders.created_at spans two years from here


def sizes(scale: float) -> dict[str, int]:
    """Row counts at a scale (1.0: 50k customers, 400k orders, 200k events, 5k products)."""
    return {"customers": max(500, int(50_000 * scale)), "products": max(200, int(5_000 * scale)),
            "orders": max(5_000, int(400_000 * scale)), "events": max(2_000, int(200_000 * scale))}


def setup(dsn: str, scale: float = 0.1, seed: float = 0.42) -> dict[str, int]:
    """Create and fill the application tables (customers, products, orders, events); returns row counts."""
    n = sizes(scale)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SELECT setseed({seed})")
        conn.execute("DROP TABLE IF EXISTS events, orders, products, customers CASCADE")
        conn.execute("""CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL,
                        country text NOT NULL, tier int NOT NULL, created_at timestamptz NOT NULL)""")
        conn.execute("""CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, category text NOT NULL,
                        price numeric(10,2) NOT NULL, stock int NOT NULL)""")
        conn.execute("""CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL,
                        product_id int NOT NULL, qty int NOT NULL, amount numeric(12,2) NOT NULL,
                        status text NOT NULL, created_at timestamptz NOT NULL)""")
        conn.execute("""CREATE TABLE events (id bigserial PRIMARY KEY, customer_id int NOT NULL, kind text NOT NULL,
                        payload text NOT NULL, created_at timestamptz NOT NULL)""")
        conn.execute(f"""INSERT INTO customers SELECT i, 'customer ' || i, 'user' || i || '@example.com',
                         (ARRAY['de','fr','us','uk','jp','br','in','es'])[1 + i % 8], 1 + i % 3,
                         timestamptz '2023-01-01' + (i % 700) * interval '1 day'
                         FROM generate_series(1, {n['customers']}) i""")
        conn.execute(f"""INSERT INTO products SELECT i, 'product ' || i,
                         (ARRAY['books','tools','toys','food','garden','music'])[1 + i % 6],
                         round((1 + random() * 499)::numeric, 2), (random() * 1000)::int
                         FROM generate_series(1, {n['products']}) i""")
        # Customers are Zipf-like: low ids order far more often, so a customer's id says how heavy its history is.
        conn.execute(f"""INSERT INTO orders (customer_id, product_id, qty, amount, status, created_at)
                         SELECT 1 + floor({n['customers']} * power(random(), 3))::int,
                                1 + floor(random() * {n['products']})::int, 1 + (random() * 4)::int,
                                round((5 + random() * 495)::numeric, 2),
                                (ARRAY['paid','paid','paid','shipped','shipped','pending','cancelled'])
                                    [1 + floor(random() * 7)::int],
                                timestamptz '{_EPOCH_DAY0}' + random() * interval '730 days'
                         FROM generate_series(1, {n['orders']})""")
        conn.execute(f"""INSERT INTO events (customer_id, kind, payload, created_at)
                         SELECT 1 + floor({n['customers']} * power(random(), 2))::int,
                                (ARRAY['login','view','click','search'])[1 + floor(random() * 4)::int],
                                repeat(md5(random()::text), 3),
                                timestamptz '{_EPOCH_DAY0}' + random() * interval '730 days'
                         FROM generate_series(1, {n['events']})""")
        for ddl in ("CREATE INDEX ON orders (customer_id)", "CREATE INDEX ON orders (created_at)",
                    "CREATE INDEX ON orders (status)", "CREATE INDEX ON events (customer_id)",
                    "CREATE INDEX ON products (category)", "CREATE INDEX ON customers (email)"):
            conn.execute(ddl)
        conn.execute("VACUUM ANALYZE customers, products, orders, events")
    return n


@dataclass
class Template:
    """One statement shape of the application and how it draws its parameters."""

    name: str
    sql: str
    params: Callable[[random.Random], list[str]]
    apps: tuple[str, ...]
    kind: str = "read"         # read | write | heavy | scheduled
    weight: float = 1.0        # relative frequency among the writes
    cost: Callable[[list[str]], tuple[float, float, float]] | None = None  # params -> (us, rows, bytes/row)
    error_rate: float = 0.0    # simulate(): how often it fails (with error_state) in normal operation
    error_state: str = "23505"


def _zipf_index(rng: random.Random, cdf: list[float]) -> int:
    return min(bisect.bisect_left(cdf, rng.random()), len(cdf) - 1)


def _zipf_cdf(n: int, s: float) -> list[float]:
    weights = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(weights)
    out, acc = [], 0.0
    for w in weights:
        acc += w / total
        out.append(acc)
    return out


def _day(offset: float) -> str:
    return (dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=offset)).strftime("%Y-%m-%d")


class SyntheticApp:
    """The application: its templates, applications, clients and the mix that draws from them."""

    APPS = {"web": 4, "api": 3, "worker": 2, "reports": 1}  # application name -> number of client addresses

    def __init__(self, scale: float = 0.1, seed: int = 7, write_fraction: float = 0.04,
                 heavy_fraction: float = 0.004, rate_per_s: float = 20.0, zipf_s: float = 1.1):
        self.n = sizes(scale)
        self.rng = random.Random(seed)
        self.write_fraction = write_fraction
        self.heavy_fraction = heavy_fraction
        self.rate_per_s = rate_per_s
        self.clients = {app: [f"10.0.{i}.{10 + j}" for j in range(k)]
                        for i, (app, k) in enumerate(self.APPS.items(), start=1)}
        self._customer_cdf = _zipf_cdf(min(self.n["customers"], 2000), 0.9)
        self.reads, self.writes, self.heavy = self._templates()
        order = list(range(len(self.reads)))
        random.Random(seed + 1).shuffle(order)
        self.reads = [self.reads[i] for i in order]
        self._read_cdf = _zipf_cdf(len(self.reads), zipf_s)
        self._write_weights = [t.weight for t in self.writes]
        self.scheduled = Template("pending_count", SCHEDULED_SQL, lambda r: ["pending"], ("worker",), "scheduled",
                                  cost=lambda p: (300 + 0.25 * self.n["orders"] / 7, 1, 8))
        self._by_sql = {t.sql: t for t in self.reads + self.writes + self.heavy + [self.scheduled]}
        self._noise = random.Random(seed + 2)

    # -- parameter draws

    def customer(self, r: random.Random) -> str:
        """A customer id, hot customers (low ids, with long order histories) most often."""
        if r.random() < 0.8:
            return str(1 + _zipf_index(r, self._customer_cdf))
        return str(r.randint(1, self.n["customers"]))

    def date_range(self, r: random.Random, max_days: float) -> list[str]:
        width = math.exp(r.uniform(0.0, math.log(max_days)))
        start = r.uniform(0, 730 - width)
        return [_day(start), _day(start + width)]

    def _templates(self) -> tuple[list[Template], list[Template], list[Template]]:
        n = self.n
        nc, no, ne, np_ = n["customers"], n["orders"], n["events"], n["products"]
        cust = self.customer
        prod = lambda r: str(r.randint(1, np_))  # noqa: E731

        # The cost model of simulate(): microseconds, rows and bytes per row, from what the data look like.
        def orders_of(c) -> float:   # orders of a customer (ids drawn as nc * u^3 in setup)
            return max(1.0, no / (3 * nc) * (max(1, int(c)) / nc) ** (-2 / 3))

        def events_of(c) -> float:   # events of a customer (nc * u^2)
            return max(1.0, ne / (2 * nc) * (max(1, int(c)) / nc) ** -0.5)

        def days(a: str, b: str) -> float:
            return max(0.0, (dt.date.fromisoformat(b[:10]) - dt.date.fromisoformat(a[:10])).days)

        reads: list[Template] = []
        for i, cols in enumerate(("id, name", "id, name, email", "name, country", "email, tier",
                                  "id, name, email, country, tier, created_at", "country")):
            width = 18 * (cols.count(",") + 1)
            reads.append(Template(f"customer_by_id_{i}", f"SELECT {cols} FROM customers WHERE id = $1",
                                  lambda r: [cust(r)], ("web", "api"),
                                  cost=lambda p, w=width: (85 + w / 4, 1, w)))
        reads.append(Template("customer_by_email", "SELECT id, name FROM customers WHERE email = $1",
                              lambda r: [f"user{cust(r)}@example.com"], ("web",), cost=lambda p: (110, 1, 30)))
        for i, order in enumerate(("created_at DESC", "amount DESC", "id")):
            reads.append(Template(
                f"orders_of_customer_{i}",
                f"SELECT id, product_id, amount, status, created_at FROM orders WHERE customer_id = $1 "
                f"ORDER BY {order} LIMIT $2",
                lambda r: [cust(r), str(r.choice((5, 10, 20, 50, 100, 500)))], ("web", "api"),
                cost=lambda p: (120 + 2.0 * orders_of(p[0]) + 2.5 * min(int(p[1]), orders_of(p[0])),
                                min(int(p[1]), int(orders_of(p[0]))), 60)))
        reads.append(Template("order_by_id", "SELECT * FROM orders WHERE id = $1",
                              lambda r: [str(r.randint(1, no))], ("api",), cost=lambda p: (95, 1, 80)))
        reads.append(Template("order_count_of_customer",
                              "SELECT count(*), sum(amount) FROM orders WHERE customer_id = $1",
                              lambda r: [cust(r)], ("web", "api"), cost=lambda p: (100 + 1.5 * orders_of(p[0]), 1, 24)))
        for i, cat in enumerate(("books", "tools", "toys")):
            reads.append(Template(
                f"products_in_{cat}",
                f"SELECT id, name, price FROM products WHERE category = '{cat}' AND price BETWEEN $1 AND $2 "
                f"ORDER BY price LIMIT $3",
                lambda r: (lambda lo: [str(lo), str(lo + r.choice((5, 20, 100, 400))),
                                       str(r.choice((10, 50, 200)))])(r.randint(1, 400)), ("web",),
                cost=lambda p: (lambda m: (100 + 1.2 * m + 2 * min(m, int(p[2])), int(min(m, int(p[2]))), 30))(
                    np_ / 6 * (float(p[1]) - float(p[0])) / 500)))
        reads.append(Template("product_by_id", "SELECT * FROM products WHERE id = $1", lambda r: [prod(r)],
                              ("web", "api"), cost=lambda p: (90, 1, 60)))
        reads.append(Template("product_stock", "SELECT stock FROM products WHERE id = $1", lambda r: [prod(r)],
                              ("api", "worker"), cost=lambda p: (85, 1, 8)))
        reads.append(Template("categories", "SELECT DISTINCT category FROM products ORDER BY 1", lambda r: [],
                              ("web",), cost=lambda p: (150 + 0.3 * np_, 6, 10)))
        reads.append(Template("top_products", "SELECT id, name, price FROM products ORDER BY price DESC LIMIT 10",
                              lambda r: [], ("web",), cost=lambda p: (120 + 0.2 * np_, 10, 30)))
        for i, kind in enumerate(("login", "view", "click")):
            reads.append(Template(
                f"events_{kind}",
                f"SELECT id, kind, created_at FROM events WHERE customer_id = $1 AND kind = '{kind}' "
                f"ORDER BY created_at DESC LIMIT $2",
                lambda r: [cust(r), str(r.choice((5, 20, 100)))], ("web", "api"),
                cost=lambda p: (110 + 2.0 * events_of(p[0]) + 2 * min(int(p[1]), events_of(p[0]) / 4),
                                int(min(int(p[1]), events_of(p[0]) / 4)), 30)))
        reads.append(Template("orders_with_customer",
                              "SELECT o.id, o.amount, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
                              "WHERE o.customer_id = $1 ORDER BY o.created_at DESC LIMIT $2",
                              lambda r: [cust(r), str(r.choice((5, 20, 100)))], ("web", "api"),
                              cost=lambda p: (150 + 2.4 * orders_of(p[0]) + 3 * min(int(p[1]), orders_of(p[0])),
                                              int(min(int(p[1]), orders_of(p[0]))), 40)))
        reads.append(Template("orders_with_product",
                              "SELECT o.id, p.name, o.qty FROM orders o JOIN products p ON p.id = o.product_id "
                              "WHERE o.id = $1", lambda r: [str(r.randint(1, no))], ("api",),
                              cost=lambda p: (130, 1, 30)))
        for i, status in enumerate(("paid", "shipped", "cancelled")):
            reads.append(Template(
                f"orders_in_range_{status}",
                f"SELECT count(*), sum(amount) FROM orders WHERE status = '{status}' "
                f"AND created_at >= $1 AND created_at < $2",
                lambda r: self.date_range(r, 120), ("api", "reports"),
                cost=lambda p: (150 + 0.8 * no * days(p[0], p[1]) / 730, 1, 24)))
        reads.append(Template("recent_orders_page",
                              "SELECT id, customer_id, amount FROM orders WHERE created_at >= $1 "
                              "ORDER BY created_at LIMIT $2",
                              lambda r: [self.date_range(r, 10)[0], str(r.choice((10, 50, 200)))], ("web",),
                              cost=lambda p: (lambda m: (110 + 2.0 * m, int(m), 30))(
                                  min(int(p[1]), no * max(0.0, 730 - days("2024-01-01", p[0])) / 730))))
        reads.append(Template("customers_by_country",
                              "SELECT id, name FROM customers WHERE country = $1 AND tier = $2 ORDER BY id LIMIT $3",
                              lambda r: [r.choice(("de", "fr", "us", "uk")), str(r.randint(1, 3)),
                                         str(r.choice((10, 100, 1000)))], ("web", "api"),
                              cost=lambda p: (150 + 0.3 * nc / 8 + 2 * min(int(p[2]), nc / 24),
                                              int(min(int(p[2]), nc / 24)), 30)))
        reads.append(Template("events_count",
                              "SELECT kind, count(*) FROM events WHERE customer_id = $1 GROUP BY kind",
                              lambda r: [cust(r)], ("api",), cost=lambda p: (120 + 1.5 * events_of(p[0]), 4, 16)))
        for i in range(6):  # report widgets: one shape each, differing in the columns they show
            cols = ("count(*)", "sum(amount)", "avg(amount)", "max(amount)", "min(qty)", "sum(qty)")[: i + 1]
            reads.append(Template(f"widget_{i}", f"SELECT {', '.join(cols)} FROM orders WHERE customer_id = $1",
                                  lambda r: [cust(r)], ("web",),
                                  cost=lambda p, k=i: (100 + (1.5 + 0.1 * k) * orders_of(p[0]), 1, 12 * (k + 1))))
        writes = [
            Template("insert_order", "INSERT INTO orders (customer_id, product_id, qty, amount, status, created_at) "
                     "VALUES ($1, $2, $3, $4, 'pending', now())",
                     lambda r: [cust(r), prod(r), str(r.randint(1, 5)), f"{r.uniform(5, 500):.2f}"],
                     ("api", "web"), "write", 0.35, cost=lambda p: (180, 1, 0)),
            Template("ship_order", "UPDATE orders SET status = 'shipped' WHERE id = $1",
                     lambda r: [str(r.randint(1, no))], ("worker",), "write", 0.1, cost=lambda p: (140, 1, 0)),
            Template("update_email", "UPDATE customers SET email = $1 WHERE id = $2",
                     lambda r: (lambda c: [f"user{c}@example.com", c])(cust(r)), ("web",), "write", 0.08,
                     cost=lambda p: (150, 1, 0)),
            Template("insert_event", "INSERT INTO events (customer_id, kind, payload, created_at) "
                     "VALUES ($1, $2, $3, now())",
                     lambda r: [cust(r), r.choice(("login", "view", "click", "search")), "x" * 40],
                     ("web", "api"), "write", 0.45, cost=lambda p: (160, 1, 0)),
            # sign-ups racing on an id: the background of ordinary errors every application has
            Template("register_customer", "INSERT INTO customers (id, name, email, country, tier, created_at) "
                     "VALUES ($1, $2, $3, 'de', 1, now())",
                     lambda r: (lambda c: [c, f"customer {c}", f"user{c}@example.com"])(str(r.randint(1, 2 * nc))),
                     ("web",), "write", 0.03, cost=lambda p: (170, 1, 0), error_rate=0.5),
            Template("restock", "UPDATE products SET stock = stock + $1 WHERE id = $2",
                     lambda r: [str(r.randint(1, 50)), prod(r)], ("worker",), "write", 0.02,
                     cost=lambda p: (130, 1, 0)),
        ]
        heavy = [
            Template("revenue_by_country",
                     "SELECT c.country, date_trunc('month', o.created_at) AS month, sum(o.amount), count(*) "
                     "FROM orders o JOIN customers c ON c.id = o.customer_id "
                     "WHERE o.created_at >= $1 AND o.created_at < $2 GROUP BY 1, 2 ORDER BY 1, 2",
                     lambda r: self.date_range(r, 730), ("reports",), "heavy",
                     cost=lambda p: (lambda d: (4000 + 0.05 * nc + 4.0 * no * d / 730, 8 * max(1, d / 30), 40))(
                         days(p[0], p[1]))),
            Template("top_customers",
                     "SELECT o.customer_id, sum(o.amount) AS total FROM orders o WHERE o.created_at >= $1 "
                     "AND o.created_at < $2 GROUP BY 1 ORDER BY total DESC LIMIT 20",
                     lambda r: self.date_range(r, 730), ("reports",), "heavy",
                     cost=lambda p: (3000 + 2.5 * no * days(p[0], p[1]) / 730, 20, 20)),
            Template("category_sales",
                     "SELECT p.category, count(*), sum(o.amount), avg(o.qty) FROM orders o "
                     "JOIN products p ON p.id = o.product_id WHERE o.created_at >= $1 AND o.created_at < $2 "
                     "GROUP BY 1 ORDER BY 3 DESC", lambda r: self.date_range(r, 730), ("reports",), "heavy",
                     cost=lambda p: (3500 + 3.0 * no * days(p[0], p[1]) / 730, 6, 40)),
            Template("event_funnel",
                     "SELECT e.kind, c.tier, count(DISTINCT e.customer_id) FROM events e "
                     "JOIN customers c ON c.id = e.customer_id WHERE e.created_at >= $1 AND e.created_at < $2 "
                     "GROUP BY 1, 2", lambda r: self.date_range(r, 730), ("reports",), "heavy",
                     cost=lambda p: (5000 + 5.0 * ne * days(p[0], p[1]) / 730, 12, 30)),
        ]
        return reads, writes, heavy

    def _statement(self, t: Template, ts: float, r: random.Random) -> Statement:
        app = r.choice(t.apps)
        return Statement(t.sql, t.params(r), ts=ts, app=app, client_addr=r.choice(self.clients[app]))

    def rate_at(self, ts: float) -> float:
        """Arrivals per second at a moment: a daily curve, busiest in the afternoon (UTC)."""
        hour = (ts % 86400.0) / 3600.0
        return self.rate_per_s * (0.35 + 0.65 * math.exp(-((hour - 15.0) / 5.0) ** 2))

    def statements(self, n: int, start_ts: float) -> Iterator[Statement]:
        """n statements on a virtual clock from start_ts, the scheduled template included every 10 s."""
        r = self.rng
        ts = start_ts
        next_scheduled = start_ts + SCHEDULER_PERIOD_S
        for _ in range(n):
            ts += r.expovariate(self.rate_at(ts))
            if ts >= next_scheduled:
                yield self._statement(self.scheduled, next_scheduled + r.uniform(0, 0.05), r)
                next_scheduled += SCHEDULER_PERIOD_S
                continue
            u = r.random()
            if u < self.heavy_fraction:
                t = r.choice(self.heavy)
            elif u < self.heavy_fraction + self.write_fraction:
                t = r.choices(self.writes, weights=self._write_weights)[0]
            else:
                t = self.reads[_zipf_index(r, self._read_cdf)]
            yield self._statement(t, ts, r)

    def simulate(self, st: Statement, part: int, text: str) -> tuple[int, int | None, int, str | None]:
        """(duration_us, rows, bytes_out, sqlstate) that executing one statement would give, by the cost model.

        Times get log-normal noise and, now and then, a spike (a busy machine), so a log made this way is as
        noisy as a real one without depending on the machine that makes it.
        """
        r = self._noise
        t = self._by_sql.get(st.sql) if st.params is not None else None
        sqlstate = None
        if t is not None and t.cost is not None:
            us, rows, width = t.cost(st.params)
            if st.settings:  # its index switched off: a full scan of the table it reads
                us += 2000 + 1.2 * (self.n["events"] if " events " in t.sql else self.n["orders"])
            if t.error_rate and r.random() < t.error_rate:
                sqlstate = t.error_state
        else:
            us, rows, width, sqlstate = self._untemplated(text.lower())
        us *= math.exp(r.gauss(0.0, 0.2))
        if r.random() < 0.005:
            us *= r.uniform(2.0, 8.0)
        if sqlstate is not None:
            return int(max(20, us)), None, 90, sqlstate
        rows = int(rows)
        return int(max(20, us)), rows, int(rows * (width + 11) + 40 if rows else 20), None

    def _untemplated(self, sql: str) -> tuple[float, float, float, str | None]:
        n = self.n
        for needle, state in (("customer_accounts", "42P01"), ("drop table", "42P01"), ("passwd", "42703"),
                              ("1/0", "22012"), ("= 'abc'", "22P02"), ("insert into customers", "23505")):
            if needle in sql:
                return 70.0, 0, 0, state
        if "pg_sleep(" in sql:
            m = re.search(r"pg_sleep\(([\d.]+)\)", sql)
            return (float(m.group(1)) * 1e6 if m else 0) + 120, 1, 8, None
        table = n["products"] if "from products" in sql else n["customers"]
        if re.search(r"\bor\b\s*('?\w*'?)\s*=\s*\1", sql) or "/**/or/**/" in sql:
            return 200 + 1.0 * table, table, 30, None
        if "union select" in sql:
            return 180.0, 2, 30, None
        if "information_schema" in sql or "pg_user" in sql or "pg_shadow" in sql or "current_setting" in sql:
            return 900 + 1500 * self._noise.random(), 20, 40, None
        if "limit 1000" in sql:
            return 4000.0, 1000, 80, None
        if "like" in sql:
            return 200 + 0.5 * n["customers"], 500, 30, None
        if "join orders" in sql:
            return 300 + 2.0 * n["orders"], 1, 8, None
        if "from events" in sql:
            return 500 + 1.5 * n["events"], n["events"], 110, None
        return 150.0, 1, 20, None

    def template_names(self) -> dict[str, str]:
        """SQL text -> template name, for reports."""
        return {t.sql: t.name for t in self.reads + self.writes + self.heavy + [self.scheduled]}


# ---------------------------------------------------------------------------------------------
# Anomalies

INJECTION_PAYLOADS = (
    # (template with one {p} slot, payload): classic shapes from public SQL-injection cheat sheets
    ("SELECT id, name FROM customers WHERE email = '{p}'", "' OR 'a'='a"),
    ("SELECT id, name FROM customers WHERE email = '{p}'", "x' OR '1'='1' -- "),
    ("SELECT id, name FROM customers WHERE id = {p}", "1 OR 1=1"),
    ("SELECT id, name FROM customers WHERE id = {p}", "1/**/OR/**/1=1"),
    ("SELECT id, name FROM customers WHERE id = {p}", "-1 UNION SELECT NULL, NULL"),
    ("SELECT id, name FROM customers WHERE id = {p}", "-1 UNION SELECT 1, version()"),
    ("SELECT id, name FROM customers WHERE id = {p}", "1; DROP TABLE customers_archive --"),
    ("SELECT id, name FROM customers WHERE id = {p}", "1; SELECT pg_sleep(0.01) --"),
    ("SELECT * FROM products WHERE category = '{p}'", "books' UNION SELECT NULL, usename, NULL, NULL, NULL "
                                                     "FROM pg_user --"),
    ("SELECT * FROM products WHERE category = '{p}'", "toys' AND 1=1 --"),
    ("SELECT id, name FROM customers WHERE name = '{p}'", "admin'--"),
    ("SELECT id, name FROM customers WHERE id = {p}", "1 AND (SELECT count(*) FROM pg_shadow) > 0"),
)
NEW_TEMPLATE_PROBES = (
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    "SELECT usename, usesuper FROM pg_user",
    "SELECT * FROM customers ORDER BY created_at DESC LIMIT 1000",
    "SELECT email FROM customers WHERE email LIKE '%@example.com' LIMIT 500",
    "SELECT current_setting('server_version')",
    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'customers'",
    "SELECT count(*) FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.tier = 3",
)
ERROR_STATEMENTS = (
    "SELECT * FROM customer_accounts WHERE id = 1",
    "SELECT passwd FROM customers WHERE id = 1",
    "SELECT 1/0",
    "SELECT * FROM orders WHERE id = 'abc'",
    "INSERT INTO customers (id, name, email, country, tier, created_at) VALUES (1, 'x', 'x', 'x', 1, now())",
)
UNUSUAL_APPS = ("psql", "", "DBeaver 23.1", "sqlmap/1.7")


def inject_anomalies(stream: Iterable[Statement], app: SyntheticApp, *, every: int = 150, seed: int = 11,
                     classes: tuple[str, ...] = ANOMALY_CLASSES) -> Iterator[Statement]:
    """The stream with a labelled anomaly (or a labelled burst) after about every `every` statements."""
    r = random.Random(seed)
    slow_templates = [t for t in app.reads if "customer_id = $1" in t.sql and "LIMIT" in t.sql]
    countdown = r.randint(every // 2, every)
    k = 0
    for st in stream:
        yield st
        countdown -= 1
        if countdown > 0:
            continue
        countdown = r.randint(every // 2, 3 * every // 2)
        cls = classes[k % len(classes)]
        k += 1
        ts = (st.ts or 0.0) + 0.001
        yield from _anomaly(cls, ts, app, r, slow_templates)


def _unusual_client(r: random.Random) -> tuple[str, str]:
    return r.choice(UNUSUAL_APPS), f"203.0.113.{r.randint(2, 250)}"


def _anomaly(cls: str, ts: float, app: SyntheticApp, r: random.Random, slow_templates) -> Iterator[Statement]:
    if cls == "slow_outlier":
        # the same statement, but its index is unusable: the plan regresses to a full scan
        t = r.choice(slow_templates)
        a = r.choice(t.apps)
        yield Statement(t.sql, t.params(r), ts=ts, app=a, client_addr=r.choice(app.clients[a]), label=cls,
                        settings={"enable_indexscan": "off", "enable_bitmapscan": "off"})
    elif cls == "unusual_rows":
        a, addr = _unusual_client(r)
        if r.random() < 0.7:  # a normal paging template asked for everything
            yield Statement("SELECT id, customer_id, amount FROM orders WHERE created_at >= $1 "
                            "ORDER BY created_at LIMIT $2", [r.choice(("2023-01-01", "2023-06-30", "2024-01-01")),
                                                             "1000000"], ts=ts, app=a, client_addr=addr, label=cls)
        else:
            yield Statement("SELECT * FROM events WHERE created_at >= $1", ["2020-01-01"], ts=ts, app=a,
                            client_addr=addr, label=cls)
    elif cls == "new_template":
        a, addr = _unusual_client(r)
        yield Statement(r.choice(NEW_TEMPLATE_PROBES), None, ts=ts, app=a, client_addr=addr, label=cls)
    elif cls == "error_burst":
        a = r.choice(("api", "web"))
        addr = r.choice(app.clients[a])
        for i in range(r.randint(5, 8)):
            yield Statement(r.choice(ERROR_STATEMENTS), None, ts=ts + 0.2 * i, app=a, client_addr=addr, label=cls)
    elif cls == "injection":
        template, payload = r.choice(INJECTION_PAYLOADS)
        a = r.choice(("web", "api"))
        yield Statement(template.format(p=payload), None, ts=ts, app=a, client_addr=r.choice(app.clients[a]),
                        label=cls)
    else:
        raise ValueError(f"unknown anomaly class {cls!r}")

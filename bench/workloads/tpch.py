"""TPC-H for PostgreSQL 15: a data loader (tpchgen-cli + COPY, primary keys only) and the 22 query templates.

`load_tpch(dsn, scale)` creates the eight tables in the database's default schema and fills them.
`TEMPLATES[n](rng, scale=...)` returns the text of query n with parameters drawn as the TPC-H
specification (clause 2.4) substitutes them; `rng` is a `random.Random`. Date arithmetic is done here, so
each query carries plain date literals (`'1995-03-15'::date`) that any normalizer can turn into parameters.
Q15's view is written as a CTE so every template is a single read-only statement.
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from random import Random
from typing import Callable

log = logging.getLogger(__name__)

TABLES = ("region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem")

SCHEMA_SQL = {
    "region": """CREATE TABLE region (
        r_regionkey integer NOT NULL, r_name char(25) NOT NULL, r_comment varchar(152),
        PRIMARY KEY (r_regionkey))""",
    "nation": """CREATE TABLE nation (
        n_nationkey integer NOT NULL, n_name char(25) NOT NULL, n_regionkey integer NOT NULL,
        n_comment varchar(152), PRIMARY KEY (n_nationkey))""",
    "supplier": """CREATE TABLE supplier (
        s_suppkey integer NOT NULL, s_name char(25) NOT NULL, s_address varchar(40) NOT NULL,
        s_nationkey integer NOT NULL, s_phone char(15) NOT NULL, s_acctbal numeric(15,2) NOT NULL,
        s_comment varchar(101) NOT NULL, PRIMARY KEY (s_suppkey))""",
    "customer": """CREATE TABLE customer (
        c_custkey integer NOT NULL, c_name varchar(25) NOT NULL, c_address varchar(40) NOT NULL,
        c_nationkey integer NOT NULL, c_phone char(15) NOT NULL, c_acctbal numeric(15,2) NOT NULL,
        c_mktsegment char(10) NOT NULL, c_comment varchar(117) NOT NULL, PRIMARY KEY (c_custkey))""",
    "part": """CREATE TABLE part (
        p_partkey integer NOT NULL, p_name varchar(55) NOT NULL, p_mfgr char(25) NOT NULL,
        p_brand char(10) NOT NULL, p_type varchar(25) NOT NULL, p_size integer NOT NULL,
        p_container char(10) NOT NULL, p_retailprice numeric(15,2) NOT NULL, p_comment varchar(23) NOT NULL,
        PRIMARY KEY (p_partkey))""",
    "partsupp": """CREATE TABLE partsupp (
        ps_partkey integer NOT NULL, ps_suppkey integer NOT NULL, ps_availqty integer NOT NULL,
        ps_supplycost numeric(15,2) NOT NULL, ps_comment varchar(199) NOT NULL,
        PRIMARY KEY (ps_partkey, ps_suppkey))""",
    "orders": """CREATE TABLE orders (
        o_orderkey integer NOT NULL, o_custkey integer NOT NULL, o_orderstatus char(1) NOT NULL,
        o_totalprice numeric(15,2) NOT NULL, o_orderdate date NOT NULL, o_orderpriority char(15) NOT NULL,
        o_clerk char(15) NOT NULL, o_shippriority integer NOT NULL, o_comment varchar(79) NOT NULL,
        PRIMARY KEY (o_orderkey))""",
    "lineitem": """CREATE TABLE lineitem (
        l_orderkey integer NOT NULL, l_partkey integer NOT NULL, l_suppkey integer NOT NULL,
        l_linenumber integer NOT NULL, l_quantity numeric(15,2) NOT NULL,
        l_extendedprice numeric(15,2) NOT NULL, l_discount numeric(15,2) NOT NULL, l_tax numeric(15,2) NOT NULL,
        l_returnflag char(1) NOT NULL, l_linestatus char(1) NOT NULL, l_shipdate date NOT NULL,
        l_commitdate date NOT NULL, l_receiptdate date NOT NULL, l_shipinstruct char(25) NOT NULL,
        l_shipmode char(10) NOT NULL, l_comment varchar(44) NOT NULL,
        PRIMARY KEY (l_orderkey, l_linenumber))""",
}


def tpchgen_binary() -> str:
    """The tpchgen-cli executable: beside the running interpreter first (a venv), then on PATH."""
    beside = Path(sys.executable).parent / "tpchgen-cli"
    if beside.exists():
        return str(beside)
    found = shutil.which("tpchgen-cli")
    if not found:
        raise RuntimeError("tpchgen-cli is not installed (pip install tpchgen-cli)")
    return found


def load_tpch(dsn: str, scale: float = 0.1, drop_existing: bool = True) -> dict[str, int]:
    """Create the TPC-H tables at `dsn`, generate data at `scale` and COPY it in; returns rows per table."""
    import subprocess

    import psycopg

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgpilot-tpch-") as tmp:
        subprocess.run([tpchgen_binary(), "csv", "-s", str(scale), "-o", tmp, "--no-progress", "-q"],
                       check=True, capture_output=True)
        log.info("tpch: generated SF %s in %.1fs", scale, time.monotonic() - started)
        counts: dict[str, int] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in TABLES:
                if drop_existing:
                    conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
                conn.execute(SCHEMA_SQL[table])
                with conn.cursor() as cur:
                    with cur.copy(f"COPY {table} FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
                        with open(Path(tmp) / f"{table}.csv", "rb") as f:
                            while chunk := f.read(1 << 20):
                                copy.write(chunk)
                    counts[table] = cur.rowcount
                log.info("tpch: %s: %d rows", table, counts[table])
            # Visibility map and statistics, so plans (and index-only scans) are costed as in steady state.
            conn.execute("VACUUM ANALYZE " + ", ".join(TABLES))
    log.info("tpch: loaded SF %s in %.1fs", scale, time.monotonic() - started)
    return counts


# Substitution domains of the TPC-H specification, clause 4.2.2.13 and 4.2.3.
REGIONS = ("AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST")
NATIONS = {  # name -> region
    "ALGERIA": "AFRICA", "ARGENTINA": "AMERICA", "BRAZIL": "AMERICA", "CANADA": "AMERICA",
    "EGYPT": "MIDDLE EAST", "ETHIOPIA": "AFRICA", "FRANCE": "EUROPE", "GERMANY": "EUROPE", "INDIA": "ASIA",
    "INDONESIA": "ASIA", "IRAN": "MIDDLE EAST", "IRAQ": "MIDDLE EAST", "JAPAN": "ASIA", "JORDAN": "MIDDLE EAST",
    "KENYA": "AFRICA", "MOROCCO": "AFRICA", "MOZAMBIQUE": "AFRICA", "PERU": "AMERICA", "CHINA": "ASIA",
    "ROMANIA": "EUROPE", "SAUDI ARABIA": "MIDDLE EAST", "VIETNAM": "ASIA", "RUSSIA": "EUROPE",
    "UNITED KINGDOM": "EUROPE", "UNITED STATES": "AMERICA",
}
SEGMENTS = ("AUTOMOBILE", "BUILDING", "FURNITURE", "MACHINERY", "HOUSEHOLD")
TYPE_S1 = ("STANDARD", "SMALL", "MEDIUM", "LARGE", "ECONOMY", "PROMO")
TYPE_S2 = ("ANODIZED", "BURNISHED", "PLATED", "POLISHED", "BRUSHED")
TYPE_S3 = ("TIN", "NICKEL", "BRASS", "STEEL", "COPPER")
CONTAINER_S1 = ("SM", "LG", "MED", "JUMBO", "WRAP")
CONTAINER_S2 = ("CASE", "BOX", "BAG", "JAR", "PKG", "PACK", "CAN", "DRUM")
SHIPMODES = ("REG AIR", "AIR", "RAIL", "SHIP", "TRUCK", "MAIL", "FOB")
COLORS = (
    "almond antique aquamarine azure beige bisque black blanched blue blush brown burlywood burnished "
    "chartreuse chiffon chocolate coral cornflower cornsilk cream cyan dark deep dim dodger drab firebrick "
    "floral forest frosted gainsboro ghost goldenrod green grey honeydew hot indian ivory khaki lace lavender "
    "lawn lemon light lime linen magenta maroon medium metallic midnight mint misty moccasin navajo navy olive "
    "orange orchid pale papaya peach peru pink plum powder puff purple red rose rosy royal saddle salmon sandy "
    "seashell sienna sky slate smoke snow spring steel tan thistle tomato turquoise violet wheat white yellow"
).split()
Q13_WORD1 = ("special", "pending", "unusual", "express")
Q13_WORD2 = ("packages", "requests", "accounts", "deposits")


def _d(day: dt.date) -> str:
    return f"'{day.isoformat()}'::date"


def _add_months(day: dt.date, months: int) -> dt.date:
    m = day.month - 1 + months
    return day.replace(year=day.year + m // 12, month=m % 12 + 1)


def _month(rng: Random, first: tuple[int, int], last: tuple[int, int]) -> dt.date:
    """The first day of a month drawn uniformly between two (year, month) inclusive."""
    span = (last[0] - first[0]) * 12 + last[1] - first[1]
    return _add_months(dt.date(first[0], first[1], 1), rng.randint(0, span))


def _year(rng: Random) -> dt.date:
    return dt.date(rng.randint(1993, 1997), 1, 1)


def _q(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _brand(rng: Random) -> str:
    return f"Brand#{rng.randint(1, 5)}{rng.randint(1, 5)}"


def q1(rng: Random, scale: float = 1.0) -> str:
    cutoff = dt.date(1998, 12, 1) - dt.timedelta(days=rng.randint(60, 120))
    return f"""select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty, sum(l_extendedprice) as sum_base_price,
  sum(l_extendedprice * (1 - l_discount)) as sum_disc_price,
  sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) as sum_charge, avg(l_quantity) as avg_qty,
  avg(l_extendedprice) as avg_price, avg(l_discount) as avg_disc, count(*) as count_order
from lineitem
where l_shipdate <= {_d(cutoff)}
group by l_returnflag, l_linestatus
order by l_returnflag, l_linestatus"""


def q2(rng: Random, scale: float = 1.0) -> str:
    size, ptype, region = rng.randint(1, 50), rng.choice(TYPE_S3), rng.choice(REGIONS)
    return f"""select s_acctbal, s_name, n_name, p_partkey, p_mfgr, s_address, s_phone, s_comment
from part, supplier, partsupp, nation, region
where p_partkey = ps_partkey and s_suppkey = ps_suppkey and p_size = {size} and p_type like {_q('%' + ptype)}
  and s_nationkey = n_nationkey and n_regionkey = r_regionkey and r_name = {_q(region)}
  and ps_supplycost = (
    select min(ps_supplycost) from partsupp, supplier, nation, region
    where p_partkey = ps_partkey and s_suppkey = ps_suppkey and s_nationkey = n_nationkey
      and n_regionkey = r_regionkey and r_name = {_q(region)})
order by s_acctbal desc, n_name, s_name, p_partkey
limit 100"""


def q3(rng: Random, scale: float = 1.0) -> str:
    segment, day = rng.choice(SEGMENTS), dt.date(1995, 3, rng.randint(1, 31))
    return f"""select l_orderkey, sum(l_extendedprice * (1 - l_discount)) as revenue, o_orderdate, o_shippriority
from customer, orders, lineitem
where c_mktsegment = {_q(segment)} and c_custkey = o_custkey and l_orderkey = o_orderkey
  and o_orderdate < {_d(day)} and l_shipdate > {_d(day)}
group by l_orderkey, o_orderdate, o_shippriority
order by revenue desc, o_orderdate
limit 10"""


def q4(rng: Random, scale: float = 1.0) -> str:
    start = _month(rng, (1993, 1), (1997, 10))
    return f"""select o_orderpriority, count(*) as order_count
from orders
where o_orderdate >= {_d(start)} and o_orderdate < {_d(_add_months(start, 3))}
  and exists (select * from lineitem where l_orderkey = o_orderkey and l_commitdate < l_receiptdate)
group by o_orderpriority
order by o_orderpriority"""


def q5(rng: Random, scale: float = 1.0) -> str:
    region, start = rng.choice(REGIONS), _year(rng)
    return f"""select n_name, sum(l_extendedprice * (1 - l_discount)) as revenue
from customer, orders, lineitem, supplier, nation, region
where c_custkey = o_custkey and l_orderkey = o_orderkey and l_suppkey = s_suppkey
  and c_nationkey = s_nationkey and s_nationkey = n_nationkey and n_regionkey = r_regionkey
  and r_name = {_q(region)} and o_orderdate >= {_d(start)} and o_orderdate < {_d(_add_months(start, 12))}
group by n_name
order by revenue desc"""


def q6(rng: Random, scale: float = 1.0) -> str:
    start, discount, quantity = _year(rng), rng.randint(2, 9) / 100, rng.randint(24, 25)
    return f"""select sum(l_extendedprice * l_discount) as revenue
from lineitem
where l_shipdate >= {_d(start)} and l_shipdate < {_d(_add_months(start, 12))}
  and l_discount between {discount - 0.01:.2f} and {discount + 0.01:.2f} and l_quantity < {quantity}"""


def q7(rng: Random, scale: float = 1.0) -> str:
    nation1, nation2 = rng.sample(sorted(NATIONS), 2)
    return f"""select supp_nation, cust_nation, l_year, sum(volume) as revenue
from (
  select n1.n_name as supp_nation, n2.n_name as cust_nation, extract(year from l_shipdate) as l_year,
    l_extendedprice * (1 - l_discount) as volume
  from supplier, lineitem, orders, customer, nation n1, nation n2
  where s_suppkey = l_suppkey and o_orderkey = l_orderkey and c_custkey = o_custkey
    and s_nationkey = n1.n_nationkey and c_nationkey = n2.n_nationkey
    and ((n1.n_name = {_q(nation1)} and n2.n_name = {_q(nation2)})
      or (n1.n_name = {_q(nation2)} and n2.n_name = {_q(nation1)}))
    and l_shipdate between '1995-01-01'::date and '1996-12-31'::date
) as shipping
group by supp_nation, cust_nation, l_year
order by supp_nation, cust_nation, l_year"""


def q8(rng: Random, scale: float = 1.0) -> str:
    nation = rng.choice(sorted(NATIONS))
    region = NATIONS[nation]
    ptype = f"{rng.choice(TYPE_S1)} {rng.choice(TYPE_S2)} {rng.choice(TYPE_S3)}"
    return f"""select o_year, sum(case when nation = {_q(nation)} then volume else 0 end) / sum(volume) as mkt_share
from (
  select extract(year from o_orderdate) as o_year, l_extendedprice * (1 - l_discount) as volume,
    n2.n_name as nation
  from part, supplier, lineitem, orders, customer, nation n1, nation n2, region
  where p_partkey = l_partkey and s_suppkey = l_suppkey and l_orderkey = o_orderkey and o_custkey = c_custkey
    and c_nationkey = n1.n_nationkey and n1.n_regionkey = r_regionkey and r_name = {_q(region)}
    and s_nationkey = n2.n_nationkey and o_orderdate between '1995-01-01'::date and '1996-12-31'::date
    and p_type = {_q(ptype)}
) as all_nations
group by o_year
order by o_year"""


def q9(rng: Random, scale: float = 1.0) -> str:
    color = rng.choice(COLORS)
    return f"""select nation, o_year, sum(amount) as sum_profit
from (
  select n_name as nation, extract(year from o_orderdate) as o_year,
    l_extendedprice * (1 - l_discount) - ps_supplycost * l_quantity as amount
  from part, supplier, lineitem, partsupp, orders, nation
  where s_suppkey = l_suppkey and ps_suppkey = l_suppkey and ps_partkey = l_partkey and p_partkey = l_partkey
    and o_orderkey = l_orderkey and s_nationkey = n_nationkey and p_name like {_q('%' + color + '%')}
) as profit
group by nation, o_year
order by nation, o_year desc"""


def q10(rng: Random, scale: float = 1.0) -> str:
    start = _month(rng, (1993, 2), (1995, 1))
    return f"""select c_custkey, c_name, sum(l_extendedprice * (1 - l_discount)) as revenue, c_acctbal, n_name,
  c_address, c_phone, c_comment
from customer, orders, lineitem, nation
where c_custkey = o_custkey and l_orderkey = o_orderkey and o_orderdate >= {_d(start)}
  and o_orderdate < {_d(_add_months(start, 3))} and l_returnflag = 'R' and c_nationkey = n_nationkey
group by c_custkey, c_name, c_acctbal, c_phone, n_name, c_address, c_comment
order by revenue desc
limit 20"""


def q11(rng: Random, scale: float = 1.0) -> str:
    nation, fraction = rng.choice(sorted(NATIONS)), 0.0001 / scale
    return f"""select ps_partkey, sum(ps_supplycost * ps_availqty) as value
from partsupp, supplier, nation
where ps_suppkey = s_suppkey and s_nationkey = n_nationkey and n_name = {_q(nation)}
group by ps_partkey
having sum(ps_supplycost * ps_availqty) > (
  select sum(ps_supplycost * ps_availqty) * {fraction:.10f}
  from partsupp, supplier, nation
  where ps_suppkey = s_suppkey and s_nationkey = n_nationkey and n_name = {_q(nation)})
order by value desc"""


def q12(rng: Random, scale: float = 1.0) -> str:
    mode1, mode2 = rng.sample(SHIPMODES, 2)
    start = _year(rng)
    return f"""select l_shipmode,
  sum(case when o_orderpriority = '1-URGENT' or o_orderpriority = '2-HIGH' then 1 else 0 end) as high_line_count,
  sum(case when o_orderpriority <> '1-URGENT' and o_orderpriority <> '2-HIGH' then 1 else 0 end) as low_line_count
from orders, lineitem
where o_orderkey = l_orderkey and l_shipmode in ({_q(mode1)}, {_q(mode2)}) and l_commitdate < l_receiptdate
  and l_shipdate < l_commitdate and l_receiptdate >= {_d(start)} and l_receiptdate < {_d(_add_months(start, 12))}
group by l_shipmode
order by l_shipmode"""


def q13(rng: Random, scale: float = 1.0) -> str:
    pattern = f"%{rng.choice(Q13_WORD1)}%{rng.choice(Q13_WORD2)}%"
    return f"""select c_count, count(*) as custdist
from (
  select c_custkey, count(o_orderkey) as c_count
  from customer left outer join orders on c_custkey = o_custkey and o_comment not like {_q(pattern)}
  group by c_custkey
) as c_orders
group by c_count
order by custdist desc, c_count desc"""


def q14(rng: Random, scale: float = 1.0) -> str:
    start = _month(rng, (1993, 1), (1997, 12))
    return f"""select 100.00 * sum(case when p_type like 'PROMO%' then l_extendedprice * (1 - l_discount) else 0 end)
  / sum(l_extendedprice * (1 - l_discount)) as promo_revenue
from lineitem, part
where l_partkey = p_partkey and l_shipdate >= {_d(start)} and l_shipdate < {_d(_add_months(start, 1))}"""


def q15(rng: Random, scale: float = 1.0) -> str:
    start = _month(rng, (1993, 1), (1997, 10))
    return f"""with revenue0 as (
  select l_suppkey as supplier_no, sum(l_extendedprice * (1 - l_discount)) as total_revenue
  from lineitem
  where l_shipdate >= {_d(start)} and l_shipdate < {_d(_add_months(start, 3))}
  group by l_suppkey)
select s_suppkey, s_name, s_address, s_phone, total_revenue
from supplier, revenue0
where s_suppkey = supplier_no and total_revenue = (select max(total_revenue) from revenue0)
order by s_suppkey"""


def q16(rng: Random, scale: float = 1.0) -> str:
    brand = _brand(rng)
    ptype = f"{rng.choice(TYPE_S1)} {rng.choice(TYPE_S2)}"
    sizes = ", ".join(str(s) for s in rng.sample(range(1, 51), 8))
    return f"""select p_brand, p_type, p_size, count(distinct ps_suppkey) as supplier_cnt
from partsupp, part
where p_partkey = ps_partkey and p_brand <> {_q(brand)} and p_type not like {_q(ptype + '%')}
  and p_size in ({sizes})
  and ps_suppkey not in (select s_suppkey from supplier where s_comment like '%Customer%Complaints%')
group by p_brand, p_type, p_size
order by supplier_cnt desc, p_brand, p_type, p_size"""


def q17(rng: Random, scale: float = 1.0) -> str:
    brand, container = _brand(rng), f"{rng.choice(CONTAINER_S1)} {rng.choice(CONTAINER_S2)}"
    return f"""select sum(l_extendedprice) / 7.0 as avg_yearly
from lineitem, part
where p_partkey = l_partkey and p_brand = {_q(brand)} and p_container = {_q(container)}
  and l_quantity < (select 0.2 * avg(l_quantity) from lineitem where l_partkey = p_partkey)"""


def q18(rng: Random, scale: float = 1.0) -> str:
    quantity = rng.randint(312, 315)
    return f"""select c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice, sum(l_quantity)
from customer, orders, lineitem
where o_orderkey in (select l_orderkey from lineitem group by l_orderkey having sum(l_quantity) > {quantity})
  and c_custkey = o_custkey and o_orderkey = l_orderkey
group by c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice
order by o_totalprice desc, o_orderdate
limit 100"""


def q19(rng: Random, scale: float = 1.0) -> str:
    q1_, q2_, q3_ = rng.randint(1, 10), rng.randint(10, 20), rng.randint(20, 30)
    b1, b2, b3 = _brand(rng), _brand(rng), _brand(rng)
    return f"""select sum(l_extendedprice * (1 - l_discount)) as revenue
from lineitem, part
where (p_partkey = l_partkey and p_brand = {_q(b1)}
    and p_container in ('SM CASE', 'SM BOX', 'SM PACK', 'SM PKG')
    and l_quantity >= {q1_} and l_quantity <= {q1_ + 10} and p_size between 1 and 5
    and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')
  or (p_partkey = l_partkey and p_brand = {_q(b2)}
    and p_container in ('MED BAG', 'MED BOX', 'MED PKG', 'MED PACK')
    and l_quantity >= {q2_} and l_quantity <= {q2_ + 10} and p_size between 1 and 10
    and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')
  or (p_partkey = l_partkey and p_brand = {_q(b3)}
    and p_container in ('LG CASE', 'LG BOX', 'LG PACK', 'LG PKG')
    and l_quantity >= {q3_} and l_quantity <= {q3_ + 10} and p_size between 1 and 15
    and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')"""


def q20(rng: Random, scale: float = 1.0) -> str:
    color, start, nation = rng.choice(COLORS), _year(rng), rng.choice(sorted(NATIONS))
    return f"""select s_name, s_address
from supplier, nation
where s_suppkey in (
    select ps_suppkey from partsupp
    where ps_partkey in (select p_partkey from part where p_name like {_q(color + '%')})
      and ps_availqty > (
        select 0.5 * sum(l_quantity) from lineitem
        where l_partkey = ps_partkey and l_suppkey = ps_suppkey
          and l_shipdate >= {_d(start)} and l_shipdate < {_d(_add_months(start, 12))}))
  and s_nationkey = n_nationkey and n_name = {_q(nation)}
order by s_name"""


def q21(rng: Random, scale: float = 1.0) -> str:
    nation = rng.choice(sorted(NATIONS))
    return f"""select s_name, count(*) as numwait
from supplier, lineitem l1, orders, nation
where s_suppkey = l1.l_suppkey and o_orderkey = l1.l_orderkey and o_orderstatus = 'F'
  and l1.l_receiptdate > l1.l_commitdate
  and exists (select * from lineitem l2 where l2.l_orderkey = l1.l_orderkey and l2.l_suppkey <> l1.l_suppkey)
  and not exists (select * from lineitem l3 where l3.l_orderkey = l1.l_orderkey
    and l3.l_suppkey <> l1.l_suppkey and l3.l_receiptdate > l3.l_commitdate)
  and s_nationkey = n_nationkey and n_name = {_q(nation)}
group by s_name
order by numwait desc, s_name
limit 100"""


def q22(rng: Random, scale: float = 1.0) -> str:
    codes = ", ".join(_q(str(c)) for c in rng.sample(range(10, 35), 7))
    return f"""select cntrycode, count(*) as numcust, sum(c_acctbal) as totacctbal
from (
  select substring(c_phone from 1 for 2) as cntrycode, c_acctbal
  from customer
  where substring(c_phone from 1 for 2) in ({codes})
    and c_acctbal > (select avg(c_acctbal) from customer
      where c_acctbal > 0.00 and substring(c_phone from 1 for 2) in ({codes}))
    and not exists (select * from orders where o_custkey = c_custkey)
) as custsale
group by cntrycode
order by cntrycode"""


TEMPLATES: dict[int, Callable[..., str]] = {
    1: q1, 2: q2, 3: q3, 4: q4, 5: q5, 6: q6, 7: q7, 8: q8, 9: q9, 10: q10, 11: q11,
    12: q12, 13: q13, 14: q14, 15: q15, 16: q16, 17: q17, 18: q18, 19: q19, 20: q20, 21: q21, 22: q22,
}

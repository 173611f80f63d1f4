"""Query shapes: which table each filter, join, ordering and parameter belongs to (pure logic, no database)."""
from __future__ import annotations

import datetime as dt

from advisors.catalog import Catalog, Column, Table
from advisors.predicates import analyze


def catalog_of(**tables: str) -> Catalog:
    """tables: name -> "col type, col type, ..." (all in schema public)."""
    out = {}
    for oid, (name, spec) in enumerate(tables.items(), start=1000):
        t = Table(oid, "public", name, "r", 1000.0, 10, 81920, 81920)
        for attnum, item in enumerate(spec.split(","), start=1):
            col, typ = item.split(maxsplit=1)
            t.columns[col] = Column(col, typ, attnum, True)
        out[t.qualified] = t
    return Catalog("test", out, ["public"], {}, None, dt.datetime.now(dt.timezone.utc), 150000)


CATALOG = catalog_of(
    orders="id integer, custkey integer, created timestamptz, status text, total numeric",
    customer="id integer, segment text, nation integer",
    part="id integer, brand text, size integer",
    lineitem="orderkey integer, partkey integer, qty numeric, shipped date",
)


def test_filters_belong_to_the_table_that_owns_the_column():
    shape = analyze("SELECT o.id FROM orders o JOIN customer c ON o.custkey = c.id "
                    "WHERE segment = $1 AND o.created >= $2 AND created < $3 ORDER BY o.created LIMIT $4", CATALOG)
    orders, = shape.accesses_of("public.orders")
    customer, = shape.accesses_of("public.customer")
    assert set(orders.joins) == {"custkey"} and set(orders.ranges) == {"created"}
    assert orders.order_by == [("created", False)] and orders.limited
    assert set(customer.equality) == {"segment"} and set(customer.joins) == {"id"}
    assert shape.params[1] == ("public.customer", "segment", "=")
    assert shape.params[2] == ("public.orders", "created", ">=")
    assert shape.params[3] == ("public.orders", "created", "<")


def test_a_correlated_subquery_equality_is_a_join_for_the_inner_table():
    shape = analyze("SELECT p.id FROM part p WHERE p.size = 5 AND EXISTS ("
                    "SELECT 1 FROM lineitem l WHERE l.partkey = p.id AND l.qty > 3)", CATALOG)
    lineitem, = shape.accesses_of("public.lineitem")
    part, = shape.accesses_of("public.part")
    assert set(lineitem.joins) == {"partkey"} and set(lineitem.ranges) == {"qty"}
    assert set(part.equality) == {"size"} and set(part.joins) == {"id"}


def test_conditions_shared_by_every_branch_of_an_or_still_filter():
    shape = analyze("SELECT 1 FROM lineitem, part WHERE (partkey = part.id AND brand = $1 AND qty < 5) "
                    "OR (partkey = part.id AND brand = $2 AND size > 3)", CATALOG)
    lineitem, = shape.accesses_of("public.lineitem")
    part, = shape.accesses_of("public.part")
    assert set(lineitem.joins) == {"partkey"} and not lineitem.ranges
    assert set(part.equality) == {"brand"} and not part.ranges
    assert {"qty"} <= lineitem.referenced and {"size"} <= part.referenced


def test_cte_and_derived_table_names_are_not_tables():
    shape = analyze("WITH recent AS (SELECT custkey FROM orders WHERE status = 'open') "
                    "SELECT * FROM recent r JOIN (SELECT id FROM customer WHERE nation = 3) c ON c.id = r.custkey",
                    CATALOG)
    assert sorted(a.name for a in shape.accesses) == ["public.customer", "public.orders"]
    assert not shape.unresolved
    orders, = shape.accesses_of("public.orders")
    assert orders.equality["status"][0].text == "open"


def test_an_update_names_its_target_and_the_columns_it_sets():
    shape = analyze("UPDATE orders SET status = $1, total = total + 1 WHERE id = $2", CATALOG)
    assert shape.kind == "update" and shape.written_table.name == "orders"
    assert shape.updated_columns == {"status", "total"}
    orders, = shape.accesses_of("public.orders")
    assert set(orders.equality) == {"id"}


def test_a_parameter_compared_outside_a_filter_still_gets_its_column_type():
    shape = analyze("SELECT sum(CASE WHEN status = $1 THEN $2 ELSE 0 END) FROM orders", CATALOG)
    assert shape.params[1][:2] == ("public.orders", "status")
    assert 2 not in shape.params

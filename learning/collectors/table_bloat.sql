-- Statistical heap bloat: the share of each table's heap holding no live tuple, estimated from the catalog.
-- Live rows need reltuples x (tuple header + average row width, each rounded up to MAXALIGN = 8, plus a 4-byte
-- line pointer) and each page a 24-byte header; the rest of relpages x block_size is dead tuples or free space
-- (the same quantity as pgstattuple's dead_tuple_percent + free_percent). Widths come from pg_stats, so the
-- estimate is as fresh as the table's last ANALYZE; a table with a column lacking statistics gets no estimate.
-- Alignment padding between columns is ignored. Reads only the catalog, so it is cheap on any database size.
WITH widths AS (
    SELECT a.attrelid AS relid,
           count(*) AS columns,
           count(s.attname) AS columns_with_stats,
           coalesce(bool_or(s.null_frac > 0), false) AS has_nulls,
           sum((1 - coalesce(s.null_frac, 0)) * coalesce(s.avg_width, 0)) AS data_width
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname
                        AND s.attname = a.attname AND NOT s.inherited
    WHERE a.attnum > 0 AND NOT a.attisdropped
      AND c.relkind IN ('r', 'm')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
    GROUP BY a.attrelid
),
sizes AS (
    SELECT c.oid AS relid, c.relpages::float8 AS pages, c.reltuples::float8 AS tuples,
           current_setting('block_size')::float8 AS block_size,
           ceil((23 + CASE WHEN w.has_nulls THEN ceil(w.columns / 8.0) ELSE 0 END) / 8.0) * 8
               + ceil(w.data_width / 8.0) * 8 + 4 AS tuple_bytes
    FROM widths w JOIN pg_class c ON c.oid = w.relid
    WHERE w.columns_with_stats = w.columns AND c.relpages > 0 AND c.reltuples >= 0
)
SELECT relid,
       greatest(0, 100 * (1 - (tuples * tuple_bytes + pages * 24) / (pages * block_size)))::float8 AS bloat_percent,
       greatest(0, pages * block_size - tuples * tuple_bytes - pages * 24)::bigint AS bloat_bytes
FROM sizes

-- Statistical heap bloat: the share of each table's heap taken by dead tuples and free space, estimated from the
-- catalog; the same quantity as pgstattuple's dead_tuple_percent + free_percent.
-- Live rows need reltuples x (tuple header + average row width, each rounded up to MAXALIGN = 8, plus a 4-byte
-- line pointer) and each page a 24-byte header; the rest of relpages x block_size is dead tuples or free space,
-- less the line pointers and alignment padding of the n_dead_tup dead tuples, which pgstattuple counts as
-- neither. Widths come from pg_stats, so the estimate is as fresh as the table's last ANALYZE; a table with a
-- column lacking statistics gets no estimate. Padding between columns is ignored. Reads only the catalog and
-- the statistics views, so it is cheap on any database size.
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
tuples AS (
    SELECT relid, columns_with_stats = columns AS complete,
           23 + CASE WHEN has_nulls THEN ceil(columns / 8.0) ELSE 0 END + data_width AS raw_bytes,
           ceil((23 + CASE WHEN has_nulls THEN ceil(columns / 8.0) ELSE 0 END) / 8.0) * 8
               + ceil(data_width / 8.0) * 8 + 4 AS stored_bytes   -- aligned, with its line pointer
    FROM widths
),
sizes AS (
    SELECT c.oid AS relid, c.relpages::float8 AS pages, c.reltuples::float8 AS live,
           coalesce(st.n_dead_tup, 0)::float8 AS dead,
           current_setting('block_size')::float8 AS block_size, t.raw_bytes, t.stored_bytes
    FROM tuples t
    JOIN pg_class c ON c.oid = t.relid
    LEFT JOIN pg_stat_all_tables st ON st.relid = t.relid
    WHERE t.complete AND c.relpages > 0 AND c.reltuples >= 0
),
bloat AS (
    SELECT relid, pages * block_size AS heap_bytes,
           greatest(0, pages * block_size - pages * 24 - live * stored_bytes
                       - dead * (stored_bytes - raw_bytes)) AS bloat_bytes
    FROM sizes
)
SELECT relid, (100 * bloat_bytes / heap_bytes)::float8 AS bloat_percent, bloat_bytes::bigint AS bloat_bytes
FROM bloat

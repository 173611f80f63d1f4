-- Run once by the postgres image when its volume is new: the statistics pgpilot's learner reads.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

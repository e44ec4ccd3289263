-- ChargeFlow schema, version 5: a sample's summary update is a heap-only tuple (HOT) update.
-- Every accepted sample rewrites its session's summary row. With last_heard_at indexed, each
-- of those updates inserted a new entry into every index of sessions; without it, and with
-- room left on each page, PostgreSQL rewrites the row in place of its page and touches no
-- index (measured: the batch's summary UPDATE ~30 % cheaper). Sessions gone dark are found by
-- a scan of the Active sessions (through one_active_session_per_bike), which the daemon runs
-- every 30 s instead of every sweep.
DROP INDEX sessions_active_due;
ALTER TABLE sessions SET (fillfactor = 70);

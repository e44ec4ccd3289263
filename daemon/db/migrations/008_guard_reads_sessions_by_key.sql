-- ChargeFlow schema, version 8: the telemetry guard reads each added sample's session by its
-- primary key, whatever the planner believes about sessions.
--
-- Version 7's anti-join let the planner choose how to find Active sessions. With statistics
-- taken while sessions was nearly empty (a fresh database; no ANALYZE since, as on a server
-- without autovacuum), it chose to read every Active session through the partial index of
-- one_active_session_per_bike, materialize them, and compare each added sample with each of
-- them: a COPY of 600 samples at 10,000 Active sessions took 151 ms instead of about 10, and
-- the plan, cached per connection, stayed so for the connection's life (auto_explain of the
-- lag benchmark: "Nested Loop Anti Join ... Materialize ... Bitmap Heap Scan on sessions,
-- Recheck Cond: state = 'active'", estimated 32 rows). A run was fast or slow by which plan
-- each pooled connection had cached first. A scalar subquery by session_id has one plan at
-- any size: a lookup in sessions_pkey per added sample.
CREATE OR REPLACE FUNCTION chargeflow_guard_telemetry_added() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    stray uuid;
BEGIN
    SELECT a.session_id INTO stray FROM added a
    WHERE (SELECT s.state FROM sessions s WHERE s.session_id = a.session_id)
          IS DISTINCT FROM 'active'
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'session % is not active; telemetry refused', stray
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;

-- The row check (TimescaleDB before 2.18) the same way.
CREATE OR REPLACE FUNCTION chargeflow_guard_telemetry() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := NULLIF(current_setting('chargeflow.telemetry_cutoff', true), '');
BEGIN
    IF TG_OP = 'DELETE' AND cutoff IS NOT NULL AND OLD.emitted_at < cutoff
       AND (SELECT s.state FROM sessions s WHERE s.session_id = OLD.session_id)
           = 'finalized' THEN
        RETURN OLD;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'telemetry is append-only (% refused)', TG_OP
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (SELECT s.state FROM sessions s WHERE s.session_id = NEW.session_id)
       IS DISTINCT FROM 'active' THEN
        RAISE EXCEPTION 'session % is not active; telemetry refused', NEW.session_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;

-- ChargeFlow schema, version 7: a batch's telemetry is checked as a set, once per statement.
--
-- "Only an Active session takes samples" was a row trigger: one plpgsql call and one lookup
-- of sessions per sample, plus the foreign key's own lookup of the same row. At 100,000
-- Active bikes each sample of a batch is a different session, and those two lookups were 32
-- of the 55 us that a sample's row cost PostgreSQL inside the batch's COPY (measured: 850
-- samples of 850 sessions, COPY 46.5 ms with both, 34.6 ms without the foreign key, 20.1 ms
-- with this statement trigger instead of both). The statement trigger reads the rows a
-- statement added (its transition table) and refuses the whole statement when one of them
-- names a session that is not Active, or none: what the foreign key and the row check held
-- between them, with the same error. Sessions are never deleted (chargeflow_guard_session),
-- and now never truncated either, so a stored sample's session stays.
--
-- TimescaleDB reads transition tables on hypertables from 2.18 on; before that the row
-- check stays on a hypertable (chargeflow_install_telemetry_guards decides, and the
-- TimescaleDB step calls it again after it makes telemetry a hypertable).
ALTER TABLE telemetry DROP CONSTRAINT telemetry_session_id_fkey;

CREATE FUNCTION chargeflow_guard_telemetry_added() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    stray uuid;
BEGIN
    SELECT a.session_id INTO stray FROM added a
    WHERE NOT EXISTS (SELECT 1 FROM sessions s
                      WHERE s.session_id = a.session_id AND s.state = 'active')
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'session % is not active; telemetry refused', stray
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION chargeflow_install_telemetry_guards() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    timescale text := (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb');
    hypertable boolean := false;
BEGIN
    IF timescale IS NOT NULL THEN  -- the catalog exists only with the extension
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM _timescaledb_catalog.hypertable'
                ' WHERE table_name = ''telemetry'')' INTO hypertable;
    END IF;
    DROP TRIGGER IF EXISTS telemetry_guard ON telemetry;
    DROP TRIGGER IF EXISTS telemetry_guard_added ON telemetry;
    IF hypertable AND string_to_array(split_part(timescale, '-', 1), '.')::int[] < '{2,18}' THEN
        CREATE TRIGGER telemetry_guard BEFORE INSERT OR UPDATE OR DELETE ON telemetry
            FOR EACH ROW EXECUTE FUNCTION chargeflow_guard_telemetry();
    ELSE
        -- Append-only, but for retention's deletes (chargeflow_guard_telemetry).
        CREATE TRIGGER telemetry_guard BEFORE UPDATE OR DELETE ON telemetry
            FOR EACH ROW EXECUTE FUNCTION chargeflow_guard_telemetry();
        CREATE TRIGGER telemetry_guard_added AFTER INSERT ON telemetry
            REFERENCING NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION chargeflow_guard_telemetry_added();
    END IF;
END $$;

SELECT chargeflow_install_telemetry_guards();

CREATE FUNCTION chargeflow_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% cannot be truncated', TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER sessions_no_truncate BEFORE TRUNCATE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION chargeflow_refuse_truncate();

-- Every batch bumps the version of each bike it takes (INSERT ... ON CONFLICT DO UPDATE):
-- with full pages each bump was a new row version on another page and a new entry in
-- bikes_pkey; with room on each page it is a heap-only update (3 us of the 21 us a bike's
-- lock cost, measured as above). Pages written from now on keep the room.
ALTER TABLE bikes SET (fillfactor = 50);

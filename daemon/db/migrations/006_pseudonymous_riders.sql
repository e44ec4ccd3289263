-- ChargeFlow schema, version 6: riders' personal data can be erased and is kept no longer
-- than the operator says, while finalized sessions and bills stay immutable.
--
-- A ride's session refers to its rider through a pseudonym; `riders` is the one place that
-- maps the pseudonym to the rider id, and erasure deletes that row. The immutable record
-- (sessions, and every bill and analytics figure derived from it) never held the person, so
-- it does not change. deploy/README.md "Personal data" is the map of where else it is kept.

CREATE TABLE riders (
    pseudonym     text        PRIMARY KEY DEFAULT gen_random_uuid()::text,
    rider_id      text        NOT NULL UNIQUE,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

-- Existing rides move over: their party_id becomes the rider's pseudonym. Nothing derived
-- changes (bills and analytics never read the rider; the finalized record renders the same
-- rider id through the mapping while the rider is known).
INSERT INTO riders (rider_id) SELECT DISTINCT party_id FROM sessions WHERE kind = 'ride';
-- (Sessions finalized before version 3 may not have their pricing version yet: the check
-- is set aside for the move and comes back NOT VALID, validated again at start-up.)
ALTER TABLE sessions DISABLE TRIGGER sessions_guard;
ALTER TABLE sessions DROP CONSTRAINT finalized_sessions_name_their_pricing;
UPDATE sessions s SET party_id = r.pseudonym
FROM riders r WHERE s.kind = 'ride' AND s.party_id = r.rider_id;
ALTER TABLE sessions ADD CONSTRAINT finalized_sessions_name_their_pricing
    CHECK (state = 'active' OR pricing_version IS NOT NULL) NOT VALID;
ALTER TABLE sessions ENABLE TRIGGER sessions_guard;

-- Each erasure, as it happened: when, which pseudonym (never the rider id), what it touched.
CREATE TABLE rider_erasures (
    id                  bigserial   PRIMARY KEY,
    erased_at           timestamptz NOT NULL DEFAULT now(),
    pseudonym           text,       -- NULL when the rider had no ride, only kept messages
    sessions            integer     NOT NULL CHECK (sessions >= 0),
    rejections_redacted integer     NOT NULL CHECK (rejections_redacted >= 0),
    outbox_redacted     integer     NOT NULL CHECK (outbox_redacted >= 0)
);
CREATE TRIGGER rider_erasures_append_only BEFORE UPDATE OR DELETE ON rider_erasures
    FOR EACH ROW EXECUTE FUNCTION chargeflow_append_only();

-- A kept rejection stays append-only, with one way through: its raw payload (and, for an
-- erasure, its detail) may be redacted, once marked as such; no row is ever deleted.
ALTER TABLE rejected_messages
    ADD COLUMN payload_redacted text CHECK (payload_redacted IN ('erasure', 'retention'));
CREATE FUNCTION chargeflow_guard_rejection() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.payload_redacted IS NOT NULL
       AND to_jsonb(NEW) - 'payload' - 'payload_redacted' - 'detail'
           = to_jsonb(OLD) - 'payload' - 'payload_redacted' - 'detail'
       AND (NEW.detail = OLD.detail OR NEW.payload_redacted = 'erasure') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'rejected_messages is append-only (% refused; only a redaction of the'
        ' payload is allowed)', TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
DROP TRIGGER rejected_messages_append_only ON rejected_messages;
CREATE TRIGGER rejected_messages_append_only BEFORE UPDATE OR DELETE ON rejected_messages
    FOR EACH ROW EXECUTE FUNCTION chargeflow_guard_rejection();
-- The payloads retention has still to empty, oldest first.
CREATE INDEX rejected_messages_payload_kept ON rejected_messages (received_at)
    WHERE payload_redacted IS DISTINCT FROM 'retention';

-- Telemetry stays append-only, with one way through: the retention job deletes samples of
-- finalized sessions emitted before the cut-off it sets for its own transaction
-- (chargeflow.telemetry_cutoff). On TimescaleDB the retention policy drops whole chunks.
CREATE OR REPLACE FUNCTION chargeflow_guard_telemetry() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := NULLIF(current_setting('chargeflow.telemetry_cutoff', true), '');
BEGIN
    IF TG_OP = 'DELETE' AND cutoff IS NOT NULL AND OLD.emitted_at < cutoff
       AND EXISTS (SELECT 1 FROM sessions
                   WHERE session_id = OLD.session_id AND state = 'finalized') THEN
        RETURN OLD;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'telemetry is append-only (% refused)', TG_OP
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM sessions
                   WHERE session_id = NEW.session_id AND state = 'active') THEN
        RAISE EXCEPTION 'session % is not active; telemetry refused', NEW.session_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
-- What retention finds by time on a plain table: a BRIN index is a few pages for the whole
-- table and costs next to nothing per insert (samples arrive roughly in emission order).
CREATE INDEX telemetry_emitted_brin ON telemetry USING brin (emitted_at);

-- Sessions as the daemon and its readers know them: each with its rider id while the rider
-- is known (NULL once erased). (A view's columns are fixed when it is made: a migration
-- that adds a column to sessions makes this view again.)
CREATE VIEW session_records AS
SELECT s.*, r.rider_id
FROM sessions s LEFT JOIN riders r ON s.kind = 'ride' AND r.pseudonym = s.party_id;

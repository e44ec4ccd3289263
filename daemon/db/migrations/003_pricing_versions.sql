-- ChargeFlow schema, version 3: every pricing version ever used is kept, and a finalized
-- session names the one in force when it was finalized, so that its bill never changes.

CREATE TABLE pricing_versions (
    version       text        PRIMARY KEY,
    content       text        NOT NULL,  -- the price list as canonical JSON
    first_used_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER pricing_versions_append_only BEFORE UPDATE OR DELETE ON pricing_versions
    FOR EACH ROW EXECUTE FUNCTION chargeflow_append_only();

ALTER TABLE sessions ADD COLUMN pricing_version text REFERENCES pricing_versions (version);
-- Checked for every session finalized from now on; sessions finalized before version 3 get
-- their version at the next start-up (when the running price list is recorded), after which
-- the daemon validates the constraint for all rows.
ALTER TABLE sessions ADD CONSTRAINT finalized_sessions_name_their_pricing
    CHECK (state = 'active' OR pricing_version IS NOT NULL) NOT VALID;

-- Finalized sessions stay immutable; the one change allowed is naming the pricing version of
-- a session finalized before version 3, once.
CREATE OR REPLACE FUNCTION chargeflow_guard_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'session % cannot be deleted', OLD.session_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.state = 'finalized' THEN
        IF OLD.pricing_version IS NULL AND NEW.pricing_version IS NOT NULL
           AND to_jsonb(NEW) - 'pricing_version' = to_jsonb(OLD) - 'pricing_version' THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'session % is finalized and immutable', OLD.session_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.session_id, NEW.bike_id, NEW.kind, NEW.party_id, NEW.started_at)
       IS DISTINCT FROM (OLD.session_id, OLD.bike_id, OLD.kind, OLD.party_id, OLD.started_at) THEN
        RAISE EXCEPTION 'session % cannot change its identity', OLD.session_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;

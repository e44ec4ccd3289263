-- ChargeFlow schema, version 1: sessions, telemetry, rejected messages and the outbox.
-- Runs on plain PostgreSQL 15+; the TimescaleDB part (hypertable, compression, retention) is
-- applied separately by migrate.py when the extension is installed.

CREATE TABLE sessions (
    session_id      uuid PRIMARY KEY,
    bike_id         text        NOT NULL CHECK (bike_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    kind            text        NOT NULL CHECK (kind IN ('ride', 'charging')),
    party_id        text        NOT NULL,   -- rider_id of a ride, station_id of a charging session
    state           text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'finalized')),
    started_at      timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    last_heard_at   timestamptz NOT NULL,
    ended_at        timestamptz,            -- the publisher's end (occurred_at)
    last_seq        integer CHECK (last_seq >= 0),
    end_received_at timestamptz,            -- the finalize grace period counts from here
    energy_wh       numeric CHECK (energy_wh >= 0),
    distance_m      numeric CHECK (distance_m >= 0),
    telemetry_count integer CHECK (telemetry_count >= 0),
    missing_samples integer CHECK (missing_samples >= 0),
    end_reason      text CHECK (end_reason IN ('ended', 'timed_out')),
    finalized_at    timestamptz,
    CONSTRAINT finalized_sessions_have_fixed_totals CHECK (
        state = 'active' OR (
            energy_wh IS NOT NULL AND distance_m IS NOT NULL AND telemetry_count IS NOT NULL
            AND missing_samples IS NOT NULL AND end_reason IS NOT NULL
            AND finalized_at IS NOT NULL AND ended_at IS NOT NULL
        )
    ),
    -- A bike has at most one Active session. Deferred to commit so that one transaction may
    -- finalize a bike's session and start its next one in either order.
    CONSTRAINT one_active_session_per_bike EXCLUDE USING btree (bike_id WITH =)
        WHERE (state = 'active') DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX sessions_bike_started ON sessions (bike_id, started_at);
CREATE INDEX sessions_finalized_started ON sessions (started_at) WHERE state = 'finalized';
CREATE INDEX sessions_active_due ON sessions (last_heard_at) WHERE state = 'active';

-- Finalized sessions are immutable; identities never change; sessions are never deleted.
CREATE FUNCTION chargeflow_guard_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'session % cannot be deleted', OLD.session_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.state = 'finalized' THEN
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
CREATE TRIGGER sessions_guard BEFORE UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION chargeflow_guard_session();

CREATE TABLE telemetry (
    telemetry_id uuid        NOT NULL,
    session_id   uuid        NOT NULL REFERENCES sessions (session_id),
    bike_id      text        NOT NULL,
    seq          integer     NOT NULL CHECK (seq >= 1),
    emitted_at   timestamptz NOT NULL,
    energy_wh    numeric     NOT NULL CHECK (energy_wh >= 0),
    distance_m   numeric CHECK (distance_m >= 0),
    soc_pct      numeric CHECK (soc_pct BETWEEN 0 AND 100),
    received_at  timestamptz NOT NULL,
    -- On a hypertable every unique key must include the time column.
    PRIMARY KEY (telemetry_id, emitted_at)
);
CREATE UNIQUE INDEX telemetry_session_seq ON telemetry (session_id, seq, emitted_at);

-- Telemetry is append-only, and only an Active session takes new samples.
CREATE FUNCTION chargeflow_guard_telemetry() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
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
CREATE TRIGGER telemetry_guard BEFORE INSERT OR UPDATE OR DELETE ON telemetry
    FOR EACH ROW EXECUTE FUNCTION chargeflow_guard_telemetry();

CREATE TABLE rejected_messages (
    id             bigserial PRIMARY KEY,
    received_at    timestamptz NOT NULL,
    topic          text        NOT NULL,
    bike_id        text,
    reason         text        NOT NULL,
    detail         text        NOT NULL,
    session_id     uuid,
    telemetry_id   uuid,
    payload        bytea       NOT NULL,  -- capped; payload_size is the size received
    payload_size   integer     NOT NULL,
    payload_sha256 bytea       NOT NULL,
    -- A redelivered rejected message is recorded (and answered) once.
    CONSTRAINT rejected_messages_once UNIQUE (topic, payload_sha256)
);
CREATE INDEX rejected_messages_received ON rejected_messages (received_at);

CREATE FUNCTION chargeflow_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER rejected_messages_append_only BEFORE UPDATE OR DELETE ON rejected_messages
    FOR EACH ROW EXECUTE FUNCTION chargeflow_append_only();

-- Outbound events, written in the transaction that caused them and published from here.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    created_at   timestamptz NOT NULL,
    event        text        NOT NULL CHECK (event IN ('session_finalized', 'billing', 'rejection')),
    topic        text        NOT NULL,
    payload      bytea       NOT NULL,
    published_at timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

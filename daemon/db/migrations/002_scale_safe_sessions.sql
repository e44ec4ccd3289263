-- ChargeFlow schema, version 2: compact session summaries, bikes that serialize writers, and
-- messages that wait (durably) for what they depend on.

-- The Bike aggregate root. Every writer (any daemon instance) takes the rows of the bikes a
-- batch touches FOR UPDATE, in bike_id order, and bumps their version: a writer whose cached
-- version is not the one before knows another instance changed the bike, and reloads it.
CREATE TABLE bikes (
    bike_id text   PRIMARY KEY CHECK (bike_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    version bigint NOT NULL DEFAULT 1
);
INSERT INTO bikes (bike_id) SELECT DISTINCT bike_id FROM sessions;
ALTER TABLE sessions ADD CONSTRAINT sessions_bike FOREIGN KEY (bike_id) REFERENCES bikes (bike_id);

-- A session's summary: what its rules need, never its samples. seq_ranges holds which seqs
-- are stored as flat inclusive range bounds [low1, high1, low2, high2, ...].
ALTER TABLE sessions
    ADD COLUMN seq_ranges        integer[]   NOT NULL DEFAULT '{}',
    ADD COLUMN latest_emitted_at timestamptz;

-- Backfill summaries of sessions written by version 1 (finalized ones keep their totals; they
-- get their seq ranges so that a redelivered sample is still told from a clashing one).
ALTER TABLE sessions DISABLE TRIGGER sessions_guard;
WITH islands AS (
    SELECT session_id, min(seq) AS low, max(seq) AS high
    FROM (SELECT session_id, seq,
                 seq - row_number() OVER (PARTITION BY session_id ORDER BY seq) AS island
          FROM telemetry) numbered
    GROUP BY session_id, island
), ranges AS (
    SELECT session_id, array_agg(bound ORDER BY low, pos) AS seq_ranges
    FROM islands, LATERAL (VALUES (1, low), (2, high)) AS b(pos, bound)
    GROUP BY session_id
), sums AS (
    SELECT session_id, sum(energy_wh) AS energy_wh, COALESCE(sum(distance_m), 0) AS distance_m,
           count(*) AS telemetry_count, max(emitted_at) AS latest_emitted_at
    FROM telemetry GROUP BY session_id
)
UPDATE sessions s SET
    seq_ranges = r.seq_ranges,
    latest_emitted_at = m.latest_emitted_at,
    energy_wh = CASE WHEN s.state = 'active' THEN m.energy_wh ELSE s.energy_wh END,
    distance_m = CASE WHEN s.state = 'active' THEN m.distance_m ELSE s.distance_m END,
    telemetry_count = CASE WHEN s.state = 'active' THEN m.telemetry_count ELSE s.telemetry_count END
FROM ranges r JOIN sums m USING (session_id)
WHERE s.session_id = r.session_id;
UPDATE sessions SET energy_wh = 0, distance_m = 0, telemetry_count = 0
WHERE state = 'active' AND energy_wh IS NULL;
ALTER TABLE sessions ENABLE TRIGGER sessions_guard;

ALTER TABLE sessions
    ALTER COLUMN energy_wh SET DEFAULT 0, ALTER COLUMN energy_wh SET NOT NULL,
    ALTER COLUMN distance_m SET DEFAULT 0, ALTER COLUMN distance_m SET NOT NULL,
    ALTER COLUMN telemetry_count SET DEFAULT 0, ALTER COLUMN telemetry_count SET NOT NULL,
    ADD CONSTRAINT sessions_seq_ranges_are_pairs CHECK (cardinality(seq_ranges) % 2 = 0);

-- Sessions whose end's grace period may have run out: the expiry sweep finds them here.
CREATE INDEX sessions_active_end ON sessions (end_received_at)
    WHERE state = 'active' AND end_received_at IS NOT NULL;

-- Messages that arrived before what they depend on (a sample or an end before its session's
-- start, a start while the bike's Active session has not ended): acknowledged once stored
-- here, applied in the transaction that makes them decidable, on whichever instance, or
-- rejected with their usual code when the grace period ends.
CREATE TABLE waiting_messages (
    bike_id      text        NOT NULL REFERENCES bikes (bike_id),
    ref          bytea       NOT NULL,  -- sha256 of topic and payload: the message's identity
    topic        text        NOT NULL,
    payload      bytea       NOT NULL,
    received_at  timestamptz NOT NULL,
    session_id   uuid        NOT NULL,
    telemetry_id uuid,
    PRIMARY KEY (bike_id, ref)
);
CREATE INDEX waiting_messages_received ON waiting_messages (received_at);

-- ChargeFlow schema, version 4: bike-affine instances register the share of the fleet they
-- take (CHARGEFLOW_PARTITION=i/N), so that the others know which bikes are taken care of and
-- a change of layout keeps the old claim until what was queued under it has been taken.
-- State of the deployment, not of the domain: nothing here decides a session.

CREATE TABLE instance_partitions (
    client_id  text        PRIMARY KEY,  -- the instance's MQTT client id (its persistent session)
    part_index integer     NOT NULL,
    part_count integer     NOT NULL,
    -- Claims held before the current one and not yet settled, as "i/N".
    previous   text[]      NOT NULL DEFAULT '{}',
    seen_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT a_partition_is_one_of_its_count CHECK (part_index >= 0 AND part_index < part_count)
);

-- custody schema v2 for PostgreSQL: the lifecycle events (rotation, suspension,
-- resumption, retirement) and the region switches are audited, a rotation carries its
-- id, and the region switches are durable.

ALTER TABLE custody_audit_log DROP CONSTRAINT custody_audit_log_event_check;
ALTER TABLE custody_audit_log ADD CONSTRAINT custody_audit_log_event_check
    CHECK (event IN ('REGISTER', 'DERIVE', 'ROTATE', 'SUSPEND', 'RESUME', 'RETIRE',
                     'REGION_ENABLE', 'REGION_DISABLE'));
-- rotation only: the rotation's id
ALTER TABLE custody_audit_log ADD COLUMN rotation_id uuid;

-- The recent rotations each shard loads at start-up (to answer a repeated rotation id).
CREATE INDEX custody_audit_rotations ON custody_audit_log (shard, logged_at)
    WHERE event = 'ROTATE';

-- The compliance regions an admin switched; a configured region without a row is enabled.
-- (A REGION_ENABLE / REGION_DISABLE record names its region in the `region` column, with
-- the nil UUID as asset_id.)
CREATE TABLE custody_regions (
    region      text        PRIMARY KEY,
    enabled     boolean     NOT NULL,
    updated_at  timestamptz NOT NULL
);

INSERT INTO custody_schema (version) VALUES (2);

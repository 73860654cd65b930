-- custody schema v2 for the embedded SQLite store: the lifecycle events (rotation,
-- suspension, resumption, retirement) and the region switches are audited, a rotation
-- carries its id, and the region switches are durable.
-- SQLite cannot change a CHECK constraint in place, so the audit log is rebuilt (inside
-- the migration's transaction) with the wider CHECK and the new column.

CREATE TABLE custody_audit_log_v2 (
    shard               INTEGER NOT NULL CHECK (shard >= 0),
    seq                 INTEGER NOT NULL CHECK (seq >= 1),
    event               TEXT    NOT NULL
                        CHECK (event IN ('REGISTER', 'DERIVE', 'ROTATE', 'SUSPEND', 'RESUME',
                                         'RETIRE', 'REGION_ENABLE', 'REGION_DISABLE')),
    asset_id            TEXT    NOT NULL,
    counter             INTEGER NOT NULL CHECK (counter >= 0),
    state_at_event      TEXT    NOT NULL,
    requester           TEXT    NOT NULL,
    request_id          INTEGER NOT NULL,
    ts_ms               INTEGER NOT NULL,
    -- derivation only (NULL for other events), but `region` also names the region a
    -- REGION_ENABLE / REGION_DISABLE switched (whose asset_id is the nil UUID)
    derivation_path     TEXT,
    purpose             TEXT,
    region              TEXT,
    ttl_s               INTEGER,
    scheme_version      INTEGER,
    -- rotation only: the rotation's id (canonical lower-case UUID)
    rotation_id         TEXT,
    PRIMARY KEY (shard, seq)
) WITHOUT ROWID;

INSERT INTO custody_audit_log_v2 (shard, seq, event, asset_id, counter, state_at_event,
    requester, request_id, ts_ms, derivation_path, purpose, region, ttl_s, scheme_version)
SELECT shard, seq, event, asset_id, counter, state_at_event, requester, request_id, ts_ms,
    derivation_path, purpose, region, ttl_s, scheme_version
FROM custody_audit_log;

DROP TABLE custody_audit_log;
ALTER TABLE custody_audit_log_v2 RENAME TO custody_audit_log;

-- The recent rotations each shard loads at start-up (to answer a repeated rotation id).
CREATE INDEX custody_audit_rotations ON custody_audit_log (shard, ts_ms)
    WHERE event = 'ROTATE';

-- The compliance regions an admin switched; a configured region without a row is enabled.
CREATE TABLE custody_regions (
    region      TEXT    PRIMARY KEY NOT NULL,
    enabled     INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    updated_ms  INTEGER NOT NULL
) WITHOUT ROWID;

-- custody schema v1 for the embedded SQLite store.
-- Applied by the appliance at start-up (PRAGMA user_version records the version); kept
-- here so operators can read exactly what the store holds.

-- One row per registered asset: its lifecycle state and its derivation counter.
-- The counter only moves forward (I2).
CREATE TABLE custody_keys (
    asset_id            TEXT    PRIMARY KEY NOT NULL,  -- canonical lower-case UUID
    state               TEXT    NOT NULL
                        CHECK (state IN ('ACTIVE', 'ROTATING', 'SUSPENDED', 'RETIRED')),
    derivation_counter  INTEGER NOT NULL CHECK (derivation_counter >= 0),
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per audited event, ordered by (shard, seq): each shard numbers its own records
-- 1, 2, 3, ... with no gaps. Timestamps are informational, never an order.
CREATE TABLE custody_audit_log (
    shard               INTEGER NOT NULL CHECK (shard >= 0),
    seq                 INTEGER NOT NULL CHECK (seq >= 1),
    event               TEXT    NOT NULL CHECK (event IN ('REGISTER', 'DERIVE')),
    asset_id            TEXT    NOT NULL,
    counter             INTEGER NOT NULL CHECK (counter >= 0),
    state_at_event      TEXT    NOT NULL,
    requester           TEXT    NOT NULL,
    request_id          INTEGER NOT NULL,
    ts_ms               INTEGER NOT NULL,
    -- derivation only (NULL for other events)
    derivation_path     TEXT,
    purpose             TEXT,
    region              TEXT,
    ttl_s               INTEGER,
    scheme_version      INTEGER,
    PRIMARY KEY (shard, seq)
) WITHOUT ROWID;

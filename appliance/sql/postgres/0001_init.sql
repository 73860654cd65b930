-- custody schema v1 for PostgreSQL. Applied by `custodyd migrate`; the appliance refuses
-- to start on a database whose schema is newer than it knows.

-- Applied migrations, newest last.
CREATE TABLE custody_schema (
    version     integer     PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per registered asset: its lifecycle state and its derivation counter, which
-- only moves forward (I2).
CREATE TABLE custody_keys (
    asset_id            uuid        PRIMARY KEY,
    state               text        NOT NULL
                        CHECK (state IN ('ACTIVE', 'ROTATING', 'SUSPENDED', 'RETIRED')),
    derivation_counter  bigint      NOT NULL CHECK (derivation_counter >= 0),
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

-- The last committed audit sequence number of each shard. Every commit moves it forward
-- in the same transaction as the batch's records, and only if the batch continues it:
-- the log never has a gap or a duplicate.
CREATE TABLE custody_shard_seq (
    shard     smallint PRIMARY KEY CHECK (shard >= 0),
    last_seq  bigint   NOT NULL CHECK (last_seq >= 0)
);

-- One row per audited event, ordered by (shard, seq). Partitioned by month on the time
-- the shard accepted the event; the default partition catches anything outside the
-- partitions made ahead of time, so an insert never fails for lack of one.
CREATE TABLE custody_audit_log (
    shard            smallint    NOT NULL CHECK (shard >= 0),
    seq              bigint      NOT NULL CHECK (seq >= 1),
    logged_at        timestamptz NOT NULL,
    event            text        NOT NULL CHECK (event IN ('REGISTER', 'DERIVE')),
    asset_id         uuid        NOT NULL,
    counter          bigint      NOT NULL CHECK (counter >= 0),
    state_at_event   text        NOT NULL,
    requester        text        NOT NULL,
    request_id       bigint      NOT NULL,
    derivation_path  text,
    purpose          text,
    region           text,
    ttl_s            integer,
    scheme_version   smallint,
    PRIMARY KEY (shard, seq, logged_at)
) PARTITION BY RANGE (logged_at);

CREATE TABLE custody_audit_log_default PARTITION OF custody_audit_log DEFAULT;

-- The single owner (I6). An appliance takes the store by moving the fencing token
-- forward, and only when the previous owner's lease has lapsed; every commit checks the
-- token (holding this row FOR SHARE), so an owner that lost the store cannot commit.
CREATE TABLE custody_owner (
    id            smallint    PRIMARY KEY CHECK (id = 1),
    instance      uuid,
    token         bigint      NOT NULL CHECK (token >= 0),
    heartbeat_at  timestamptz,
    -- the owner's lease: a successor may take over once no heartbeat came for this long
    lease_ms      bigint      NOT NULL DEFAULT 0
);
INSERT INTO custody_owner (id, instance, token, heartbeat_at) VALUES (1, NULL, 0, NULL);

INSERT INTO custody_schema (version) VALUES (1);

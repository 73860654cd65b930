-- custody schema v3 for PostgreSQL: the tamper-evident audit log.
-- Each record carries the previous record's chain hash and its own (SHA-256 over the
-- canonical encoding of docs/audit.md); records written before v3 keep NULL and form the
-- unchained prefix of their shard's log. Each committed batch adds a checkpoint: the
-- shard's last sequence number and hash, with an HMAC-SHA256 under a key derived from the
-- root seed, so rewriting history needs the seed, not only write access to the database.

ALTER TABLE custody_audit_log ADD COLUMN prev_hash bytea
    CHECK (prev_hash IS NULL OR length(prev_hash) = 32);
ALTER TABLE custody_audit_log ADD COLUMN hash bytea
    CHECK (hash IS NULL OR length(hash) = 32);

CREATE TABLE custody_audit_checkpoints (
    shard       smallint    NOT NULL CHECK (shard >= 0),
    seq         bigint      NOT NULL CHECK (seq >= 1),
    hash        bytea       NOT NULL CHECK (length(hash) = 32),
    mac         bytea       NOT NULL CHECK (length(mac) = 32),
    logged_at   timestamptz NOT NULL,
    PRIMARY KEY (shard, seq)
);

INSERT INTO custody_schema (version) VALUES (3);

-- The article's design, for comparison on the same PostgreSQL (docs/benchmarks.md):
-- one transaction per derivation, serialized by an advisory lock and a row lock.
DROP TABLE IF EXISTS article_audit_log;
DROP TABLE IF EXISTS article_keys;
CREATE TABLE article_keys (
    asset_num           integer PRIMARY KEY,
    asset_id            uuid    NOT NULL UNIQUE,
    state               text    NOT NULL,
    derivation_counter  bigint  NOT NULL
);
CREATE TABLE article_audit_log (
    id                   bigserial PRIMARY KEY,
    asset_id             uuid      NOT NULL,
    derivation_path      text      NOT NULL,
    counter              bigint    NOT NULL,
    state_at_derivation  text      NOT NULL,
    ts                   timestamptz NOT NULL
);
INSERT INTO article_keys
SELECT i, md5(i::text)::uuid, 'ACTIVE', 0 FROM generate_series(1, 1000) AS i;

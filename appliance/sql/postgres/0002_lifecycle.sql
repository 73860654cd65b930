-- custody schema v2 for PostgreSQL: the lifecycle events (rotation, suspension,
-- resumption, retirement) are audited, and a rotation carries its id.

ALTER TABLE custody_audit_log DROP CONSTRAINT custody_audit_log_event_check;
ALTER TABLE custody_audit_log ADD CONSTRAINT custody_audit_log_event_check
    CHECK (event IN ('REGISTER', 'DERIVE', 'ROTATE', 'SUSPEND', 'RESUME', 'RETIRE'));
-- rotation only: the rotation's id
ALTER TABLE custody_audit_log ADD COLUMN rotation_id uuid;

-- The recent rotations each shard loads at start-up (to answer a repeated rotation id).
CREATE INDEX custody_audit_rotations ON custody_audit_log (shard, logged_at)
    WHERE event = 'ROTATE';

INSERT INTO custody_schema (version) VALUES (2);

-- Availability (issue 19): any number of appliances share one database; the one holding
-- the owner lease is active, the others standbys.
--
-- The lease row names where the active's clients reach it (`server.advertise`), so that a
-- standby's NOT_ACTIVE reply can point clients there, when it took the lease, and the
-- fingerprint of the root seed the store is written under: an appliance unsealed with
-- another seed (other keys, another audit key) never takes the lease.
--
-- The row's `id` is the lease's scope: 1 is the whole asset space, the only scope today.
-- Several actives on disjoint partitions of the asset space would each hold one row (a
-- later migration drops the `id = 1` check and adds the partition's bounds).
ALTER TABLE custody_owner ADD COLUMN address text
    CHECK (address IS NULL OR length(address) <= 264);
ALTER TABLE custody_owner ADD COLUMN acquired_at timestamptz;
ALTER TABLE custody_owner ADD COLUMN seed_fingerprint text
    CHECK (seed_fingerprint IS NULL OR length(seed_fingerprint) <= 64);

INSERT INTO custody_schema (version) VALUES (4);

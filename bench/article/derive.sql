-- One derivation as the article does it (DeriveAssetKey): advisory lock, row lock,
-- audit INSERT, COMMIT. The HMAC itself runs in the caller and costs nothing here.
\set n random(1, 1000)
\set i random(0, 999)
BEGIN;
SELECT pg_advisory_xact_lock(:n);
SELECT asset_id, state, derivation_counter FROM article_keys WHERE asset_num = :n FOR UPDATE;
INSERT INTO article_audit_log (asset_id, derivation_path, counter, state_at_derivation, ts)
SELECT asset_id, 'm/44''/0''/0''/0''/' || :i, derivation_counter, state, now()
FROM article_keys WHERE asset_num = :n;
COMMIT;

//! The schema: the embedded migrations, the audit log's monthly partitions (made ahead,
//! and kept made while the appliance runs), and the durability settings the server must
//! have.

use super::*;

pub(super) const MIGRATIONS: [&str; 4] = [
    include_str!("../../../appliance/sql/postgres/0001_init.sql"),
    include_str!("../../../appliance/sql/postgres/0002_lifecycle.sql"),
    include_str!("../../../appliance/sql/postgres/0003_audit_chain.sql"),
    include_str!("../../../appliance/sql/postgres/0004_availability.sql"),
];

/// Applies the embedded migrations (in one transaction each) and checks the version.
pub async fn migrate(client: &Client) -> Result<u32, StoreError> {
    let current = schema_version(client).await?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for sql in MIGRATIONS.iter().skip(current as usize) {
        client
            .batch_execute(&format!("BEGIN; {sql}; COMMIT;"))
            .await
            .map_err(pg_err)?;
    }
    ensure_partitions(client).await?;
    schema_version(client).await
}

/// Months of audit-log partitions kept ready ahead of time, the current one included.
pub const PARTITION_MONTHS_AHEAD: i32 = 3;

/// Makes the audit log's monthly partitions for this month and the next ones. A month
/// whose rows already sit in the default partition is left there (with a warning from
/// the server): inserts never fail for lack of a partition.
pub async fn ensure_partitions(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(&format!(
            "DO $$
             DECLARE m date;
             BEGIN
               FOR i IN 0..{last} LOOP
                 m := (date_trunc('month', now()) + make_interval(months => i))::date;
                 BEGIN
                   EXECUTE format(
                     'CREATE TABLE IF NOT EXISTS %I PARTITION OF custody_audit_log FOR VALUES FROM (%L) TO (%L)',
                     'custody_audit_log_' || to_char(m, 'YYYY_MM'), m, (m + interval '1 month')::date);
                 EXCEPTION WHEN others THEN
                   RAISE WARNING 'custody: partition for % not created: %', m, SQLERRM;
                 END;
               END LOOP;
             END $$",
            last = PARTITION_MONTHS_AHEAD - 1
        ))
        .await
        .map_err(pg_err)
}

/// The applied schema version (0 for an empty database).
pub async fn schema_version(client: &Client) -> Result<u32, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('custody_schema') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM custody_schema", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    Ok(v.unwrap_or(0).max(0) as u32)
}

/// Refuses a server that acknowledges commits before they are durable: with
/// `synchronous_commit` or `fsync` off, an acknowledged derivation's audit record could
/// vanish in a crash (I1). `allow` (config `store.postgres_allow_unsafe_durability`) serves
/// anyway, with a warning on every connection.
pub async fn check_durability(client: &Client, allow: bool) -> Result<(), StoreError> {
    let mut unsafe_settings = Vec::new();
    for setting in ["synchronous_commit", "fsync"] {
        let value: String = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .map_err(pg_err)?
            .get(0);
        if value == "off" || (setting == "synchronous_commit" && value == "local") {
            unsafe_settings.push(format!("{setting} = {value}"));
        }
    }
    if unsafe_settings.is_empty() {
        return Ok(());
    }
    let what = unsafe_settings.join(", ");
    if allow {
        tracing::warn!(settings = %what, "PostgreSQL acknowledges commits before they are durable; serving anyway because store.postgres_allow_unsafe_durability = true");
        return Ok(());
    }
    Err(StoreError::Unavailable(format!(
        "PostgreSQL has {what}: an acknowledged derivation could lose its audit record in a crash. \
         Fix the server, or set store.postgres_allow_unsafe_durability = true for a throwaway database"
    )))
}

//! A throwaway PostgreSQL database: made afresh on a server, dropped with its guard.
//!
//! One implementation for the integration tests (`PgDatabase`, in this folder's
//! `mod.rs`), the load harness (`custody-load demo --postgres`, `article`) and the
//! `pg_commit` benchmark. Those are separate crates that cannot import this folder, so
//! they include the file itself (`#[path = "../../tests/common/pg.rs"] mod pg;`); it
//! depends on nothing but the `custody` library and std.

use custody::store::postgres::{self, PgConfig};
use custody::store::StoreError;

/// A database that exists while this guard lives: dropped (with any connections still
/// on it) when the guard drops, a failed run's too.
pub struct TempDatabase {
    /// Where the database is: the server's settings with the database's name.
    pub config: PgConfig,
    /// The server's own database, from which the throwaway one is made and dropped.
    admin: PgConfig,
}

impl TempDatabase {
    /// Makes database `name` on the server of `admin`, dropping first any database of
    /// that name an earlier run left behind.
    pub fn new(admin: PgConfig, name: &str) -> Result<TempDatabase, StoreError> {
        let config = PgConfig {
            dbname: name.to_owned(),
            ..admin.clone()
        };
        let statements = [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ];
        let on_server = admin.clone();
        postgres::on_own_executor("custody-temp-db", move || async move {
            let c = postgres::connect(&on_server).await?;
            for sql in statements {
                c.batch_execute(&sql)
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            }
            Ok::<(), StoreError>(())
        })??;
        Ok(TempDatabase { config, admin })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.config.dbname.clone());
        let _ = postgres::on_own_executor("custody-temp-db", move || async move {
            if let Ok(c) = postgres::connect(&admin).await {
                let _ = c
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}

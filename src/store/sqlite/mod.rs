//! The embedded store: SQLite in WAL mode with `synchronous=FULL`, written by one
//! dedicated commit thread.
//!
//! Every shard submits its sealed batch to one [`CommitQueue`]; the commit thread takes
//! whatever batches are waiting (up to `STORE_BATCHES_PER_TRANSACTION_MAX`), writes them in
//! one transaction and completes each batch after `COMMIT` returns. That folds the shards'
//! group commits into one fsync. A transaction that fails fails every batch in it. SQLite
//! never runs on an executor thread.

mod reader;
mod write;

use super::handoff::{completion, CommitQueue, Completer, SubmitError};
use super::{
    CommitBatch, LocalFuture, RecentRotation, RotationWindow, ShardSnapshot, ShardStore, Store,
    StoreError, StoredAsset, SCHEMA_VERSION,
};
use crate::audit::AuditEvent;
use crate::bounds;
use crate::lifecycle::AssetState;
use crate::placement::shard_of;
use rusqlite::{params, Connection, OpenFlags};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use write::write_batches;

/// Heap bytes SQLite holds now, in every connection of the process (page caches above
/// all; each connection's cache is bounded by SQLite's default `cache_size`, 2 MiB). Part
/// of the heap in use: it grows with the store's work, not with clients' connections.
pub fn memory_used_bytes() -> u64 {
    // SAFETY: sqlite3_memory_used only reads SQLite's own counter (thread-safe).
    u64::try_from(unsafe { rusqlite::ffi::sqlite3_memory_used() }).unwrap_or(0)
}

/// A shard that sent a batch this recently is expected to send the next one soon.
const ACTIVE_SHARD_WINDOW: Duration = Duration::from_millis(5);
use uuid::Uuid;

const MIGRATIONS: [&str; 4] = [
    include_str!("../../../appliance/sql/sqlite/0001_init.sql"),
    include_str!("../../../appliance/sql/sqlite/0002_lifecycle.sql"),
    include_str!("../../../appliance/sql/sqlite/0003_audit_chain.sql"),
    include_str!("../../../appliance/sql/sqlite/0004_availability.sql"),
];

enum Job {
    Commit(CommitBatch, Completer<Result<(), StoreError>>),
    Load {
        shard: u16,
        shard_count: u16,
        rotations: RotationWindow,
        done: Completer<Result<ShardSnapshot, StoreError>>,
    },
}

/// The SQLite store: a queue to its commit thread, and the thread itself.
pub struct SqliteStore {
    queue: CommitQueue<Job>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
    checkpointer: Option<Checkpointer>,
    // Held for the store's lifetime: a second appliance on the same file is refused.
    _lock: std::fs::File,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies migrations, takes the
    /// single-owner lock and starts the commit thread.
    pub fn open(
        path: &Path,
        queue_depth: usize,
        linger: Duration,
    ) -> Result<SqliteStore, StoreError> {
        Self::open_with_wal_restart(path, queue_depth, linger, WAL_RESTART_PAGES)
    }

    fn open_with_wal_restart(
        path: &Path,
        queue_depth: usize,
        linger: Duration,
        wal_restart_pages: u32,
    ) -> Result<SqliteStore, StoreError> {
        let lock = take_owner_lock(path)?;
        let mut conn = open_connection(path)?;
        migrate(&mut conn)?;
        let queue = CommitQueue::new(queue_depth.max(1));
        let thread_queue = queue.clone();
        // Checkpoints copy the WAL back into the database and fsync it: tens of
        // milliseconds that must not sit in front of a commit. A thread of its own does
        // that work continuously, on its own connection. But only a checkpoint that ends
        // with nothing left to copy lets the next writer restart the WAL from its start,
        // and under steady writes a concurrent checkpoint never quite catches up; so the
        // commit thread still checkpoints once the WAL passes WAL_RESTART_PAGES, by which
        // time the background thread has already copied nearly all of it. That bounds
        // the WAL file.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint={wal_restart_pages}; PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES};"
        ))
        .map_err(sql_err)?;
        let checkpointer = Checkpointer::start(path)?;
        let thread = std::thread::Builder::new()
            .name("custody-sqlite".into())
            .spawn(move || commit_thread(conn, thread_queue, linger))
            .map_err(|e| StoreError::Unavailable(format!("cannot start commit thread: {e}")))?;
        Ok(SqliteStore {
            queue,
            path: path.to_owned(),
            thread: Some(thread),
            checkpointer: Some(checkpointer),
            _lock: lock,
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.checkpointer.take());
    }
}

/// How often the checkpointer copies committed WAL frames into the database.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// WAL pages after which the commit thread finishes a checkpoint itself (see `open`):
/// 64 MiB at 4 KiB pages. Each such checkpoint stalls commits for a few milliseconds, so
/// it should be rare; the WAL file never grows much past this.
const WAL_RESTART_PAGES: u32 = 16384;

/// Size the WAL file is truncated back to when it restarts.
const WAL_SIZE_LIMIT_BYTES: u64 = 128 << 20;

/// The WAL checkpointer: a thread with its own connection running PASSIVE checkpoints,
/// which never block the commit thread, so that the commit thread's own checkpoint (the
/// one that lets the WAL restart) has almost nothing left to copy.
struct Checkpointer {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = open_connection(path)?;
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("custody-sqlite-ckpt".into())
            .spawn(move || {
                let (lock, cvar) = &*thread_stop;
                loop {
                    let stopped = match lock.lock() {
                        Ok(g) => match cvar.wait_timeout(g, CHECKPOINT_INTERVAL) {
                            Ok((g, _)) => *g,
                            Err(p) => *p.into_inner().0,
                        },
                        Err(p) => *p.into_inner(),
                    };
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                    }
                    if stopped {
                        return;
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpointer: {e}")))?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.stop;
        match lock.lock() {
            Ok(mut g) => *g = true,
            Err(p) => *p.into_inner() = true,
        }
        cvar.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Store for SqliteStore {
    fn open_shard(&self, shard: u16, shard_count: u16) -> Box<dyn ShardStore> {
        Box::new(SqliteShard {
            queue: self.queue.clone(),
            shard,
            shard_count,
        })
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

struct SqliteShard {
    queue: CommitQueue<Job>,
    shard: u16,
    shard_count: u16,
}

fn submit_error(e: SubmitError<Job>) -> StoreError {
    match e {
        SubmitError::Full(_) => StoreError::QueueFull,
        SubmitError::Closed(_) => StoreError::Closed,
    }
}

impl ShardStore for SqliteShard {
    fn load_with(
        &self,
        rotations: RotationWindow,
    ) -> LocalFuture<Result<ShardSnapshot, StoreError>> {
        let (done, pending) = completion();
        let submitted = self.queue.submit(Job::Load {
            shard: self.shard,
            shard_count: self.shard_count,
            rotations,
            done,
        });
        Box::pin(async move {
            submitted.map_err(submit_error)?;
            pending.await.unwrap_or(Err(StoreError::Closed))
        })
    }

    fn commit(&self, batch: CommitBatch) -> LocalFuture<Result<(), StoreError>> {
        let (done, pending) = completion();
        let submitted = self.queue.submit(Job::Commit(batch, done));
        Box::pin(async move {
            submitted.map_err(submit_error)?;
            pending.await.unwrap_or(Err(StoreError::Closed))
        })
    }
}

fn take_owner_lock(db: &Path) -> Result<std::fs::File, StoreError> {
    let mut lock_path = db.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot open lock file {lock_path:?}: {e}"))
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Locked(format!(
            "{} is owned by another running appliance (lock {lock_path:?})",
            db.display()
        )));
    }
    Ok(file)
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err)?;
    // WAL with synchronous=FULL: a COMMIT returns only after the WAL is fsynced.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(sql_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "SQLite refused WAL mode (got {mode})"
        )));
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;")
        .map_err(sql_err)?;
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .map_err(sql_err)?;
    if sync != 2 {
        return Err(StoreError::Unavailable(format!(
            "SQLite synchronous is {sync}, expected FULL (2)"
        )));
    }
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(sql_err)?;
        tx.execute_batch(sql).map_err(sql_err)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
    }
    Ok(())
}

fn commit_thread(mut conn: Connection, queue: CommitQueue<Job>, linger: Duration) {
    // If this thread dies, shards waiting on queued batches hear Abandoned, not silence.
    let _closer = queue.close_on_drop();
    let mut jobs = Vec::with_capacity(bounds::STORE_BATCHES_PER_TRANSACTION_MAX);
    // The last committed sequence number of each shard seen so far.
    let mut committed_seq: HashMap<u16, u64> = HashMap::new();
    // When each shard last sent a batch: the shards active lately are waited for (up to
    // `linger`), which keeps busy shards in step, one fsync for all of them.
    let mut last_batch_at: HashMap<u16, Instant> = HashMap::new();
    while queue.take(bounds::STORE_BATCHES_PER_TRANSACTION_MAX, &mut jobs) {
        let now = Instant::now();
        last_batch_at.retain(|_, at| now.duration_since(*at) < ACTIVE_SHARD_WINDOW);
        queue.linger(
            bounds::STORE_BATCHES_PER_TRANSACTION_MAX,
            &mut jobs,
            last_batch_at.len(),
            linger,
        );
        let mut commits = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Commit(batch, done) => {
                    last_batch_at.insert(batch.shard, Instant::now());
                    commits.push((batch, done))
                }
                Job::Load {
                    shard,
                    shard_count,
                    rotations,
                    done,
                } => {
                    let snapshot = load_shard(&conn, shard, shard_count, rotations);
                    if let Ok(s) = &snapshot {
                        committed_seq.insert(shard, s.last_seq);
                    }
                    done.complete(snapshot)
                }
            }
        }
        if commits.is_empty() {
            continue;
        }
        // A batch that does not continue its shard's sequence (one before it failed) is
        // refused on its own; the others are written together in one transaction.
        let mut next_seq = committed_seq.clone();
        let mut writable = Vec::with_capacity(commits.len());
        for (batch, done) in commits {
            let expected = match next_seq.get(&batch.shard) {
                Some(last) => Ok(last + 1),
                None => last_seq(&conn, batch.shard).map(|last| last + 1),
            };
            let found = batch.records.first().map(|r| r.seq).unwrap_or(0);
            match expected {
                Ok(expected) if found == expected => {
                    let last = batch.records.last().map(|r| r.seq).unwrap_or(found);
                    next_seq.insert(batch.shard, last);
                    writable.push((batch, done));
                }
                Ok(expected) => done.complete(Err(StoreError::SequenceGap {
                    shard: batch.shard,
                    expected,
                    found,
                })),
                Err(e) => done.complete(Err(e)),
            }
        }
        if writable.is_empty() {
            continue;
        }
        let result = write_batches(&mut conn, writable.iter().map(|(b, _)| b));
        if result.is_ok() {
            committed_seq = next_seq;
        }
        for (_, done) in writable {
            done.complete(result.clone());
        }
    }
}

fn last_seq(conn: &Connection, shard: u16) -> Result<u64, StoreError> {
    let last: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM custody_audit_log WHERE shard = ?1",
            [shard],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(last.max(0) as u64)
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} exceeds 2^63-1")))
}

fn load_shard(
    conn: &Connection,
    shard: u16,
    shard_count: u16,
    window: RotationWindow,
) -> Result<ShardSnapshot, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT asset_id, state, derivation_counter FROM custody_keys")
        .map_err(sql_err)?;
    let mut rows = stmt.query([]).map_err(sql_err)?;
    let mut assets = Vec::new();
    while let Some(row) = rows.next().map_err(sql_err)? {
        let stored = stored_asset(row)?;
        if shard_of(&stored.asset, shard_count) == shard {
            assets.push(stored);
        }
    }
    let last_seq = last_seq(conn, shard)?;
    Ok(ShardSnapshot {
        assets,
        last_seq,
        last_hash: record_hash(conn, shard, last_seq)?,
        rotations: recent_rotations(conn, shard, window)?,
        regions: stored_regions(conn)?,
    })
}

/// The chain hash of record `seq` of `shard` ([`crate::audit::GENESIS`] for no record or
/// one stored without a hash).
fn record_hash(conn: &Connection, shard: u16, seq: u64) -> Result<[u8; 32], StoreError> {
    if seq == 0 {
        return Ok(crate::audit::GENESIS);
    }
    let hash: Option<Vec<u8>> = conn
        .query_row(
            "SELECT hash FROM custody_audit_log WHERE shard = ?1 AND seq = ?2",
            params![shard, to_i64(seq, "seq")?],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    super::hash_of(hash, shard, seq)
}

fn stored_regions(conn: &Connection) -> Result<Vec<(String, bool)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT region, enabled FROM custody_regions ORDER BY region")
        .map_err(sql_err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))
        .map_err(sql_err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
}

/// The shard's rotations since `window.since_ms`, at most `window.max` of the newest,
/// oldest first (through the partial index on ROTATE records).
fn recent_rotations(
    conn: &Connection,
    shard: u16,
    window: RotationWindow,
) -> Result<Vec<RecentRotation>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT rotation_id, asset_id, counter, seq, ts_ms, hash FROM custody_audit_log \
             WHERE shard = ?1 AND event = 'ROTATE' AND ts_ms >= ?2 \
             ORDER BY ts_ms DESC, seq DESC LIMIT ?3",
        )
        .map_err(sql_err)?;
    let since = i64::try_from(window.since_ms).unwrap_or(i64::MAX);
    let max = i64::try_from(window.max).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![shard, since, max]).map_err(sql_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql_err)? {
        let uuid = |i: usize| -> Result<Uuid, StoreError> {
            let text: Option<String> = row.get(i).map_err(sql_err)?;
            text.as_deref()
                .and_then(|t| Uuid::parse_str(t).ok())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("ROTATE record: column {i} is not a UUID"))
                })
        };
        let number = |i: usize| -> Result<u64, StoreError> {
            let v: i64 = row.get(i).map_err(sql_err)?;
            u64::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("ROTATE record: column {i} is {v}")))
        };
        let seq = number(3)?;
        out.push(RecentRotation {
            rotation_id: uuid(0)?,
            asset: uuid(1)?,
            counter: number(2)?,
            seq,
            ts_ms: number(4)?,
            hash: super::hash_of(row.get(5).map_err(sql_err)?, shard, seq)?,
        });
    }
    out.reverse();
    Ok(out)
}

fn stored_asset(row: &rusqlite::Row<'_>) -> Result<StoredAsset, StoreError> {
    let id: String = row.get(0).map_err(sql_err)?;
    let state: String = row.get(1).map_err(sql_err)?;
    let counter: i64 = row.get(2).map_err(sql_err)?;
    Ok(StoredAsset {
        asset: Uuid::parse_str(&id)
            .map_err(|e| StoreError::Corrupt(format!("asset id {id:?}: {e}")))?,
        state: AssetState::from_name(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("asset {id}: state {state:?}")))?,
        counter: u64::try_from(counter)
            .map_err(|_| StoreError::Corrupt(format!("asset {id}: counter {counter}")))?,
    })
}

pub use super::AuditRow;

/// The shards with a record or a checkpoint, by a loose index scan: each step seeks the
/// primary key (shard, seq) for the next shard above the last. `SELECT DISTINCT shard`
/// reads the whole index instead (200 ms at a million records, in the snapshot every run
/// starts with: a run's cost then grew with the log, not with its new records).
const SHARDS_SQL: &str = "WITH RECURSIVE \
     l(shard) AS (SELECT MIN(shard) FROM custody_audit_log UNION ALL \
       SELECT (SELECT MIN(shard) FROM custody_audit_log WHERE shard > l.shard) \
       FROM l WHERE l.shard IS NOT NULL), \
     c(shard) AS (SELECT MIN(shard) FROM custody_audit_checkpoints UNION ALL \
       SELECT (SELECT MIN(shard) FROM custody_audit_checkpoints WHERE shard > c.shard) \
       FROM c WHERE c.shard IS NOT NULL) \
     SELECT shard FROM l WHERE shard IS NOT NULL \
     UNION SELECT shard FROM c WHERE shard IS NOT NULL ORDER BY shard";

pub use reader::SqliteReader;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditRecord;
    use crate::store::AssetWrite;
    use futures_lite::future::block_on;
    use std::sync::Arc;

    fn record(shard: u16, seq: u64, asset: Uuid) -> AuditRecord {
        AuditRecord {
            shard,
            seq,
            event: AuditEvent::Register,
            asset,
            counter: 0,
            state: AssetState::Active,
            requester: Arc::from("t"),
            request_id: seq,
            ts_ms: 1,
            derive: None,
            rotation_id: None,
            switched_region: None,
        }
    }

    fn register_batch(shard: u16, seq: u64, asset: Uuid) -> CommitBatch {
        CommitBatch {
            region_writes: Vec::new(),
            shard,
            records: vec![record(shard, seq, asset)],
            asset_writes: vec![AssetWrite {
                asset,
                state: AssetState::Active,
                counter: 0,
                insert: true,
            }],
            ..Default::default()
        }
    }

    fn asset_on(shard: u16, n: u8) -> Uuid {
        (0..=255u8)
            .map(|i| {
                uuid::Builder::from_random_bytes([
                    n, i, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                ])
                .into_uuid()
            })
            .find(|a| shard_of(a, 2) == shard)
            .unwrap()
    }

    #[test]
    fn commits_reload_and_refuse_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let (a, b) = (asset_on(1, 1), asset_on(1, 2));
        {
            let store = SqliteStore::open(&path, 4, Duration::ZERO).unwrap();
            let shard = store.open_shard(1, 2);
            assert_eq!(block_on(shard.load()).unwrap().last_seq, 0);
            block_on(shard.commit(register_batch(1, 1, a))).unwrap();
            // A batch that skips a number is refused and writes nothing.
            match block_on(shard.commit(register_batch(1, 3, b))) {
                Err(StoreError::SequenceGap {
                    shard: 1,
                    expected: 2,
                    found: 3,
                }) => {}
                other => panic!("expected a gap refusal, got {other:?}"),
            }
            block_on(shard.commit(register_batch(1, 2, b))).unwrap();
            // A second appliance cannot open the same file.
            assert!(matches!(
                SqliteStore::open(&path, 4, Duration::ZERO),
                Err(StoreError::Locked(_))
            ));
        }
        let store = SqliteStore::open(&path, 4, Duration::ZERO).unwrap();
        let snapshot = block_on(store.open_shard(1, 2).load()).unwrap();
        assert_eq!(snapshot.last_seq, 2);
        let mut ids: Vec<Uuid> = snapshot.assets.iter().map(|s| s.asset).collect();
        ids.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(ids, expected);
        assert!(block_on(store.open_shard(0, 2).load())
            .unwrap()
            .assets
            .is_empty());
    }

    #[test]
    fn the_wal_stays_bounded_under_steady_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        // A small restart threshold, so that a few thousand commits cross it many times.
        let restart_pages = 512;
        let store =
            SqliteStore::open_with_wal_restart(&path, 4, Duration::ZERO, restart_pages).unwrap();
        let shard = store.open_shard(0, 1);
        block_on(shard.load()).unwrap();
        // Enough single-record transactions to write many times the threshold in frames.
        let mut wal_max = 0;
        for seq in 1..=6000u64 {
            let a =
                uuid::Builder::from_random_bytes(seq.to_be_bytes().repeat(2).try_into().unwrap())
                    .into_uuid();
            block_on(shard.commit(register_batch(0, seq, a))).unwrap();
            if seq % 500 == 0 {
                let wal = std::fs::metadata(dir.path().join("w.db-wal"))
                    .map(|m| m.len())
                    .unwrap_or(0);
                wal_max = wal_max.max(wal);
            }
        }
        let frame_bytes = 4096 + 24;
        let bound = (restart_pages as u64 + 64) * frame_bytes;
        assert!(wal_max > 0, "the WAL was written");
        assert!(
            wal_max <= bound,
            "WAL grew to {wal_max} bytes (bound {bound})"
        );
    }

    #[test]
    fn a_version_1_store_migrates_to_2_keeping_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO custody_keys VALUES ('6ba7b810-9dad-11d1-80b4-00c04fd430c8', 'ACTIVE', 4, 1, 1);
                 INSERT INTO custody_audit_log (shard, seq, event, asset_id, counter, state_at_event,
                     requester, request_id, ts_ms, derivation_path, purpose, region, ttl_s, scheme_version)
                 VALUES (0, 1, 'DERIVE', '6ba7b810-9dad-11d1-80b4-00c04fd430c8', 4, 'ACTIVE', 'old', 9, 5,
                     'm/44''/0''/0''/0''/1', 'TRADING', 'US-EAST', 60, 1);",
            )
            .unwrap();
            // Version 1 refuses the new events.
            assert!(conn
                .execute(
                    "INSERT INTO custody_audit_log (shard, seq, event, asset_id, counter, state_at_event, requester, request_id, ts_ms) VALUES (0, 2, 'ROTATE', 'x', 5, 'ACTIVE', 'r', 1, 6)",
                    [],
                )
                .is_err());
        }
        drop(SqliteStore::open(&path, 1, Duration::ZERO).unwrap());
        let reader = SqliteReader::open(&path).unwrap();
        let rows = reader.audit_rows().unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (
                r.seq,
                r.event,
                r.counter,
                r.requester.as_str(),
                r.rotation_id
            ),
            (1, AuditEvent::Derive, 4, "old", None)
        );
        assert_eq!(r.derivation_path.as_deref(), Some("m/44'/0'/0'/0'/1"));
        let conn = Connection::open(&path).unwrap();
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn.execute(
            "INSERT INTO custody_audit_log (shard, seq, event, asset_id, counter, state_at_event, requester, request_id, ts_ms, rotation_id) VALUES (0, 2, 'ROTATE', 'x', 5, 'ACTIVE', 'r', 1, 6, 'id')",
            [],
        )
        .unwrap();
    }

    #[test]
    fn shards_are_found_by_seeks_not_by_reading_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, 1, Duration::ZERO).unwrap());
        let conn = Connection::open(&path).unwrap();
        // Shards 0, 3 and 7 have records (7 only one), 5 only a checkpoint past its
        // records (all deleted), 3 both.
        let mut sql = String::new();
        for (shard, n) in [(0, 50), (3, 20), (7, 1)] {
            for seq in 1..=n {
                sql += &format!(
                    "INSERT INTO custody_audit_log (shard, seq, event, asset_id, counter, \
                     state_at_event, requester, request_id, ts_ms) \
                     VALUES ({shard}, {seq}, 'REGISTER', 'a', 0, 'ACTIVE', 'r', 1, 1);"
                );
            }
        }
        for (shard, seq) in [(5, 9), (3, 20)] {
            sql += &format!(
                "INSERT INTO custody_audit_checkpoints (shard, seq, hash, mac, ts_ms) \
                 VALUES ({shard}, {seq}, zeroblob(32), zeroblob(32), 1);"
            );
        }
        conn.execute_batch(&sql).unwrap();
        let reader = SqliteReader::open(&path).unwrap();
        assert_eq!(reader.shards().unwrap(), vec![0, 3, 5, 7]);
        // The plan seeks both primary keys; a SCAN of either table reads all of it.
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {SHARDS_SQL}"))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !plan
                .iter()
                .any(|step| step.starts_with("SCAN custody_audit")),
            "{plan:?}"
        );
        assert!(
            plan.iter()
                .filter(|step| step.starts_with("SEARCH custody_audit"))
                .count()
                >= 4,
            "{plan:?}"
        );
        // Only checkpoints left, then nothing at all.
        conn.execute_batch("DELETE FROM custody_audit_log;")
            .unwrap();
        assert_eq!(reader.shards().unwrap(), vec![3, 5]);
        conn.execute_batch("DELETE FROM custody_audit_checkpoints;")
            .unwrap();
        assert!(reader.shards().unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.db");
        drop(SqliteStore::open(&path, 1, Duration::ZERO).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        match SqliteStore::open(&path, 1, Duration::ZERO) {
            Err(StoreError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION))
            }
            other => panic!("expected SchemaTooNew, got {:?}", other.err()),
        }
    }

    #[test]
    fn wal_and_full_sync_are_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("w.db")).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2));
    }
}

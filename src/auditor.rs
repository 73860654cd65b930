//! The appliance's own reconciliation: a thread of its own (never an executor core) that
//! runs [`crate::reconcile`] over the store every `audit.reconcile_interval_s`, from its
//! watermarks (so a run costs in proportion to the new records), and on an auditor's
//! RECONCILE (incremental, or full from scratch). It reads through a connection of its own
//! (SQLite: read-only; PostgreSQL: its own session), so the derive path never waits for
//! it. Findings are logged as structured events and counted for the metrics.

use crate::config::StoreBackend;
use crate::reconcile::{reconcile, FindingKind, Pace, Reconciler, Report};
use crate::seal::cache::{CoreKey, SeedCache};
use crate::store::handoff::{completion, Completer, Pending};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests that may wait for the auditor thread (more are answered BUSY).
const AUDITOR_QUEUE_DEPTH: usize = 4;
/// Findings logged per run (the report has them all; the log says how many were left out).
const FINDINGS_LOGGED_PER_RUN: usize = 100;

/// What the metrics show of the reconciliation.
#[derive(Clone, Debug, Default)]
pub struct AuditorStatus {
    pub runs: u64,
    pub failed_runs: u64,
    pub last_run_unix_ms: u64,
    pub last_duration: Duration,
    pub drift_ratio: f64,
    /// Shards whose chain broke (a reconciler state: it stays until a full run finds the
    /// chain whole again).
    pub broken_shards: u64,
    pub records_checked: u64,
    /// Findings by [`FindingKind`] (in the order of [`FindingKind::ALL`]) over every run.
    pub findings: [u64; 4],
    pub last_error: Option<String>,
}

enum Job {
    Reconcile {
        full: bool,
        done: Completer<Result<Report, String>>,
    },
    Prove {
        shard: u16,
        seq: u64,
        hash: [u8; 32],
        done: Completer<Result<Proof, String>>,
    },
    ListAssets {
        request: AssetQuery,
        done: Completer<Result<Vec<crate::store::ListedRow>, String>>,
    },
}

/// A page of the key table to read: assets after `after` (exclusive), in one state or
/// all, at most `limit` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssetQuery {
    pub state: Option<crate::lifecycle::AssetState>,
    pub after: uuid::Uuid,
    pub limit: u16,
}

/// What proving a receipt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    pub verdict: crate::reconcile::Verdict,
    /// The checkpoint that covers the record (0: none).
    pub checkpoint_seq: u64,
    pub detail: String,
}

/// The records a proof reads at most between a receipt and its checkpoint.
const PROOF_RECORDS_MAX: usize = 200_000;

/// The auditor thread's nice value: it reads and hashes the whole log on a full run, on
/// the cores the shards run on, and yields them to the derive path (the shards run at
/// the process's own priority). It still gets a share of a busy machine, so a run
/// finishes (SCHED_IDLE starved it: docs/benchmarks.md).
pub const AUDITOR_NICE: i32 = 19;

/// Lowers the calling thread's scheduling priority to [`AUDITOR_NICE`] (Linux: a nice
/// value is per thread). A failure is logged: the runs then compete as equals.
fn lower_priority() {
    // SAFETY: gettid and setpriority only read and change the calling thread's own
    // scheduling attributes.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, AUDITOR_NICE)
    };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "the auditor thread keeps the process's priority"
        );
    }
}

/// A handle on the auditor thread.
pub struct Auditor {
    jobs: SyncSender<Job>,
    status: Arc<Mutex<AuditorStatus>>,
}

impl Auditor {
    /// Starts the thread. `interval`: how often it runs on its own (`None`: on demand).
    pub fn spawn(
        backend: StoreBackend,
        cache: Arc<SeedCache>,
        interval: Option<Duration>,
        records_per_s: Option<u64>,
    ) -> std::io::Result<Auditor> {
        let (jobs, rx) = sync_channel::<Job>(AUDITOR_QUEUE_DEPTH);
        let status = Arc::new(Mutex::new(AuditorStatus::default()));
        let shared = status.clone();
        std::thread::Builder::new()
            .name("custody-auditor".into())
            .spawn(move || {
                lower_priority();
                let ex = match glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                    .io_memory(256 * 1024)
                    .make()
                {
                    Ok(ex) => ex,
                    Err(e) => {
                        tracing::error!(error = %e, "the auditor cannot start: no reconciliation will run");
                        return;
                    }
                };
                ex.run(async move {
                    let mut worker = Worker {
                        backend,
                        key: None,
                        cache,
                        reconciler: Reconciler::new(),
                        source: None,
                        status: shared,
                        records_per_s,
                    };
                    // The periodic runs keep their pace whatever the requests in between.
                    let idle = Duration::from_secs(3600);
                    let mut next_run = interval.map(|i| Instant::now() + i);
                    loop {
                        let wait = next_run
                            .map_or(idle, |at| at.saturating_duration_since(Instant::now()));
                        match rx.recv_timeout(wait) {
                            Ok(Job::Reconcile { full, done }) => {
                                done.complete(worker.run(full).await)
                            }
                            Ok(Job::Prove {
                                shard,
                                seq,
                                hash,
                                done,
                            }) => done.complete(worker.prove(shard, seq, &hash).await),
                            Ok(Job::ListAssets { request, done }) => {
                                done.complete(worker.list_assets(request).await)
                            }
                            Err(RecvTimeoutError::Timeout) if next_run.is_some() => {
                                let _ = worker.run(false).await;
                                next_run = interval.map(|i| Instant::now() + i);
                            }
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                });
            })?;
        Ok(Auditor { jobs, status })
    }

    /// Asks for a run; `None` when the queue is full (answer BUSY).
    pub fn request(&self, full: bool) -> Option<Pending<Result<Report, String>>> {
        let (done, pending) = completion();
        match self.jobs.try_send(Job::Reconcile { full, done }) {
            Ok(()) => Some(pending),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => None,
        }
    }

    /// Asks for the proof of a receipt; `None` when the queue is full (answer BUSY).
    pub fn prove(
        &self,
        shard: u16,
        seq: u64,
        hash: [u8; 32],
    ) -> Option<Pending<Result<Proof, String>>> {
        let (done, pending) = completion();
        match self.jobs.try_send(Job::Prove {
            shard,
            seq,
            hash,
            done,
        }) {
            Ok(()) => Some(pending),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => None,
        }
    }

    /// Asks for a page of the key table (LIST_ASSETS) with one row more than the page,
    /// which says whether more follow; `None` when the queue is full (answer BUSY).
    pub fn list_assets(
        &self,
        request: AssetQuery,
    ) -> Option<Pending<Result<Vec<crate::store::ListedRow>, String>>> {
        let (done, pending) = completion();
        match self.jobs.try_send(Job::ListAssets { request, done }) {
            Ok(()) => Some(pending),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => None,
        }
    }

    pub fn status(&self) -> Arc<Mutex<AuditorStatus>> {
        self.status.clone()
    }
}

enum Source {
    Sqlite(std::rc::Rc<crate::store::sqlite::SqliteReader>),
    Postgres(crate::store::postgres::PgAuditSource),
}

struct Worker {
    backend: StoreBackend,
    cache: Arc<SeedCache>,
    key: Option<CoreKey>,
    reconciler: Reconciler,
    source: Option<Source>,
    status: Arc<Mutex<AuditorStatus>>,
    /// `audit.reconcile_records_per_s` (`None`: unpaced).
    records_per_s: Option<u64>,
}

impl Worker {
    async fn open(&self) -> Result<Source, String> {
        match &self.backend {
            StoreBackend::Sqlite { path } => crate::store::sqlite::SqliteReader::open(path)
                .map(|r| Source::Sqlite(std::rc::Rc::new(r)))
                .map_err(|e| e.to_string()),
            StoreBackend::Postgres(pg) => crate::store::postgres::connect(pg)
                .await
                .map(|c| {
                    Source::Postgres(crate::store::postgres::PgAuditSource {
                        client: std::rc::Rc::new(c),
                    })
                })
                .map_err(|e| e.to_string()),
        }
    }

    async fn run(&mut self, full: bool) -> Result<Report, String> {
        let started = Instant::now();
        if full {
            self.reconciler = Reconciler::new();
        }
        if self.source.is_none() {
            match self.open().await {
                Ok(s) => self.source = Some(s),
                Err(e) => return Err(self.failed(format!("cannot read the store: {e}"))),
            }
        }
        if self.key.is_none() {
            self.key = CoreKey::new(self.cache.clone()).ok();
        }
        self.key.as_ref().map(CoreKey::refresh);
        // Checkpoint MACs are checked while unsealed; a seal during the run leaves the rest
        // of its checkpoints unchecked (never reported as forged).
        let key = self.key.as_ref().filter(|k| k.serving());
        let check = |c: &crate::store::Checkpoint| match key
            .and_then(|k| k.checkpoint_mac(c.shard, c.seq, &c.hash))
        {
            Some(mac) => crate::reconcile::mac_eq(&mac, &c.mac),
            None => true,
        };
        let mac: Option<crate::reconcile::MacCheck<'_>> = key.map(|_| &check as _);
        let source: &dyn crate::reconcile::AuditSource = match self.source.as_ref() {
            Some(Source::Sqlite(r)) => r,
            Some(Source::Postgres(p)) => p,
            None => return Err(self.failed("no store connection".into())),
        };
        // Paced: after each page, sleep until the records read so far are due at the
        // configured rate.
        let paced_from = Instant::now();
        let read = std::cell::Cell::new(0u64);
        let rate = self.records_per_s;
        let sleep = |records: usize| -> crate::store::LocalFuture<()> {
            read.set(read.get() + records as u64);
            let due = rate.map_or(Duration::ZERO, |rate| {
                Duration::from_secs_f64(read.get() as f64 / rate.max(1) as f64)
            });
            let wait = (paced_from + due).saturating_duration_since(Instant::now());
            Box::pin(async move {
                if !wait.is_zero() {
                    glommio::timer::sleep(wait).await;
                }
            })
        };
        let pace = Pace {
            page_records: crate::bounds::RECONCILE_PAGE_RECORDS,
            after_page: rate.map(|_| &sleep as _),
        };
        let outcome = reconcile(&mut self.reconciler, source, mac, &pace).await;
        let report = match outcome {
            Ok(r) => r,
            Err(e) => {
                // A new connection next time (the database may have restarted).
                self.source = None;
                return Err(self.failed(format!("reading the store: {e}")));
            }
        };
        for f in report.findings.iter().take(FINDINGS_LOGGED_PER_RUN) {
            tracing::error!(
                kind = f.kind.name(),
                shard = ?f.shard,
                seq = ?f.seq,
                asset = ?f.asset,
                detail = %f.detail,
                "audit reconciliation finding"
            );
        }
        if report.findings.len() > FINDINGS_LOGGED_PER_RUN {
            tracing::error!(
                more = report.findings.len() - FINDINGS_LOGGED_PER_RUN,
                "audit reconciliation: more findings than logged (custody reconcile shows them all)"
            );
        }
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.runs += 1;
        s.last_run_unix_ms = crate::audit::now_ms();
        s.last_duration = started.elapsed();
        s.drift_ratio = report.drift_ratio;
        s.broken_shards = report.shards.values().filter(|m| m.broken).count() as u64;
        s.records_checked += report.records_checked;
        for (i, kind) in FindingKind::ALL.iter().enumerate() {
            s.findings[i] += report.count(*kind) as u64;
        }
        s.last_error = None;
        Ok(report)
    }

    /// A page of the key table, read outside any reconciliation's snapshot.
    async fn list_assets(
        &mut self,
        request: AssetQuery,
    ) -> Result<Vec<crate::store::ListedRow>, String> {
        if self.source.is_none() {
            self.source = Some(
                self.open()
                    .await
                    .map_err(|e| format!("cannot read the store: {e}"))?,
            );
        }
        let source: &dyn crate::reconcile::AuditSource = match self.source.as_ref() {
            Some(Source::Sqlite(r)) => r,
            Some(Source::Postgres(p)) => p,
            None => return Err("no store connection".into()),
        };
        let page = source
            .asset_page(request.after, request.state, usize::from(request.limit) + 1)
            .await;
        page.map_err(|e| {
            self.source = None;
            format!("reading the store: {e}")
        })
    }

    /// Reads the record of a receipt and the chain up to the first checkpoint at or after
    /// it, and proves it ([`crate::reconcile::prove`]).
    async fn prove(&mut self, shard: u16, seq: u64, hash: &[u8; 32]) -> Result<Proof, String> {
        if self.source.is_none() {
            self.source = Some(
                self.open()
                    .await
                    .map_err(|e| format!("cannot read the store: {e}"))?,
            );
        }
        if self.key.is_none() {
            self.key = CoreKey::new(self.cache.clone()).ok();
        }
        self.key.as_ref().map(CoreKey::refresh);
        let source: &dyn crate::reconcile::AuditSource = match self.source.as_ref() {
            Some(Source::Sqlite(r)) => r,
            Some(Source::Postgres(p)) => p,
            None => return Err("no store connection".into()),
        };
        let read = async {
            // A checkpoint at most PROOF_RECORDS_MAX records from the receipt's (inclusive).
            let cps = source
                .checkpoints(shard, seq, seq.saturating_add(PROOF_RECORDS_MAX as u64 - 1))
                .await?;
            let cp = cps.into_iter().next();
            let upto = cp.map_or(1, |c| (c.seq - seq + 1) as usize);
            let rows = source
                .records(shard, seq, upto.min(PROOF_RECORDS_MAX))
                .await?;
            Ok::<_, crate::store::StoreError>((cp, rows))
        };
        let (cp, rows) = match read.await {
            Ok(x) => x,
            Err(e) => {
                self.source = None;
                return Err(format!("reading the store: {e}"));
            }
        };
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let parsed = match &row.row {
                Ok(r) => crate::reconcile::logged_from_row(r),
                Err(why) => Err(why.clone()),
            };
            match parsed {
                Ok(lr) => records.push(lr),
                Err(why) => {
                    return Ok(Proof {
                        verdict: crate::reconcile::Verdict::Broken,
                        checkpoint_seq: 0,
                        detail: format!("record {}: its fields are not a record ({why})", row.seq),
                    })
                }
            }
        }
        // The checkpoint's MAC, checked once here: `None` while sealed (the proof then says
        // the MAC was not checked, never that it failed).
        let verified: Option<bool> = cp.as_ref().and_then(|c| {
            self.key
                .as_ref()
                .and_then(|k| k.checkpoint_mac(c.shard, c.seq, &c.hash))
                .map(|mac| crate::reconcile::mac_eq(&mac, &c.mac))
        });
        let check = move |_: &crate::store::Checkpoint| verified.unwrap_or(false);
        let mac: Option<crate::reconcile::MacCheck<'_>> = verified.map(|_| &check as _);
        let (verdict, detail) = crate::reconcile::prove(seq, hash, &records, cp.as_ref(), mac);
        Ok(Proof {
            verdict,
            checkpoint_seq: match verdict {
                crate::reconcile::Verdict::Proven | crate::reconcile::Verdict::Unauthenticated => {
                    cp.map_or(0, |c| c.seq)
                }
                _ => 0,
            },
            detail,
        })
    }

    fn failed(&self, why: String) -> String {
        tracing::error!(error = %why, "audit reconciliation did not run");
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.failed_runs += 1;
        s.last_error = Some(why.clone());
        why
    }
}

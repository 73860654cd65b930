//! A real appliance for integration tests: `custodyd` started as a process with its own
//! state directory, development certificates and seed, on a free loopback port.

#![allow(dead_code)]

pub mod failover;
pub mod openssl;
pub mod pg;
pub mod pg_pair;
pub mod records;
pub mod require;
pub mod wait;

#[allow(unused_imports)]
pub use require::{missing, runs, services_required};
#[allow(unused_imports)]
pub use wait::{eventually, eventually_in_a_row};

use custody::client::{Client, ClientConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The roles the test client holds unless a test writes its own `[policy]` (which can
/// start from these lines): deriver of every purpose in every default region, operator and
/// auditor, with generous rate limits.
pub const TEST_ROLES: &str = "derivers = [{ identity = \"test-client\", purposes = [\"TRADING\", \"SETTLEMENT\", \"AUDIT\", \"BACKUP\"], regions = [\"US-EAST\", \"EU-WEST\", \"APAC\"] }]\noperators = [\"test-client\"]\nauditors = [\"test-client\"]\nrate_limits = { deriver = \"1000000000/1s\", operator = \"1000000000/1s\", auditor = \"1000000000/1s\", admin = \"1000000000/1s\" }\n";

pub struct TestAppliance {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// The admin listener (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
    child: Option<Child>,
    extra_config: String,
    env: Vec<(String, String)>,
    /// `server.log_level` and `server.log_format`.
    log: (String, String),
    /// More `[server]` lines.
    server_extra: String,
}

impl TestAppliance {
    pub fn start() -> TestAppliance {
        Self::start_with("")
    }

    /// Starts with extra TOML appended to the config (whole sections, e.g. "[limits]\n…").
    pub fn start_with(extra_config: &str) -> TestAppliance {
        let mut app = Self::prepare_with(extra_config);
        app.launch();
        app
    }

    /// Writes the state directory and the config, without starting the appliance.
    pub fn prepare_with(extra_config: &str) -> TestAppliance {
        let dir = tempfile::Builder::new()
            .prefix("custody-test-")
            .tempdir()
            .expect("temp dir");
        // `flood` and `nobody` are identities for the connection-abuse tests
        // (tests/connections.rs); without a [policy] line of their own they hold no role.
        custody::tls::write_dev_certs_with(
            &dir.path().join("certs"),
            "test-client",
            &["flood", "nobody"],
        )
        .expect("dev certs");
        custody::seal::write_dev_seed(&dir.path().join("dev-seed.bin")).expect("dev seed");
        let port = free_port();
        let app = TestAppliance {
            addr: ([127, 0, 0, 1], port).into(),
            admin: ([127, 0, 0, 1], free_port()).into(),
            dir,
            child: None,
            extra_config: extra_config.to_owned(),
            env: Vec::new(),
            log: ("warn".into(), "text".into()),
            server_extra: String::new(),
        };
        app.write_config();
        app
    }

    fn write_config(&self) {
        // Unless the test writes its own [policy], the test client holds every role but
        // admin, with rate limits out of the way of load tests.
        let policy = if self.extra_config.contains("[policy]") {
            String::new()
        } else {
            format!("\n[policy]\n{TEST_ROLES}")
        };
        let text = format!(
            "[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\nmetrics_publish_ms = 100\ncores = 2\nstate_dir = \"{}\"\nlog_level = \"{}\"\nlog_format = \"{}\"\n{}\n\
             [tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n\n{}",
            self.addr,
            self.admin,
            self.dir.path().display(),
            self.log.0,
            self.log.1,
            self.server_extra,
            self.extra_config
        ) + &policy;
        std::fs::write(self.config_path(), text).expect("config");
    }

    /// Sets an environment variable for every custodyd (and custody) this runs.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Runs `custody ARGS` (the CLI) to completion with this appliance's environment.
    pub fn custody(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_custody"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .output()
            .expect("run custody")
    }

    /// Adds `[server]` lines (before the appliance starts).
    pub fn set_server(&mut self, lines: &str) {
        self.server_extra = lines.to_owned();
        self.write_config();
    }

    /// Sets `server.log_level` and `server.log_format` (before the appliance starts).
    pub fn set_log(&mut self, level: &str, format: &str) {
        self.log = (level.to_owned(), format.to_owned());
        self.write_config();
    }

    /// Runs `custody` with `args` (which ask for `--json`): its exit code and its report.
    pub fn custody_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let out = self.custody(args);
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), report)
    }

    /// Rewrites the config with other extra sections (the appliance must be stopped).
    pub fn reconfigure(&mut self, extra_config: &str) {
        self.extra_config = extra_config.to_owned();
        self.write_config();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("custody.toml")
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("custody.db")
    }

    pub fn seed(&self) -> [u8; 32] {
        std::fs::read(self.dir.path().join("dev-seed.bin"))
            .expect("seed")
            .try_into()
            .expect("32 bytes")
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            addr: self.addr,
            server_name: "localhost".into(),
            ca: self.certs().join("ca.pem"),
            cert: self.certs().join("client.pem"),
            key: self.certs().join("client.key"),
        }
    }

    /// Starts custodyd and waits until it answers HELLO over TLS.
    pub fn launch(&mut self) {
        self.launch_until("serving", |hello| hello.is_ok());
    }

    /// Starts custodyd and waits until it answers as a standby (NOT_ACTIVE).
    pub fn launch_standby(&mut self) {
        self.launch_until(
            "a standby",
            |hello| matches!(hello, Err(e) if e.status() == Some(custody::wire::Status::NotActive)),
        );
    }

    /// Starts custodyd and waits (at most 30 s) until its answer to HELLO passes `ready`.
    pub fn launch_until(
        &mut self,
        what: &str,
        ready: impl Fn(Result<custody::op::HelloInfo, custody::client::ClientError>) -> bool,
    ) {
        self.spawn_only();
        let deadline = Instant::now() + Duration::from_secs(30);
        let rt = runtime();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("custodyd exited with {status}:\n{}", self.log());
            }
            let answered = rt.block_on(async {
                match Client::connect(&self.client_config()).await {
                    Ok(c) => Some(c.hello().await),
                    Err(_) => None,
                }
            });
            if answered.is_some_and(&ready) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "custodyd not {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts custodyd without waiting for it to serve.
    pub fn spawn_only(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("custodyd.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_custodyd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn custodyd");
        self.child = Some(child);
    }

    /// Runs `custodyd ARGS --config <this config>` to completion.
    pub fn custodyd(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_custodyd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .expect("run custodyd")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("custodyd.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for the appliance to exit by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().ok().flatten() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for TestAppliance {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The first of `n` consecutive loopback ports nobody listens on now.
/// A child process killed (and reaped) when the guard drops, a failed test's too.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_ports(n: u16) -> u16 {
    custody::net::free_loopback_ports(n).expect("free loopback ports")
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `GET path` on the admin listener: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin listener");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let code = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A version-4 UUID from a number (deterministic per test).
pub fn asset(n: u64) -> uuid::Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b[8..].copy_from_slice(&0x5eed_u64.to_be_bytes());
    uuid::Builder::from_random_bytes(b).into_uuid()
}

pub fn derive_body(asset: uuid::Uuid, path: &str) -> custody::op::DeriveBody {
    custody::op::DeriveBody {
        asset,
        path: path.into(),
        region: "US-EAST".into(),
        purpose: 1,
        ttl_s: 300,
    }
}

pub fn read_audit(db: &Path) -> Vec<custody::store::sqlite::AuditRow> {
    custody::store::sqlite::SqliteReader::open(db)
        .expect("open db")
        .audit_rows()
        .expect("audit rows")
}

/// A fresh PostgreSQL database on the server of `CUSTODY_TEST_DATABASE_URL`, as the
/// `[store]` section that points an appliance at it; dropped with the guard. `None` (with a
/// notice) when the variable is unset, unless `CUSTODY_REQUIRE_SERVICES=1`. The database
/// itself is [`pg::TempDatabase`], the one the load harness and the benchmarks use.
pub use pg::TempDatabase as PgDatabase;

impl PgDatabase {
    /// The server's own database from `CUSTODY_TEST_DATABASE_URL` (for admin statements).
    pub fn admin_config() -> custody::store::postgres::PgConfig {
        Self::parse_url(
            &std::env::var("CUSTODY_TEST_DATABASE_URL").expect("CUSTODY_TEST_DATABASE_URL"),
        )
    }

    /// The connection settings of a `postgresql://` URL.
    pub fn parse_url(url: &str) -> custody::store::postgres::PgConfig {
        custody::store::postgres::PgConfig::from_url(url).expect("CUSTODY_TEST_DATABASE_URL")
    }

    pub fn create(tag: &str) -> Option<PgDatabase> {
        let Ok(url) = std::env::var("CUSTODY_TEST_DATABASE_URL") else {
            missing("PostgreSQL", &"CUSTODY_TEST_DATABASE_URL is not set");
            return None;
        };
        let name = format!("custody_it_{tag}_{}", std::process::id());
        let db = PgDatabase::new(Self::parse_url(&url), &name)
            .unwrap_or_else(|e| panic!("a fresh PostgreSQL database {name}: {e}"));
        Some(db)
    }

    /// Runs statements on this database (tests that tamper with it).
    pub fn sql(&self, statements: Vec<String>) {
        let config = self.config.clone();
        on_executor(move || async move {
            let c = custody::store::postgres::connect(&config)
                .await
                .expect("PostgreSQL reachable");
            for sql in statements {
                c.batch_execute(&sql).await.expect("statement");
            }
        });
    }

    /// Every audit row as (shard, seq, event, asset, counter), in (shard, seq) order.
    pub fn audit_rows(&self) -> Vec<(u16, u64, String, uuid::Uuid, u64)> {
        let config = self.config.clone();
        on_executor(move || async move {
            let c = custody::store::postgres::connect(&config)
                .await
                .expect("connect");
            custody::store::postgres::audit_rows(&c)
                .await
                .expect("audit rows")
        })
    }

    /// Every asset's stored counter.
    pub fn counters(&self) -> std::collections::HashMap<uuid::Uuid, u64> {
        let config = self.config.clone();
        on_executor(move || async move {
            let c = custody::store::postgres::connect(&config)
                .await
                .expect("connect");
            let rows = c
                .query("SELECT asset_id, derivation_counter FROM custody_keys", &[])
                .await
                .expect("counters");
            rows.iter()
                .map(|r| (r.get::<_, uuid::Uuid>(0), r.get::<_, i64>(1) as u64))
                .collect()
        })
    }

    /// The `[store]` section for an appliance config.
    pub fn store_section(&self) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\npostgres_host = \"{}\"\npostgres_port = {}\npostgres_user = \"{}\"\npostgres_dbname = \"{}\"\npostgres_owner_lease_ms = 1000\npostgres_owner_lease_margin_ms = 200\n",
            self.config.hosts_text(),
            self.config.hosts.first().map_or(5432, |h| h.addr.port()),
            self.config.user,
            self.config.dbname
        )
    }
}

/// Runs a future on a fresh glommio executor on its own thread (PostgreSQL connections
/// are driven by the executor that made them).
pub fn on_executor<T, F>(make: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + 'static,
{
    custody::store::postgres::on_own_executor("custody-test-db", make).expect("executor thread")
}

/// Derivations driven from a thread of its own until finished: `connections` ×
/// `lanes` pipelined lanes over `assets` (registered beforehand). STORE_UNAVAILABLE is
/// counted, with the slowest; a closed connection ends its lanes and is counted; any
/// other error fails the test.
pub struct BackgroundLoad {
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<(uuid::Uuid, u64, custody::wire::Receipt)>>>,
    unavailable: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    slowest_refusal: std::sync::Arc<std::sync::Mutex<Duration>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// What a [`BackgroundLoad`] saw.
pub struct LoadOutcome {
    /// Every acknowledged derivation: (asset, counter, receipt).
    pub acknowledged: Vec<(uuid::Uuid, u64, custody::wire::Receipt)>,
    pub unavailable: usize,
    pub closed: usize,
    pub slowest_refusal: Duration,
}

impl BackgroundLoad {
    pub fn start(
        config: ClientConfig,
        assets: Vec<uuid::Uuid>,
        connections: usize,
        lanes: usize,
    ) -> BackgroundLoad {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
        let unavailable = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let slowest_refusal = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ack, unav, clo, slow, st) = (
            acknowledged.clone(),
            unavailable.clone(),
            closed.clone(),
            slowest_refusal.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut tasks = Vec::new();
                for c in 0..connections {
                    let client = Arc::new(Client::connect(&config).await.expect("connect"));
                    for lane in 0..lanes {
                        let (client, ack, unav, clo, slow, st, assets) = (
                            client.clone(),
                            ack.clone(),
                            unav.clone(),
                            clo.clone(),
                            slow.clone(),
                            st.clone(),
                            assets.clone(),
                        );
                        tasks.push(tokio::spawn(async move {
                            let mut i = 0usize;
                            while !st.load(Ordering::Relaxed) {
                                i += 1;
                                let a = assets[(c * lanes + lane + i) % assets.len()];
                                let sent = Instant::now();
                                match client
                                    .derive(derive_body(a, &format!("m/44'/0'/0'/0'/{i}")))
                                    .await
                                {
                                    Ok(d) => ack.lock().unwrap().push((a, d.counter, d.receipt)),
                                    // The store is away: its commits fail, or (on
                                    // PostgreSQL) the lease cannot be renewed and the
                                    // appliance stops acknowledging until it can.
                                    Err(e)
                                        if matches!(
                                            e.status(),
                                            Some(
                                                custody::wire::Status::StoreUnavailable
                                                    | custody::wire::Status::NotActive
                                            )
                                        ) =>
                                    {
                                        unav.fetch_add(1, Ordering::Relaxed);
                                        let took = sent.elapsed();
                                        {
                                            let mut slowest = slow.lock().unwrap();
                                            *slowest = (*slowest).max(took);
                                        }
                                        tokio::time::sleep(Duration::from_millis(5)).await;
                                    }
                                    Err(custody::client::ClientError::Closed) => {
                                        clo.fetch_add(1, Ordering::Relaxed);
                                        return;
                                    }
                                    Err(e) => panic!("unexpected error under load: {e}"),
                                }
                            }
                        }));
                    }
                }
                for t in tasks {
                    t.await.expect("load task");
                }
            })
        });
        BackgroundLoad {
            acknowledged,
            unavailable,
            closed,
            slowest_refusal,
            stop,
            thread,
        }
    }

    pub fn acknowledged(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Waits (at most 30 s, else fails with `what`) until `n` derivations are acknowledged.
    pub fn wait_for(&self, n: usize, what: &str) {
        eventually(Duration::from_secs(30), || match self.acknowledged() {
            done if done >= n => Ok(()),
            done => Err(format!("{what}: {done} acknowledged")),
        });
    }

    /// Stops the lanes (each finishes the request it has out) and reports.
    pub fn finish(self) -> LoadOutcome {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("load thread");
        let acknowledged = std::mem::take(&mut *self.acknowledged.lock().unwrap());
        LoadOutcome {
            acknowledged,
            unavailable: self.unavailable.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            slowest_refusal: *self.slowest_refusal.lock().unwrap(),
        }
    }
}

/// Registers `assets` on the running appliance (one connection, one by one).
pub fn register_all(app: &TestAppliance, assets: &[uuid::Uuid]) {
    runtime().block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        for a in assets {
            client.register(*a).await.unwrap();
        }
    });
}

/// Every acknowledged derivation (asset, counter, receipt) has the audit record its
/// receipt names in the SQLite store at `db`, with its asset and counter.
pub fn assert_acknowledged_are_audited(
    db: &Path,
    acknowledged: &[(uuid::Uuid, u64, custody::wire::Receipt)],
) -> Vec<custody::store::sqlite::AuditRow> {
    let rows = read_audit(db);
    let by_receipt: std::collections::HashMap<(u16, u64), &custody::store::sqlite::AuditRow> =
        rows.iter().map(|r| ((r.shard, r.seq), r)).collect();
    for (a, counter, receipt) in acknowledged {
        let row = by_receipt
            .get(&(receipt.shard, receipt.seq))
            .unwrap_or_else(|| panic!("acknowledged {receipt:?} has no audit record"));
        assert_eq!((row.asset, row.counter), (*a, *counter));
    }
    rows
}

/// Drives 4 connections × 16 pipelined lanes of derivations over `assets` until at least
/// `kill_after` are acknowledged, then SIGKILLs the appliance mid-load. Returns every
/// acknowledged derivation as (asset, counter, receipt); any other error than the
/// connection closing fails the test.
pub fn derive_until_sigkill(
    app: &mut TestAppliance,
    assets: &[uuid::Uuid],
    kill_after: usize,
) -> Vec<(uuid::Uuid, u64, custody::wire::Receipt)> {
    let pid = app.pid().expect("running") as i32;
    let load = BackgroundLoad::start(app.client_config(), assets.to_vec(), 4, 16);
    load.wait_for(kill_after + 1, "load before the kill");
    // SAFETY: sending SIGKILL to our own child process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let outcome = load.finish();
    app.kill9();
    assert_eq!(outcome.unavailable, 0, "no refusals before the kill");
    assert!(outcome.acknowledged.len() > kill_after);
    outcome.acknowledged
}

/// LIST_ASSETS against a running appliance, whatever its store: registers `n` assets
/// from `first`, suspends one, and checks that paging (pages of 7) walks every one in id
/// order with its state, counter, shard and change time, and that a state filter holds.
pub fn check_asset_listing(app: &TestAppliance, first: u64, n: u64) {
    use custody::lifecycle::AssetState;
    let mut mine: Vec<uuid::Uuid> = (0..n).map(|i| asset(first + i)).collect();
    mine.sort();
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        for a in &mine {
            c.register(*a).await.unwrap();
        }
        c.suspend(mine[1]).await.unwrap();
        c.rotate(mine[2], uuid::Uuid::new_v4(), None).await.unwrap();
        let shards = c.hello().await.unwrap().shard_count;
        let mut walked = Vec::new();
        let mut after = uuid::Uuid::nil();
        loop {
            let page = c.list_assets(None, after, 7).await.unwrap();
            assert!(page.assets.len() <= 7);
            walked.extend(page.assets.iter().copied());
            match page.assets.last() {
                Some(last) if page.more => after = last.asset,
                _ => break,
            }
        }
        let ids: Vec<uuid::Uuid> = walked.iter().map(|a| a.asset).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "in asset id order");
        for a in &mine {
            assert!(ids.contains(a), "{a} is listed");
        }
        let find = |id: &uuid::Uuid| walked.iter().find(|a| a.asset == *id).copied().unwrap();
        assert_eq!(find(&mine[1]).state, AssetState::Suspended);
        assert_eq!(find(&mine[2]).counter, 1);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for a in &mine {
            let l = find(a);
            assert_eq!(l.shard, custody::placement::shard_of(a, shards));
            assert!(l.changed_unix_ms <= now_ms + 1_000 && l.changed_unix_ms > now_ms - 600_000);
        }
        let suspended = c
            .list_assets(Some(AssetState::Suspended), uuid::Uuid::nil(), 256)
            .await
            .unwrap();
        assert!(suspended
            .assets
            .iter()
            .all(|a| a.state == AssetState::Suspended));
        assert!(suspended.assets.iter().any(|a| a.asset == mine[1]));
        // A limit outside 1-256 is a bad body.
        let zero = custody::op::Request::ListAssets(custody::op::ListAssets {
            state: None,
            after: uuid::Uuid::nil(),
            limit: 0,
        });
        match c.call(&zero).await.unwrap() {
            custody::op::Reply::Refused(r) => {
                assert_eq!(r.status, custody::wire::Status::BadBody, "{r:?}")
            }
            other => panic!("limit 0 answered {other:?}"),
        }
    });
}

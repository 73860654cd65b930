//! The article's design as a target of the same schedule (`custody-load article`): one
//! PostgreSQL transaction per request, serialised per asset by an advisory lock and a
//! row lock, the audit row inserted in the same transaction (`bench/article/schema.sql`
//! and `derive.sql` are the same statements for pgbench). The key itself is computed in
//! the caller with HMAC-SHA256, as the article's service does. Rotations move the counter
//! without an audit row (the article audits derivations only: ERRATA, flaw 3).

use crate::stats::Answer;
use crate::target::{Done, Route, Target};
use crate::workload::Op;
use anyhow::Context as _;
use custody::store::postgres::PgConfig;
use hmac::{Hmac, Mac};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// The article's tables, from the pgbench version of the comparison.
const SCHEMA: &str = include_str!("../article/schema.sql");

struct Job {
    i: u64,
    op: Op,
    asset: usize,
    done: Done,
}

/// One worker per PostgreSQL connection, each running one transaction at a time.
pub struct ArticleTarget {
    workers: Vec<UnboundedSender<Job>>,
}

impl Target for ArticleTarget {
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, _: Route, done: Done) {
        if let Err(e) = self.workers[conn].send(Job { i, op, asset, done }) {
            (e.0.done)(Answer::Error("CONNECTION_CLOSED".into()), None);
        }
    }
}

/// Connects over tokio (the harness's runtime), without TLS.
async fn connect(config: &PgConfig) -> anyhow::Result<tokio_postgres::Client> {
    let host = config
        .hosts
        .first()
        .context("the database config names no host")?;
    let tcp = tokio::net::TcpStream::connect(host.addr).await?;
    tcp.set_nodelay(true)?;
    let (client, connection) = config
        .driver_config()
        .connect_raw(tcp, tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Makes the article's tables with `assets` keys and starts `connections` workers on
/// the current tokio runtime.
pub async fn start(
    config: &PgConfig,
    connections: usize,
    assets: usize,
) -> anyhow::Result<ArticleTarget> {
    let admin = connect(config).await?;
    admin.batch_execute(SCHEMA).await?;
    admin
        .batch_execute(&format!(
            "TRUNCATE article_keys; INSERT INTO article_keys \
             SELECT i, md5(i::text)::uuid, 'ACTIVE', 0 FROM generate_series(1, {assets}) AS i; \
             ANALYZE article_keys;"
        ))
        .await?;
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let client = connect(config).await?;
        let (tx, rx) = unbounded_channel();
        tokio::spawn(worker(client, rx));
        workers.push(tx);
    }
    Ok(ArticleTarget { workers })
}

/// Derivations the article's audit log holds.
pub async fn audit_rows(config: &PgConfig) -> anyhow::Result<u64> {
    let client = connect(config).await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM article_audit_log", &[])
        .await?
        .get(0);
    Ok(n as u64)
}

/// The statements, prepared once per connection: a derivation then costs the round trips
/// pgbench's simple protocol does (BEGIN, lock, row, INSERT, COMMIT), no more.
struct Statements {
    lock: tokio_postgres::Statement,
    row: tokio_postgres::Statement,
    insert: tokio_postgres::Statement,
    rotate: tokio_postgres::Statement,
    status: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(c: &tokio_postgres::Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock: c.prepare("SELECT pg_advisory_xact_lock($1)").await?,
            row: c
                .prepare(
                    "SELECT asset_id, state, derivation_counter FROM article_keys WHERE asset_num = $1 FOR UPDATE",
                )
                .await?,
            insert: c
                .prepare(
                    "INSERT INTO article_audit_log (asset_id, derivation_path, counter, state_at_derivation, ts) \
                     VALUES ($1, $2, $3, $4, now())",
                )
                .await?,
            rotate: c
                .prepare(
                    "UPDATE article_keys SET derivation_counter = derivation_counter + 1 WHERE asset_num = $1",
                )
                .await?,
            status: c
                .prepare("SELECT state, derivation_counter FROM article_keys WHERE asset_num = $1")
                .await?,
        })
    }
}

async fn worker(mut client: tokio_postgres::Client, mut jobs: UnboundedReceiver<Job>) {
    // A fixed stand-in for the article's root seed: the HMAC's cost is what matters.
    let seed = [7u8; 32];
    let statements = Statements::prepare(&client).await;
    while let Some(job) = jobs.recv().await {
        // Asset numbers start at 1 in the article's table.
        let n = job.asset as i32 + 1;
        let outcome = match &statements {
            Err(e) => Err(e.to_string()),
            Ok(s) => match job.op {
                Op::Derive => derive(&mut client, s, n, job.i, &seed).await,
                Op::Rotate => rotate(&mut client, s, n).await,
                Op::Status => client.query_one(&s.status, &[&n]).await.map(|_| ()),
            }
            .map_err(|e| match e.code() {
                Some(code) => code.code().to_owned(),
                None if e.is_closed() => "connection closed".to_owned(),
                None => e.to_string(),
            }),
        };
        let answer = match outcome {
            Ok(()) => Answer::Ok,
            Err(e) => Answer::Error(format!("POSTGRES: {e}")),
        };
        (job.done)(answer, None);
    }
}

/// DeriveAssetKey: advisory lock, row lock, the key, the audit row, COMMIT.
async fn derive(
    client: &mut tokio_postgres::Client,
    s: &Statements,
    n: i32,
    i: u64,
    seed: &[u8; 32],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(&s.lock, &[&i64::from(n)]).await?;
    let row = tx.query_one(&s.row, &[&n]).await?;
    let asset: uuid::Uuid = row.get(0);
    let state: String = row.get(1);
    let counter: i64 = row.get(2);
    let path = format!("m/44'/0'/0'/0'/{}", i % 1000);
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(seed).expect("any key length");
    mac.update(asset.as_bytes());
    mac.update(path.as_bytes());
    mac.update(&counter.to_be_bytes());
    std::hint::black_box(mac.finalize().into_bytes());
    tx.execute(&s.insert, &[&asset, &path, &counter, &state])
        .await?;
    tx.commit().await
}

/// RotateAssetKey: the same locks, the counter moved on, COMMIT (no audit row).
async fn rotate(
    client: &mut tokio_postgres::Client,
    s: &Statements,
    n: i32,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(&s.lock, &[&i64::from(n)]).await?;
    tx.execute(&s.rotate, &[&n]).await?;
    tx.commit().await
}

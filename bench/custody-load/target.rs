//! Where the schedule's requests go: the [`Target`] trait, and custody over its wire
//! protocol ([`CustodyTarget`]: per connection slot a connection that follows the active
//! among `--addr`'s endpoints, or a shard-aware client; the assets it registered), with how
//! the harness connects to an appliance.

use crate::cli::Options;
use crate::failover::{tls_of, FollowingConn, Via};
use crate::stats::{Answer, Recorder};
use crate::workload::Op;
use anyhow::bail;
use custody::client::{ClientConfig, ClientError, FailoverClient, FailoverConfig, ShardedClient};
use custody::op::{DeriveBody, Reply, Request};
use custody::wire::{Receipt, Status};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// A derivation's receipt, with the asset and counter it must show in the audit log.
pub type Kept = (Receipt, Uuid, u64);
/// The recorder the reply callbacks share.
pub type SharedRecorder = Arc<Mutex<Recorder<Kept>>>;

/// What a target calls once per request with its answer (and, acknowledged, where from and
/// what the audit log must show).
pub type Done = Box<dyn FnOnce(Answer, Option<Ack>) + Send>;

/// An acknowledged request: the endpoint (index in `--addr`) that acknowledged it, and for
/// a DERIVE or a ROTATE the record the audit log must hold.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub endpoint: u16,
    pub record: Option<AckedRecord>,
}

/// An acknowledged DERIVE's or ROTATE's record: asset, counter (a ROTATE's new one), receipt.
#[derive(Clone, Copy, Debug)]
pub struct AckedRecord {
    pub op: Op,
    pub asset: Uuid,
    pub counter: u64,
    pub receipt: Receipt,
}

/// Where the schedule's requests go: custody over its wire protocol, or the article's
/// design on PostgreSQL (`custody-load article`).
pub trait Target {
    /// Starts request `i` (`op` on asset number `asset`) on connection `conn`.
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, route: Route, done: Done);

    /// Whether connection `conn` can take a request now (a following connection between
    /// two endpoints cannot).
    fn ready(&self, _conn: usize) -> bool {
        true
    }
}

/// Which kind of client a request goes through (`--clients`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The shared port; the appliance hands it to the owning core if need be.
    Plain,
    /// Its shard's own port (`custody::client::ShardedClient`).
    ShardAware,
}

/// The kinds of client a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    Plain,
    ShardAware,
    /// Every other request each way, so both are measured in the same run.
    Both,
}

impl Clients {
    pub fn parse(text: &str) -> anyhow::Result<Clients> {
        match text {
            "plain" => Ok(Clients::Plain),
            "shard-aware" => Ok(Clients::ShardAware),
            "both" => Ok(Clients::Both),
            _ => bail!("--clients is plain, shard-aware or both, not {text:?}"),
        }
    }

    pub fn route(self, i: u64) -> Route {
        match self {
            Clients::Plain => Route::Plain,
            Clients::ShardAware => Route::ShardAware,
            Clients::Both if i % 2 == 0 => Route::Plain,
            Clients::Both => Route::ShardAware,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Clients::Plain => "plain",
            Clients::ShardAware => "shard-aware",
            Clients::Both => "both",
        }
    }
}

/// The harness's client settings for the appliance at `addr`, certificates in `certs`.
pub fn client_config(addr: SocketAddr, certs: &Path) -> ClientConfig {
    ClientConfig {
        addr,
        server_name: "localhost".into(),
        ca: certs.join("ca.pem"),
        cert: certs.join("client.pem"),
        key: certs.join("client.key"),
    }
}

/// The harness's settings for the appliances at `endpoints` (`--addr`), certificates in
/// `certs`.
pub fn failover_config(endpoints: &[SocketAddr], certs: &Path) -> FailoverConfig {
    FailoverConfig::new(endpoints.to_vec(), &client_config(endpoints[0], certs))
}

/// custody over TLS: the registered assets, and per connection slot a connection that
/// follows the active and (`--clients shard-aware|both`, one endpoint) a shard-aware one.
pub struct CustodyTarget {
    conns: Vec<Arc<FollowingConn>>,
    sharded: Vec<Arc<ShardedClient>>,
    pub assets: Vec<Uuid>,
    seed: u64,
}

impl CustodyTarget {
    /// Opens `--connections` connections of each kind the run uses, then registers the
    /// assets; with the appliance's shard count (from HELLO).
    pub async fn connect(
        o: &Options,
        config: &FailoverConfig,
        seed: u64,
    ) -> anyhow::Result<(CustodyTarget, u16)> {
        let tls = tls_of(config)?;
        let mut conns = Vec::with_capacity(o.connections);
        for _ in 0..o.connections {
            conns.push(FollowingConn::connect(config, tls.clone()).await?);
        }
        let mut sharded = Vec::new();
        if o.clients != Clients::Plain {
            if config.endpoints.len() > 1 {
                bail!(
                    "--clients {} takes one --addr (shard-aware clients do not follow the active)",
                    o.clients.name()
                );
            }
            let one = config.client_config(config.endpoints[0]);
            for _ in 0..o.connections {
                let c = ShardedClient::connect(&one).await?;
                if !c.is_shard_aware() {
                    bail!("--clients {}: the appliance announces no per-shard ports (server.shard_listen)", o.clients.name());
                }
                sharded.push(Arc::new(c));
            }
        }
        let registrar = Arc::new(FailoverClient::new(config.clone())?);
        let hello = registrar.hello().await?;
        let assets = register_assets(&registrar, o.assets, seed).await?;
        let target = CustodyTarget {
            conns,
            sharded,
            assets,
            seed,
        };
        Ok((target, hello.shard_count))
    }

    /// Endpoint switches of the connections (connections made after each one's first).
    pub fn reconnects(&self) -> u64 {
        self.conns
            .iter()
            .map(|c| c.reconnects.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Request `i`: `op` on `asset`.
    fn request(&self, i: u64, op: Op, asset: Uuid) -> Request {
        match op {
            Op::Rotate => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&i.to_le_bytes());
                id[8..].copy_from_slice(&(self.seed ^ crate_run_nonce()).to_le_bytes());
                Request::Rotate(custody::op::RotateBody {
                    asset,
                    rotation_id: uuid::Builder::from_random_bytes(id).into_uuid(),
                    expected_counter: None,
                })
            }
            Op::Status => Request::Status { asset },
            Op::Derive => Request::Derive(DeriveBody {
                asset,
                path: format!("m/44'/0'/0'/0'/{}", i % 1000),
                region: "US-EAST".into(),
                purpose: 1,
                ttl_s: 300,
            }),
        }
    }
}

/// How the reply to `op` on `asset` counts, and (acknowledged) the endpoint and record.
fn answer_of(
    op: Op,
    asset: Uuid,
    result: Result<Reply, ClientError>,
    via: Via,
) -> (Answer, Option<Ack>) {
    let record = |counter, receipt| AckedRecord {
        op,
        asset,
        counter,
        receipt,
    };
    let answer = match result {
        Ok(Reply::Derived(d)) if op == Op::Derive => {
            let record = Some(record(d.counter, d.receipt));
            return (
                Answer::Ok,
                Some(Ack {
                    endpoint: via.endpoint,
                    record,
                }),
            );
        }
        Ok(Reply::Rotated(r)) if op == Op::Rotate => {
            let record = Some(record(r.counter, r.receipt));
            return (
                Answer::Ok,
                Some(Ack {
                    endpoint: via.endpoint,
                    record,
                }),
            );
        }
        Ok(Reply::Asset(_)) if op == Op::Status => {
            return (
                Answer::Ok,
                Some(Ack {
                    endpoint: via.endpoint,
                    record: None,
                }),
            );
        }
        // Another rotation of the asset is being committed: the documented
        // answer (retry), not a failure.
        Ok(Reply::Refused(r)) if op == Op::Rotate && r.status == Status::Busy => {
            Answer::RotationBusy
        }
        Ok(Reply::Refused(r)) => Answer::Error(r.status.name().to_owned()),
        Ok(_) => Answer::Error("UNEXPECTED_REPLY".to_owned()),
        // In flight when the connection closed: it may have run.
        Err(ClientError::Closed) => Answer::Error(OUTCOME_UNKNOWN.to_owned()),
        Err(e) => Answer::Error(format!("CLIENT: {e}")),
    };
    (answer, None)
}

/// The error name of a request in flight when its connection closed.
pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";
/// The error name of a request whose connection was found gone as it was started (not sent).
pub const NOT_SENT: &str = "NOT_SENT";

impl Target for CustodyTarget {
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, route: Route, done: Done) {
        let asset = self.assets[asset];
        let request = self.request(i, op, asset);
        if let (Route::ShardAware, Some(c)) = (route, self.sharded.get(conn)) {
            let via = Via::FIRST;
            return c.start(
                &request,
                Box::new(move |result| {
                    let (answer, ack) = answer_of(op, asset, result, via);
                    done(answer, ack);
                }),
            );
        }
        let conn = &self.conns[conn];
        let Some((client, via)) = conn.lease() else {
            return done(Answer::Error(NOT_SENT.to_owned()), None);
        };
        let conn = conn.clone();
        client.start(
            &request,
            Box::new(move |result| {
                conn.heard(&result, via);
                let (answer, ack) = answer_of(op, asset, result, via);
                done(answer, ack);
            }),
        );
    }

    fn ready(&self, conn: usize) -> bool {
        self.conns[conn].is_live()
    }
}

/// Registers `n` assets over `clients` (an asset that exists already counts as
/// registered: a run again against the same appliance).
async fn register_assets(
    client: &Arc<FailoverClient>,
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<Uuid>> {
    // Bounded concurrency: the appliance answers BUSY past its per-connection limit.
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = client.clone();
        // Deterministic version-4 style ids, different per run seed.
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
        bytes[8..].copy_from_slice(&(seed ^ crate_run_nonce()).to_be_bytes());
        let asset = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let permit = limit.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            match client.register(asset).await {
                Ok(_) => Ok(asset),
                Err(ClientError::Refused(r)) if r.status == Status::AssetExists => Ok(asset),
                Err(e) => Err(e),
            }
        }));
    }
    let mut assets = Vec::with_capacity(n);
    for t in tasks {
        assets.push(t.await??);
    }
    Ok(assets)
}

/// A per-process nonce so that repeated runs against one appliance use fresh assets.
fn crate_run_nonce() -> u64 {
    use std::sync::OnceLock;
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_be_bytes(b)
    })
}

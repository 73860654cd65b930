//! Where the schedule's requests go: the [`Target`] trait, and custody over its wire
//! protocol ([`CustodyTarget`]: a plain or a shard-aware client per connection slot, the
//! assets it registered), with how the harness connects to an appliance.

use crate::cli::Options;
use crate::stats::{Answer, Recorder};
use crate::workload::Op;
use anyhow::bail;
use custody::client::{Client, ClientConfig, ClientError, ShardedClient};
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

/// What a target calls once per request with its answer (and a derivation's receipt).
pub type Done = Box<dyn FnOnce(Answer, Option<Kept>) + Send>;

/// Where the schedule's requests go: custody over its wire protocol, or the article's
/// design on PostgreSQL (`custody-load article`).
pub trait Target {
    /// Starts request `i` (`op` on asset number `asset`) on connection `conn`.
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, route: Route, done: Done);
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

/// custody over TLS: the registered assets, and per connection slot a plain client
/// and (`--clients shard-aware|both`) a shard-aware one.
pub struct CustodyTarget {
    clients: Vec<Arc<Client>>,
    sharded: Vec<Arc<ShardedClient>>,
    pub assets: Vec<Uuid>,
    seed: u64,
}

impl CustodyTarget {
    /// Opens `--connections` connections of each kind the run uses, then registers the
    /// assets; with the appliance's shard count (from HELLO).
    pub async fn connect(
        o: &Options,
        config: &ClientConfig,
        seed: u64,
    ) -> anyhow::Result<(CustodyTarget, u16)> {
        let mut clients = Vec::with_capacity(o.connections);
        for _ in 0..o.connections {
            clients.push(Arc::new(Client::connect(config).await?));
        }
        let mut sharded = Vec::new();
        if o.clients != Clients::Plain {
            for _ in 0..o.connections {
                let c = ShardedClient::connect(config).await?;
                if !c.is_shard_aware() {
                    bail!("--clients {}: the appliance announces no per-shard ports (server.shard_listen)", o.clients.name());
                }
                sharded.push(Arc::new(c));
            }
        }
        let hello = clients[0].hello().await?;
        let assets = register_assets(&clients, o.assets, seed).await?;
        let target = CustodyTarget {
            clients,
            sharded,
            assets,
            seed,
        };
        Ok((target, hello.shard_count))
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

/// How the reply to `op` on `asset` counts (and a derivation's receipt, to look up).
fn answer_of(op: Op, asset: Uuid, result: Result<Reply, ClientError>) -> (Answer, Option<Kept>) {
    let answer = match result {
        Ok(Reply::Derived(d)) if op == Op::Derive => {
            return (Answer::Ok, Some((d.receipt, asset, d.counter)));
        }
        Ok(Reply::Rotated(_)) if op == Op::Rotate => Answer::Ok,
        Ok(Reply::Asset(_)) if op == Op::Status => Answer::Ok,
        // Another rotation of the asset is being committed: the documented
        // answer (retry), not a failure.
        Ok(Reply::Refused(r)) if op == Op::Rotate && r.status == Status::Busy => {
            Answer::RotationBusy
        }
        Ok(Reply::Refused(r)) => Answer::Error(r.status.name().to_owned()),
        Ok(_) => Answer::Error("UNEXPECTED_REPLY".to_owned()),
        Err(ClientError::Closed) => Answer::Error("CONNECTION_CLOSED".to_owned()),
        Err(e) => Answer::Error(format!("CLIENT: {e}")),
    };
    (answer, None)
}

impl Target for CustodyTarget {
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, route: Route, done: Done) {
        let asset = self.assets[asset];
        let request = self.request(i, op, asset);
        let on_reply: custody::client::ReplyCallback = Box::new(move |result| {
            let (answer, receipt) = answer_of(op, asset, result);
            done(answer, receipt);
        });
        match (route, self.sharded.get(conn)) {
            (Route::ShardAware, Some(c)) => c.start(&request, on_reply),
            _ => self.clients[conn].start(&request, on_reply),
        }
    }
}

/// Registers `n` assets over `clients` (an asset that exists already counts as
/// registered: a run again against the same appliance).
async fn register_assets(
    clients: &[Arc<Client>],
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<Uuid>> {
    // Bounded concurrency: the appliance answers BUSY past its per-connection limit.
    let limit = Arc::new(tokio::sync::Semaphore::new(256 * clients.len()));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = clients[i % clients.len()].clone();
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

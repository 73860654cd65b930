//! The Rust client library (tokio): one mutual-TLS connection, pipelined requests, replies
//! matched by request id in whatever order they come back.
//!
//! `custody` (the CLI) and `custody-load` (the load harness) are built on it. Many calls
//! may be in flight on one [`Client`] at once; each call writes its frame through a
//! writer task (which batches whatever is queued into one TLS write) and awaits its reply.

use crate::op::{self, DeriveBody, Derived, HelloInfo, Reply, Request, SealInfo};
use crate::wire::{self, AssetInfo, Opcode, Refusal};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use zeroize::Zeroize;

mod failover;
pub use failover::*;

/// Largest reply body the client accepts.
const CLIENT_MAX_BODY_BYTES: u32 = 64 * 1024;

/// Errors of the client layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the connection is closed")]
    Closed,
    #[error("protocol error from the appliance: {0}")]
    Protocol(#[from] wire::WireError),
    #[error("unexpected reply to {0:?}")]
    UnexpectedReply(Opcode),
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The connection to `endpoint` closed (or its answer did not come in time) while the
    /// request was in flight: it may or may not have run. Not retried for the caller: a
    /// DERIVE sent again is a new audited derivation; a ROTATE may be sent again with the
    /// same rotation id ([`FailoverClient::rotate_retrying`]).
    #[error("the outcome of {request:?} is unknown: the connection to {endpoint} closed while it was in flight")]
    OutcomeUnknown {
        endpoint: SocketAddr,
        request: Opcode,
    },
    /// No endpoint of a [`FailoverClient`] answered as the active before the call's
    /// deadline; `last` is the last failure seen (a NOT_ACTIVE refusal, a refused connection).
    #[error("no active appliance among {endpoints} endpoints within {waited_ms} ms")]
    NoActive {
        endpoints: usize,
        waited_ms: u64,
        #[source]
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// The appliance's status, when the appliance refused the request.
    pub fn status(&self) -> Option<wire::Status> {
        match self {
            ClientError::Refused(r) => Some(r.status),
            _ => None,
        }
    }
}

/// Where the appliance is and how to prove who we are.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    /// Name the server certificate must carry (e.g. "localhost").
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Called with the reply of a request started with [`Client::start`], on the client's
/// reader task.
pub type ReplyCallback = Box<dyn FnOnce(Result<Reply, ClientError>) + Send>;

/// Who hears a reply: an awaiting caller or a callback.
enum Waiter {
    Task(oneshot::Sender<Result<Reply, ClientError>>),
    Callback(ReplyCallback),
}

impl Waiter {
    fn deliver(self, reply: Result<Reply, ClientError>) {
        match self {
            Waiter::Task(tx) => {
                let _ = tx.send(reply);
            }
            Waiter::Callback(f) => f(reply),
        }
    }
}

/// Requests waiting for replies; `None` once the connection is gone, so that a request
/// sent after that fails at once instead of waiting forever.
type Waiters = Arc<Mutex<Option<HashMap<u64, (Opcode, Waiter)>>>>;

/// A connection-level refusal the appliance sent (request id 0, e.g. CONNECTION_LIMIT)
/// before it closed: what every request still waiting, or sent later, fails with.
type ClosedBy = Arc<Mutex<Option<Refusal>>>;

fn closed_error(closed_by: &ClosedBy) -> ClientError {
    match lock(closed_by).clone() {
        Some(r) => ClientError::Refused(r),
        None => ClientError::Closed,
    }
}

/// A pipelined connection to the appliance. Cheap to share behind an `Arc`.
pub struct Client {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    waiters: Waiters,
    closed_by: ClosedBy,
    next_id: AtomicU64,
}

impl Client {
    /// Connects and completes the TLS handshake. Must be called inside a tokio runtime.
    pub async fn connect(config: &ClientConfig) -> Result<Client, ClientError> {
        let tls = crate::tls::client_config(&config.ca, &config.cert, &config.key)?;
        Self::connect_with(config.addr, &config.server_name, tls).await
    }

    /// Connects with a ready rustls configuration.
    pub async fn connect_with(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| {
            ClientError::Handshake {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Handshake { addr, source })?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (frames, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let waiters: Waiters = Arc::new(Mutex::new(Some(HashMap::new())));

        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(16 * 1024);
            while let Some(frame) = outgoing.recv().await {
                batch.extend_from_slice(&frame);
                while let Ok(more) = outgoing.try_recv() {
                    batch.extend_from_slice(&more);
                    if batch.len() > 64 * 1024 {
                        break;
                    }
                }
                if writer.write_all(&batch).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
                batch.clear();
            }
            let _ = writer.shutdown().await;
        });

        let reader_waiters = waiters.clone();
        let closed_by: ClosedBy = Arc::default();
        let reader_closed_by = closed_by.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
            let outcome: Result<(), ClientError> = async {
                loop {
                    let mut chunk = [0u8; 16 * 1024];
                    let n = reader.read(&mut chunk).await.map_err(|_| ClientError::Closed)?;
                    if n == 0 {
                        return Err(ClientError::Closed);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    chunk.zeroize();
                    let mut start = 0;
                    while let Some(frame) = wire::decode_frame(&buf[start..], CLIENT_MAX_BODY_BYTES)? {
                        let id = frame.header.request_id;
                        let waiter = lock(&reader_waiters).as_mut().and_then(|w| w.remove(&id));
                        if let Some((op, tx)) = waiter {
                            let reply = if frame.header.opcode == op as u8 | wire::REPLY_BIT {
                                Reply::decode(op, frame.body).map_err(ClientError::from)
                            } else if frame.header.opcode & wire::REPLY_BIT != 0 {
                                // A framing error answered with the header's opcode.
                                match Reply::decode(Opcode::Hello, frame.body) {
                                    Ok(Reply::Refused(r)) => Ok(Reply::Refused(r)),
                                    _ => Err(ClientError::UnexpectedReply(op)),
                                }
                            } else {
                                Err(ClientError::UnexpectedReply(op))
                            };
                            tx.deliver(reply);
                        } else if let Ok(Reply::Refused(r)) = Reply::decode(Opcode::Hello, frame.body) {
                            // A connection-level refusal (request id unknown to us): the
                            // appliance closes next, and every request fails with it.
                            tracing::warn!(status = %r.status, message = %r.message, "appliance refused the connection");
                            *lock(&reader_closed_by) = Some(r);
                        }
                        start += frame.consumed;
                    }
                    buf[..start].zeroize();
                    buf.drain(..start);
                }
            }
            .await;
            let _ = outcome;
            // Fail whatever is still waiting: the connection is gone.
            let orphans: Vec<Waiter> = lock(&reader_waiters)
                .take()
                .map(|w| w.into_values().map(|(_, w)| w).collect())
                .unwrap_or_default();
            for w in orphans {
                w.deliver(Err(closed_error(&reader_closed_by)));
            }
        });

        Ok(Client {
            frames,
            waiters,
            closed_by,
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends a request and awaits its reply (a refusal is `Ok(Reply::Refused)`).
    pub async fn call(&self, request: &Request) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(request, Waiter::Task(tx));
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Sends a request without waiting: `on_reply` runs on the client's reader task when
    /// the reply arrives (or the connection closes). Callable from any thread, inside a
    /// runtime or not; the load harness paces requests from a plain thread with it.
    pub fn start(&self, request: &Request, on_reply: ReplyCallback) {
        self.send(request, Waiter::Callback(on_reply))
    }

    fn send(&self, request: &Request, waiter: Waiter) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut guard = lock(&self.waiters);
            let Some(waiting) = guard.as_mut() else {
                drop(guard);
                return waiter.deliver(Err(closed_error(&self.closed_by)));
            };
            waiting.insert(id, (request.opcode(), waiter));
        }
        let mut frame = Vec::with_capacity(64);
        request.encode(id, &mut frame);
        if self.frames.send(frame).is_err() {
            let gone = lock(&self.waiters).as_mut().and_then(|w| w.remove(&id));
            if let Some((_, w)) = gone {
                w.deliver(Err(closed_error(&self.closed_by)));
            }
        }
    }

    /// Whether the connection is known to be gone (its reader saw the end): a request
    /// started now fails at once without being sent, so a failover client sends it
    /// elsewhere instead.
    pub fn is_closed(&self) -> bool {
        lock(&self.waiters).is_none()
    }

    /// Sends raw bytes as they are (tests of malformed input use this).
    pub fn send_raw(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.frames.send(bytes).map_err(|_| ClientError::Closed)
    }

    pub async fn hello(&self) -> Result<HelloInfo, ClientError> {
        match self.call(&Request::Hello).await? {
            Reply::Hello(h) => Ok(h),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::Hello)),
        }
    }

    pub async fn register(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        asset_reply(
            self.call(&Request::Register { asset }).await?,
            Opcode::Register,
        )
    }

    pub async fn status(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        asset_reply(self.call(&Request::Status { asset }).await?, Opcode::Status)
    }

    pub async fn derive(&self, body: DeriveBody) -> Result<Derived, ClientError> {
        match self.call(&Request::Derive(body)).await? {
            Reply::Derived(d) => Ok(d),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::Derive)),
        }
    }
}

impl Client {
    /// Admin: drops the appliance's unsealed seed at once.
    pub async fn seal(&self) -> Result<SealInfo, ClientError> {
        seal_reply(self.call(&Request::Seal).await?, Opcode::Seal)
    }

    /// Admin: submits one Shamir share (empty: ask the HSM provider to unseal now), after
    /// discarding the shares submitted so far if `reset`.
    pub async fn unseal(&self, share: &str, reset: bool) -> Result<SealInfo, ClientError> {
        let request = Request::Unseal {
            reset,
            share: crate::op::ShareText::new(share),
        };
        seal_reply(self.call(&request).await?, Opcode::Unseal)
    }

    /// The appliance's seal state.
    pub async fn seal_status(&self) -> Result<SealInfo, ClientError> {
        seal_reply(self.call(&Request::SealStatus).await?, Opcode::SealStatus)
    }
}

impl Client {
    /// Operator: moves the asset's counter forward by one. Send the same `rotation_id`
    /// again after a lost answer: the first result comes back (`replayed`).
    pub async fn rotate(
        &self,
        asset: Uuid,
        rotation_id: Uuid,
        expected_counter: Option<u64>,
    ) -> Result<wire::Rotated, ClientError> {
        let request = Request::Rotate(op::RotateBody {
            asset,
            rotation_id,
            expected_counter,
        });
        match self.call(&request).await? {
            Reply::Rotated(r) => Ok(r),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::Rotate)),
        }
    }

    /// Operator: stops derivations of the asset.
    pub async fn suspend(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        asset_reply(
            self.call(&Request::Suspend { asset }).await?,
            Opcode::Suspend,
        )
    }

    /// Operator: serves a suspended asset again.
    pub async fn resume(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        asset_reply(self.call(&Request::Resume { asset }).await?, Opcode::Resume)
    }

    /// The configured regions and whether each is enabled.
    pub async fn regions(&self) -> Result<Vec<(String, bool)>, ClientError> {
        match self.call(&Request::Regions).await? {
            Reply::Regions(list) => Ok(list),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::Regions)),
        }
    }

    /// Auditor: has the appliance prove that a receipt's record is in the log, under a
    /// checkpoint.
    pub async fn prove_receipt(
        &self,
        receipt: crate::wire::Receipt,
    ) -> Result<crate::op::ProofInfo, ClientError> {
        match self.call(&Request::ProveReceipt(receipt)).await? {
            Reply::Proof(p) => Ok(p),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::ProveReceipt)),
        }
    }

    /// Auditor: the appliance reconciles its audit log now (from its last run, or in
    /// full) and reports.
    pub async fn reconcile(&self, full: bool) -> Result<crate::op::ReconcileSummary, ClientError> {
        match self.call(&Request::Reconcile { full }).await? {
            Reply::Reconciled(r) => Ok(r),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::Reconcile)),
        }
    }

    /// Auditor or operator: one page of the registered assets after `after` (the nil UUID
    /// for the first page), in `state` if given, at most `limit` (1 to 256).
    pub async fn list_assets(
        &self,
        state: Option<crate::lifecycle::AssetState>,
        after: Uuid,
        limit: u16,
    ) -> Result<crate::op::AssetPage, ClientError> {
        let request = Request::ListAssets(crate::op::ListAssets {
            state,
            after,
            limit,
        });
        match self.call(&request).await? {
            Reply::Assets(page) => Ok(page),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::ListAssets)),
        }
    }

    /// Admin: has the appliance re-read its configuration file and put its `[policy]` in
    /// force (whole, or not at all: POLICY_INVALID lists the file's problems).
    pub async fn policy_reload(&self) -> Result<crate::op::PolicyReloaded, ClientError> {
        match self.call(&Request::PolicyReload).await? {
            Reply::PolicyReloaded(p) => Ok(p),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::PolicyReload)),
        }
    }

    /// Admin: enables or disables a configured region (durable, audited); the answer
    /// comes once every core refuses (or serves) it.
    pub async fn set_region(
        &self,
        region: &str,
        enabled: bool,
    ) -> Result<Vec<(String, bool)>, ClientError> {
        let request = Request::SetRegion {
            region: region.to_owned(),
            enabled,
        };
        match self.call(&request).await? {
            Reply::Regions(list) => Ok(list),
            Reply::Refused(r) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::UnexpectedReply(Opcode::SetRegion)),
        }
    }

    /// Admin: retires the asset for good.
    pub async fn retire(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        asset_reply(self.call(&Request::Retire { asset }).await?, Opcode::Retire)
    }
}

fn seal_reply(reply: Reply, op: Opcode) -> Result<SealInfo, ClientError> {
    match reply {
        Reply::Seal(s) => Ok(s),
        Reply::Refused(r) => Err(ClientError::Refused(r)),
        _ => Err(ClientError::UnexpectedReply(op)),
    }
}

fn asset_reply(reply: Reply, op: Opcode) -> Result<AssetInfo, ClientError> {
    match reply {
        Reply::Asset(a) => Ok(a),
        Reply::Refused(r) => Err(ClientError::Refused(r)),
        _ => Err(ClientError::UnexpectedReply(op)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A shard-aware client: one connection to the shared port and, when the appliance
/// announces per-shard ports (HELLO `shard_ports`, `server.shard_listen`), one to each
/// shard's own port. A request about an asset goes to the connection of the shard that
/// owns the asset (`jump(fnv1a64(asset), shard_count)`), so it never crosses cores in
/// the appliance; a request about no asset (HELLO, SEAL, …) goes to the shared port.
/// Without per-shard ports every request takes the shared port, as with [`Client`].
pub struct ShardedClient {
    shared: Client,
    hello: HelloInfo,
    /// By shard; empty without per-shard ports.
    shards: Vec<Client>,
}

impl ShardedClient {
    /// Connects to the shared port, asks HELLO, then connects to every shard's port on
    /// the same host.
    pub async fn connect(config: &ClientConfig) -> Result<ShardedClient, ClientError> {
        let tls = crate::tls::client_config(&config.ca, &config.cert, &config.key)?;
        let shared = Client::connect_with(config.addr, &config.server_name, tls.clone()).await?;
        let hello = shared.hello().await?;
        let mut shards = Vec::with_capacity(hello.shard_ports.len());
        for &port in &hello.shard_ports {
            let addr = SocketAddr::new(config.addr.ip(), port);
            shards.push(Client::connect_with(addr, &config.server_name, tls.clone()).await?);
        }
        Ok(ShardedClient {
            shared,
            hello,
            shards,
        })
    }

    /// What the appliance said in HELLO.
    pub fn hello(&self) -> &HelloInfo {
        &self.hello
    }

    /// Whether requests go to their shard's own port.
    pub fn is_shard_aware(&self) -> bool {
        !self.shards.is_empty()
    }

    /// The connection a request about `asset` takes.
    pub fn for_asset(&self, asset: &Uuid) -> &Client {
        let shard = crate::placement::shard_of(asset, self.hello.shard_count);
        self.shards.get(usize::from(shard)).unwrap_or(&self.shared)
    }

    /// The connection `request` takes.
    pub fn route(&self, request: &Request) -> &Client {
        match request.asset() {
            Some(asset) => self.for_asset(&asset),
            None => &self.shared,
        }
    }

    /// Sends a request on its shard's connection and awaits the reply.
    pub async fn call(&self, request: &Request) -> Result<Reply, ClientError> {
        self.route(request).call(request).await
    }

    /// Sends a request on its shard's connection without waiting (see [`Client::start`]).
    pub fn start(&self, request: &Request, on_reply: ReplyCallback) {
        self.route(request).start(request, on_reply)
    }
}

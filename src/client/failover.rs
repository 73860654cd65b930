//! Failover across appliances that share one store (issue 19): one of them is active, the
//! others standbys that answer NOT_ACTIVE (naming the active when they know it). A
//! [`FailoverClient`] keeps one connection to whichever endpoint answers and moves on when
//! that one refuses NOT_ACTIVE or its connection is gone.
//!
//! Where to go next is decided by a pure [`EndpointCursor`] (no clock, no socket: tests
//! drive it with events), and how a call ended by the pure [`classify`]; the load harness
//! reuses both for its own connections. What is retried, and what is not:
//!
//! - NOT_ACTIVE, a refused or failed connection, a connection known closed before the
//!   request was sent: the request was not run, so it is sent to the next endpoint.
//! - A connection that closed while the request was in flight: it may have run. That is
//!   [`ClientError::OutcomeUnknown`], never retried silently (a DERIVE sent again is a
//!   second audited derivation). A ROTATE carries its own idempotency key, the rotation
//!   id: [`FailoverClient::rotate_retrying`] sends it again with the same id.

use super::{Client, ClientConfig, ClientError};
use crate::op::{self, DeriveBody, Derived, HelloInfo, Reply, Request};
use crate::wire::{self, AssetInfo, Opcode, Status};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The wait after the first round over the endpoints in which none answered.
pub const FAILOVER_BACKOFF_INITIAL: Duration = Duration::from_millis(20);
/// The longest wait between two rounds: the doubling stops here, so a standby that takes
/// over is found within half a second of being ready.
pub const FAILOVER_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long a call may look for the active by default (waits and attempts together): a
/// standby takes over within a few seconds of the active's death.
pub const FAILOVER_CALL_DEADLINE_DEFAULT: Duration = Duration::from_secs(10);
/// How long one TCP connect and TLS handshake may take: a host that is down may drop SYNs
/// instead of refusing them, and the next endpoint should not wait for the kernel's minutes.
pub const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default [`FailoverConfig::reply_timeout`]: well past a commit's own bound
/// (`store.commit_timeout_ms`) and a reconciliation's usual run, well short of a stuck
/// client.
pub const FAILOVER_REPLY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Endpoints a [`FailoverClient`] takes at most (a group of appliances is a handful).
pub const FAILOVER_ENDPOINTS_MAX: usize = 16;
/// Times [`FailoverClient::rotate_retrying`] sends one ROTATE at most.
pub const ROTATE_ATTEMPTS_MAX: u32 = 8;

/// Why the current endpoint did not do: the events that move an [`EndpointCursor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointFailure {
    /// It answered NOT_ACTIVE; `active` is the index of the endpoint it named as the
    /// active, when that is one of ours.
    NotActive { active: Option<usize> },
    /// No connection: refused, timed out, the handshake failed, or a connection-level
    /// refusal.
    Unreachable,
    /// The connection closed (the active died, or is going).
    Closed,
}

/// Where to go after a failure: endpoint `endpoint`, after waiting `wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointMove {
    pub endpoint: usize,
    pub wait: Duration,
}

/// Which endpoint to try, and how long to wait first: a pure state machine.
///
/// Endpoints are tried in order, going round; a NOT_ACTIVE that names another of the
/// endpoints jumps there. Every failure counts towards the round, named jumps too (two
/// standbys naming each other from stale leases cannot make it spin): after as many
/// failures as there are endpoints the next move waits, 20 ms doubling to 500 ms. An
/// answer from the current endpoint ends the search and resets the wait.
#[derive(Clone, Debug)]
pub struct EndpointCursor {
    endpoints: usize,
    current: usize,
    failures_in_round: usize,
    backoff: Duration,
}

impl EndpointCursor {
    /// A cursor over `endpoints` endpoints (at least one), at the first.
    pub fn new(endpoints: usize) -> EndpointCursor {
        assert!(endpoints > 0, "a cursor needs an endpoint");
        EndpointCursor {
            endpoints,
            current: 0,
            failures_in_round: 0,
            backoff: FAILOVER_BACKOFF_INITIAL,
        }
    }

    /// The endpoint to use now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The current endpoint answered: it is the active; the next search starts afresh.
    pub fn answered(&mut self) {
        self.failures_in_round = 0;
        self.backoff = FAILOVER_BACKOFF_INITIAL;
    }

    /// The current endpoint failed: where to go, and how long to wait first.
    pub fn failed(&mut self, failure: EndpointFailure) -> EndpointMove {
        let named = match failure {
            EndpointFailure::NotActive { active } => active,
            EndpointFailure::Unreachable | EndpointFailure::Closed => None,
        };
        let next = match named {
            Some(i) if i < self.endpoints && i != self.current => i,
            _ => (self.current + 1) % self.endpoints,
        };
        self.failures_in_round += 1;
        let wait = if self.failures_in_round >= self.endpoints {
            self.failures_in_round = 0;
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(FAILOVER_BACKOFF_MAX);
            wait
        } else {
            Duration::ZERO
        };
        debug_assert!(next < self.endpoints && wait <= FAILOVER_BACKOFF_MAX);
        self.current = next;
        EndpointMove {
            endpoint: next,
            wait,
        }
    }
}

/// The index of the endpoint a NOT_ACTIVE reply names (`host:port`), if it is one of
/// `endpoints`. A host name is not resolved: the reply then moves to the next in order.
pub fn endpoint_named(endpoints: &[SocketAddr], active: Option<&str>) -> Option<usize> {
    let addr: SocketAddr = active?.parse().ok()?;
    endpoints.iter().position(|e| *e == addr)
}

/// How a request sent on a connection ended, as failover sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallClass {
    /// The endpoint answered (a success or any refusal but NOT_ACTIVE): it is the active.
    Answered,
    /// NOT_ACTIVE: the request was not run; the active, if named.
    NotActive { active: Option<String> },
    /// No connection to send it on: it was not run.
    Unreachable,
    /// The connection closed with the request in flight: it may have run.
    Lost,
    /// A failure that another endpoint would not cure (a connection-level refusal such as
    /// CONNECTION_LIMIT, a protocol error, TLS files that do not load): returned as it is.
    Final,
}

/// Classifies the result of [`Client::call`].
pub fn classify(result: &Result<Reply, ClientError>) -> CallClass {
    match result {
        Ok(Reply::Refused(r)) | Err(ClientError::Refused(r)) if r.status == Status::NotActive => {
            CallClass::NotActive {
                active: r.active.clone(),
            }
        }
        Ok(_) => CallClass::Answered,
        Err(ClientError::Connect { .. } | ClientError::Handshake { .. }) => CallClass::Unreachable,
        Err(ClientError::Closed | ClientError::OutcomeUnknown { .. }) => CallClass::Lost,
        Err(_) => CallClass::Final,
    }
}

/// Where the appliances are and how to prove who we are.
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// The appliances, in the order they are tried (at least one).
    pub endpoints: Vec<SocketAddr>,
    /// Name every server certificate must carry (e.g. "localhost").
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How long one call may look for the active before it fails: no new wait or attempt
    /// starts past it. Zero: one attempt at the first endpoint, no failover.
    pub call_deadline: Duration,
    /// How long a request sent waits for its reply: an appliance that is paused, or a
    /// host gone without closing its connections, never answers. Past it the outcome is
    /// unknown ([`ClientError::OutcomeUnknown`]) and the connection is dropped, so the
    /// next call finds the active anew. Zero: wait for ever.
    pub reply_timeout: Duration,
}

impl FailoverConfig {
    /// The endpoints, with the names and TLS files of `config` (whose `addr` is left out)
    /// and the default deadline.
    pub fn new(endpoints: Vec<SocketAddr>, config: &ClientConfig) -> FailoverConfig {
        FailoverConfig {
            endpoints,
            server_name: config.server_name.clone(),
            ca: config.ca.clone(),
            cert: config.cert.clone(),
            key: config.key.clone(),
            call_deadline: FAILOVER_CALL_DEADLINE_DEFAULT,
            reply_timeout: FAILOVER_REPLY_TIMEOUT_DEFAULT,
        }
    }

    /// The settings of a plain [`Client`] to one endpoint.
    pub fn client_config(&self, addr: SocketAddr) -> ClientConfig {
        ClientConfig {
            addr,
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// The connection a [`FailoverClient`] uses now, and where it would go next.
struct Slot {
    cursor: EndpointCursor,
    /// Moves on with every new connection: a failure reported against an older one was
    /// already acted on.
    generation: u64,
    client: Option<Arc<Client>>,
}

/// A client over several appliances: each call goes to the active, wherever it is now.
/// Calls may run concurrently (pipelined on the one connection), as with [`Client`].
pub struct FailoverClient {
    config: FailoverConfig,
    tls: Arc<rustls::ClientConfig>,
    slot: tokio::sync::Mutex<Slot>,
}

/// The connection a call went out on.
struct Lease {
    generation: u64,
    endpoint: SocketAddr,
    client: Arc<Client>,
}

impl FailoverClient {
    /// Loads the TLS files; connects at the first call (see [`FailoverClient::connect`]).
    pub fn new(config: FailoverConfig) -> Result<FailoverClient, ClientError> {
        assert!(
            !config.endpoints.is_empty(),
            "a failover client needs an endpoint"
        );
        let tls = crate::tls::client_config(&config.ca, &config.cert, &config.key)?;
        let slot = Slot {
            cursor: EndpointCursor::new(config.endpoints.len()),
            generation: 0,
            client: None,
        };
        Ok(FailoverClient {
            config,
            tls,
            slot: tokio::sync::Mutex::new(slot),
        })
    }

    /// Loads the TLS files and connects to the first endpoint that takes the connection
    /// (not necessarily the active: the first call finds it).
    pub async fn connect(config: FailoverConfig) -> Result<FailoverClient, ClientError> {
        let client = FailoverClient::new(config)?;
        client.connected().await?;
        Ok(client)
    }

    /// The endpoints, in order.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.config.endpoints
    }

    /// The connection in use now (made if need be), for what must go to one appliance as
    /// it is, standby or not (SEAL, UNSEAL, SEAL_STATUS), and its endpoint.
    pub async fn connected(&self) -> Result<(SocketAddr, Arc<Client>), ClientError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let lease = self.lease(deadline).await?;
        Ok((lease.endpoint, lease.client))
    }

    /// Sends a request to the active and awaits its reply (a refusal other than
    /// NOT_ACTIVE is `Ok(Reply::Refused)`). NOT_ACTIVE and connections that fail before
    /// the request is sent move it to the next endpoint; a connection that closes with it
    /// in flight is [`ClientError::OutcomeUnknown`].
    pub async fn call(&self, request: &Request) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.config.call_deadline;
        loop {
            let lease = self.lease(deadline).await?;
            let result = self.answer(&lease, request).await;
            match classify(&result) {
                CallClass::Answered => {
                    self.slot.lock().await.cursor.answered();
                    return result;
                }
                CallClass::NotActive { active } => {
                    let named = endpoint_named(&self.config.endpoints, active.as_deref());
                    let failure = EndpointFailure::NotActive { active: named };
                    let error = match result {
                        Ok(Reply::Refused(r)) | Err(ClientError::Refused(r)) => {
                            ClientError::Refused(r)
                        }
                        _ => ClientError::UnexpectedReply(request.opcode()),
                    };
                    self.fail(&lease, failure, deadline, error).await?;
                }
                CallClass::Unreachable | CallClass::Final => return result,
                CallClass::Lost => {
                    self.forget(&lease).await;
                    return Err(ClientError::OutcomeUnknown {
                        endpoint: lease.endpoint,
                        request: request.opcode(),
                    });
                }
            }
        }
    }
}

impl FailoverClient {
    /// `request`'s reply on `lease`'s connection, or `OutcomeUnknown` past the reply
    /// timeout.
    async fn answer(&self, lease: &Lease, request: &Request) -> Result<Reply, ClientError> {
        let call = lease.client.call(request);
        if self.config.reply_timeout.is_zero() {
            return call.await;
        }
        tokio::time::timeout(self.config.reply_timeout, call)
            .await
            .unwrap_or(Err(ClientError::OutcomeUnknown {
                endpoint: lease.endpoint,
                request: request.opcode(),
            }))
    }

    /// The current connection, connecting (after the cursor's wait) until an endpoint
    /// takes it or the deadline passes. A connection found closed counts as a failure of
    /// its endpoint; nothing was sent on it.
    async fn lease(&self, deadline: Instant) -> Result<Lease, ClientError> {
        let mut slot = self.slot.lock().await;
        loop {
            let endpoint = self.config.endpoints[slot.cursor.current()];
            if let Some(client) = &slot.client {
                if !client.is_closed() {
                    return Ok(Lease {
                        generation: slot.generation,
                        endpoint,
                        client: client.clone(),
                    });
                }
                slot.client = None;
                let error = ClientError::Closed;
                self.advance(&mut slot, EndpointFailure::Closed, deadline, error)
                    .await?;
                continue;
            }
            match self.open(endpoint).await {
                Ok(client) => {
                    slot.generation += 1;
                    slot.client = Some(Arc::new(client));
                }
                Err(e) => {
                    self.advance(&mut slot, EndpointFailure::Unreachable, deadline, e)
                        .await?
                }
            }
        }
    }

    /// A connection to `endpoint`, within [`FAILOVER_CONNECT_TIMEOUT`].
    async fn open(&self, endpoint: SocketAddr) -> Result<Client, ClientError> {
        let connect = Client::connect_with(endpoint, &self.config.server_name, self.tls.clone());
        match tokio::time::timeout(FAILOVER_CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Connect {
                addr: endpoint,
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    /// Moves the cursor past a failure and waits as it says; `error` (the failure) is what
    /// the call gives up with when the wait would end past the deadline.
    async fn advance(
        &self,
        slot: &mut Slot,
        failure: EndpointFailure,
        deadline: Instant,
        error: ClientError,
    ) -> Result<(), ClientError> {
        let wait = slot.cursor.failed(failure).wait;
        if Instant::now() + wait > deadline {
            return Err(self.give_up(error, deadline));
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// The call's connection failed: moves on (and waits), unless another call already
    /// did for that connection.
    async fn fail(
        &self,
        lease: &Lease,
        failure: EndpointFailure,
        deadline: Instant,
        error: ClientError,
    ) -> Result<(), ClientError> {
        let mut slot = self.slot.lock().await;
        if slot.generation != lease.generation || slot.client.is_none() {
            return Ok(());
        }
        slot.client = None;
        self.advance(&mut slot, failure, deadline, error).await
    }

    /// The call's connection closed under it: the next call goes to the next endpoint.
    async fn forget(&self, lease: &Lease) {
        let mut slot = self.slot.lock().await;
        if slot.generation == lease.generation && slot.client.is_some() {
            slot.client = None;
            let _ = slot.cursor.failed(EndpointFailure::Closed);
        }
    }

    /// The error a call ends with when the deadline passes: the failure itself with one
    /// endpoint (as a plain [`Client`] would give it), [`ClientError::NoActive`] with more.
    fn give_up(&self, last: ClientError, deadline: Instant) -> ClientError {
        if self.config.endpoints.len() == 1 {
            return last;
        }
        let started = deadline - self.config.call_deadline;
        ClientError::NoActive {
            endpoints: self.config.endpoints.len(),
            waited_ms: started.elapsed().as_millis() as u64,
            last: Box::new(last),
        }
    }
}

/// The typed calls, as [`Client`] has them, each to the active.
impl FailoverClient {
    pub async fn hello(&self) -> Result<HelloInfo, ClientError> {
        expect(
            self.call(&Request::Hello).await,
            Opcode::Hello,
            |r| match r {
                Reply::Hello(h) => Ok(h),
                other => Err(other),
            },
        )
    }

    pub async fn register(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        let reply = self.call(&Request::Register { asset }).await;
        expect(reply, Opcode::Register, asset_info)
    }

    pub async fn status(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        let reply = self.call(&Request::Status { asset }).await;
        expect(reply, Opcode::Status, asset_info)
    }

    /// A DERIVE. [`ClientError::OutcomeUnknown`] is not retried here: sent again it would
    /// be a second audited derivation; whether to is the caller's decision.
    pub async fn derive(&self, body: DeriveBody) -> Result<Derived, ClientError> {
        let reply = self.call(&Request::Derive(body)).await;
        expect(reply, Opcode::Derive, |r| match r {
            Reply::Derived(d) => Ok(d),
            other => Err(other),
        })
    }

    /// A ROTATE, sent once (see [`FailoverClient::rotate_retrying`]).
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
        expect(self.call(&request).await, Opcode::Rotate, |r| match r {
            Reply::Rotated(r) => Ok(r),
            other => Err(other),
        })
    }

    /// A ROTATE sent again with the same rotation id after [`ClientError::OutcomeUnknown`]
    /// (at most [`ROTATE_ATTEMPTS_MAX`] times): the appliance answers a rotation id it has
    /// committed with the first result (`replayed`), so the retry cannot rotate twice.
    pub async fn rotate_retrying(
        &self,
        asset: Uuid,
        rotation_id: Uuid,
        expected_counter: Option<u64>,
    ) -> Result<wire::Rotated, ClientError> {
        let mut attempt = 1;
        loop {
            match self.rotate(asset, rotation_id, expected_counter).await {
                Err(ClientError::OutcomeUnknown { .. }) if attempt < ROTATE_ATTEMPTS_MAX => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    pub async fn suspend(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        let reply = self.call(&Request::Suspend { asset }).await;
        expect(reply, Opcode::Suspend, asset_info)
    }

    pub async fn resume(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        let reply = self.call(&Request::Resume { asset }).await;
        expect(reply, Opcode::Resume, asset_info)
    }

    pub async fn retire(&self, asset: Uuid) -> Result<AssetInfo, ClientError> {
        let reply = self.call(&Request::Retire { asset }).await;
        expect(reply, Opcode::Retire, asset_info)
    }
}

impl FailoverClient {
    pub async fn regions(&self) -> Result<Vec<(String, bool)>, ClientError> {
        expect(self.call(&Request::Regions).await, Opcode::Regions, regions)
    }

    pub async fn set_region(
        &self,
        region: &str,
        enabled: bool,
    ) -> Result<Vec<(String, bool)>, ClientError> {
        let request = Request::SetRegion {
            region: region.to_owned(),
            enabled,
        };
        expect(self.call(&request).await, Opcode::SetRegion, regions)
    }

    pub async fn prove_receipt(
        &self,
        receipt: wire::Receipt,
    ) -> Result<op::ProofInfo, ClientError> {
        let reply = self.call(&Request::ProveReceipt(receipt)).await;
        expect(reply, Opcode::ProveReceipt, |r| match r {
            Reply::Proof(p) => Ok(p),
            other => Err(other),
        })
    }

    pub async fn reconcile(&self, full: bool) -> Result<op::ReconcileSummary, ClientError> {
        let reply = self.call(&Request::Reconcile { full }).await;
        expect(reply, Opcode::Reconcile, |r| match r {
            Reply::Reconciled(s) => Ok(s),
            other => Err(other),
        })
    }

    pub async fn list_assets(
        &self,
        state: Option<crate::lifecycle::AssetState>,
        after: Uuid,
        limit: u16,
    ) -> Result<op::AssetPage, ClientError> {
        let request = Request::ListAssets(op::ListAssets {
            state,
            after,
            limit,
        });
        expect(self.call(&request).await, Opcode::ListAssets, |r| match r {
            Reply::Assets(page) => Ok(page),
            other => Err(other),
        })
    }

    pub async fn policy_reload(&self) -> Result<op::PolicyReloaded, ClientError> {
        let reply = self.call(&Request::PolicyReload).await;
        expect(reply, Opcode::PolicyReload, |r| match r {
            Reply::PolicyReloaded(p) => Ok(p),
            other => Err(other),
        })
    }
}

/// The reply `pick` wants, a refusal as [`ClientError::Refused`], anything else as
/// [`ClientError::UnexpectedReply`].
fn expect<T>(
    reply: Result<Reply, ClientError>,
    op: Opcode,
    pick: impl FnOnce(Reply) -> Result<T, Reply>,
) -> Result<T, ClientError> {
    match pick(reply?) {
        Ok(t) => Ok(t),
        Err(Reply::Refused(r)) => Err(ClientError::Refused(r)),
        Err(_) => Err(ClientError::UnexpectedReply(op)),
    }
}

fn asset_info(reply: Reply) -> Result<AssetInfo, Reply> {
    match reply {
        Reply::Asset(a) => Ok(a),
        other => Err(other),
    }
}

fn regions(reply: Reply) -> Result<Vec<(String, bool)>, Reply> {
    match reply {
        Reply::Regions(list) => Ok(list),
        other => Err(other),
    }
}

#[cfg(test)]
mod tests;

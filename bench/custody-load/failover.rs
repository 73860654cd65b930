//! A connection slot that follows the active appliance (issue 19): [`FollowingConn`] holds
//! one [`Client`] to one of `--addr`'s endpoints and, when that connection closes or its
//! appliance answers NOT_ACTIVE, drops it and connects to the next endpoint in the
//! background, with the client library's pure [`EndpointCursor`] choosing where and how
//! long to wait (20 ms doubling to 500 ms between rounds over the list).
//!
//! Nothing is retried here: a request refused NOT_ACTIVE counts as such, one in flight when
//! its connection closed counts as OUTCOME_UNKNOWN; the schedule's later requests go on
//! the new connection. While a slot has no connection the schedule does not pick it
//! ([`FollowingConn::is_live`]), so requests wait for one and their latency shows the
//! failover.
//!
//! Hot path: one mutex (uncontended but for failures) and two `Arc` clones per request;
//! the first answer on a new connection, and each failure, take the mutex again.

use custody::client::{
    classify, endpoint_named, CallClass, Client, ClientError, EndpointCursor, EndpointFailure,
    FailoverConfig, FAILOVER_CONNECT_TIMEOUT,
};
use custody::op::Reply;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The endpoint a request went to (its index in `--addr`) and the connection's generation.
#[derive(Clone, Copy, Debug)]
pub struct Via {
    pub endpoint: u16,
    generation: u64,
}

impl Via {
    /// The first endpoint, for a client that does not follow the active (shard-aware).
    pub const FIRST: Via = Via {
        endpoint: 0,
        generation: 0,
    };
}

/// A connection slot of the schedule, following the active.
pub struct FollowingConn {
    endpoints: Arc<[SocketAddr]>,
    server_name: String,
    tls: Arc<rustls::ClientConfig>,
    runtime: tokio::runtime::Handle,
    state: Mutex<ConnState>,
    /// Whether `state` holds a connection not known closed (read without the lock by the
    /// schedule's choice of a connection).
    live: AtomicBool,
    /// The generation whose first answer reset the cursor's wait.
    answered_generation: AtomicU64,
    /// Connections made after the first, i.e. endpoint switches.
    pub reconnects: AtomicU64,
}

struct ConnState {
    cursor: EndpointCursor,
    generation: u64,
    client: Option<Arc<Client>>,
}

/// Loads the TLS files of `config` once for every slot.
pub fn tls_of(config: &FailoverConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(custody::tls::client_config(
        &config.ca,
        &config.cert,
        &config.key,
    )?)
}

impl FollowingConn {
    /// A slot connected to the first endpoint that takes the connection (trying each in
    /// turn as the cursor says, up to the config's deadline).
    pub async fn connect(
        config: &FailoverConfig,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Arc<FollowingConn>> {
        let endpoints: Arc<[SocketAddr]> = config.endpoints.clone().into();
        let mut cursor = EndpointCursor::new(endpoints.len());
        let deadline = std::time::Instant::now() + config.call_deadline;
        let client = loop {
            let endpoint = endpoints[cursor.current()];
            match open(endpoint, &config.server_name, &tls).await {
                Ok(c) => break c,
                Err(e) => {
                    let wait = cursor.failed(EndpointFailure::Unreachable).wait;
                    if std::time::Instant::now() + wait > deadline {
                        return Err(e.into());
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        };
        Ok(Arc::new(FollowingConn {
            endpoints,
            server_name: config.server_name.clone(),
            tls,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(ConnState {
                cursor,
                generation: 1,
                client: Some(Arc::new(client)),
            }),
            live: AtomicBool::new(true),
            answered_generation: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }))
    }

    /// Whether a request started now has a connection to go on.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The connection to start a request on, and where it goes; `None`: no connection
    /// (a new one is on its way). Pass each answer on it to [`FollowingConn::heard`].
    pub fn lease(self: &Arc<Self>) -> Option<(Arc<Client>, Via)> {
        let state = crate::schedule::lock(&self.state);
        let client = state.client.clone()?;
        let generation = state.generation;
        if client.is_closed() {
            drop(state);
            self.failed(generation, EndpointFailure::Closed);
            return None;
        }
        let endpoint = state.cursor.current() as u16;
        Some((
            client,
            Via {
                endpoint,
                generation,
            },
        ))
    }

    /// What an answer says about the connection it came on: the active answered, a
    /// standby refused, or the connection is gone.
    pub fn heard(self: &Arc<Self>, result: &Result<Reply, ClientError>, via: Via) {
        match classify(result) {
            CallClass::Answered => {
                if self.answered_generation.load(Ordering::Relaxed) != via.generation {
                    self.answered_generation
                        .store(via.generation, Ordering::Relaxed);
                    let mut state = crate::schedule::lock(&self.state);
                    if state.generation == via.generation {
                        state.cursor.answered();
                    }
                }
            }
            CallClass::NotActive { active } => {
                let named = endpoint_named(&self.endpoints, active.as_deref());
                self.failed(via.generation, EndpointFailure::NotActive { active: named });
            }
            CallClass::Lost | CallClass::Unreachable => {
                self.failed(via.generation, EndpointFailure::Closed)
            }
            CallClass::Final => {}
        }
    }

    /// The connection of `generation` failed: unless that was already acted on, it is
    /// dropped and a new one made in the background, where and when the cursor says.
    fn failed(self: &Arc<Self>, generation: u64, failure: EndpointFailure) {
        let wait = {
            let mut state = crate::schedule::lock(&self.state);
            if state.generation != generation || state.client.is_none() {
                return;
            }
            state.client = None;
            self.live.store(false, Ordering::Release);
            state.cursor.failed(failure).wait
        };
        self.runtime
            .spawn(reconnect(Arc::downgrade(self), wait, generation));
    }
}

/// Connects the slot again: after `wait`, to the cursor's endpoint, and on to the next
/// until one takes the connection; gives up when the slot is gone (the run is over).
async fn reconnect(conn: Weak<FollowingConn>, mut wait: Duration, generation: u64) {
    loop {
        tokio::time::sleep(wait).await;
        let Some(c) = conn.upgrade() else { return };
        let endpoint = c.endpoints[crate::schedule::lock(&c.state).cursor.current()];
        let opened = open(endpoint, &c.server_name, &c.tls).await;
        let mut state = crate::schedule::lock(&c.state);
        match opened {
            Ok(client) => {
                state.client = Some(Arc::new(client));
                state.generation = generation + 1;
                c.live.store(true, Ordering::Release);
                c.reconnects.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => wait = state.cursor.failed(EndpointFailure::Unreachable).wait,
        }
    }
}

/// A connection to `endpoint`, within the client library's connect timeout.
async fn open(
    endpoint: SocketAddr,
    server_name: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Client, ClientError> {
    let connect = Client::connect_with(endpoint, server_name, tls.clone());
    match tokio::time::timeout(FAILOVER_CONNECT_TIMEOUT, connect).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Connect {
            addr: endpoint,
            source: std::io::ErrorKind::TimedOut.into(),
        }),
    }
}

//! What every connection on a core shares: the router to the shards, the core's key, the
//! policy and settings in force, the slots, the counters. One per core, built by the
//! server when the core starts; the network edge ([`crate::net`]) and the operations
//! ([`crate::op`]) read it.

use crate::admission::{Admission, RefusalLog};
use crate::config::Limits;
use crate::policy::{DenyReason, FieldRules};
use crate::router::ShardRouter;
use crate::seal::cache::CoreKey;
use crate::settings::ConnectionSettings;
use crate::signal::LocalSignal;
use crate::wire::ProviderCode;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

/// What every connection on a core shares.
pub struct CoreContext {
    pub router: Rc<ShardRouter>,
    /// Derives each key on the connection's core, after its audit record is durable;
    /// `None` while the seed is sealed.
    pub key: Rc<CoreKey>,
    pub rules: FieldRules,
    pub limits: Limits,
    /// The TLS acceptor and the connection limits in force (replaced whole on a reload).
    pub settings: crate::published::LocalCopy<ConnectionSettings>,
    /// Shards (one per core), as HELLO reports them.
    pub shard_count: u16,
    /// The port each shard also listens on, by shard (`server.shard_listen`; empty: none).
    pub shard_ports: Vec<u16>,
    /// Connection tasks alive on this core (handshaking, established or closing): the
    /// drain waits for them.
    pub connections: Cell<u32>,
    /// The handshake and established slots (I8).
    pub admission: RefCell<Admission<Rc<LocalSignal>>>,
    pub refusal_log: RefCell<RefusalLog>,
    /// Who may do what, and at which rate (`[policy]`; replaced whole on SIGHUP).
    pub access: crate::policy::CorePolicy,
    /// Requests the policy refused on this core, by [`DenyReason`] (for metrics).
    pub denials: RefCell<[u64; DenyReason::ALL.len()]>,
    /// This core's request, latency and connection counters (published to the metrics
    /// registry by the core itself).
    pub metrics: Rc<RefCell<crate::metrics::NetMetrics>>,
    /// The appliance's reconciliation thread (RECONCILE).
    pub auditor: Option<Arc<crate::auditor::Auditor>>,
    /// Re-reads the configuration file on an admin's POLICY_RELOAD (`None`: started
    /// without a file).
    pub reloader: Option<Arc<crate::reload::Reloader>>,
    pub seal_provider: ProviderCode,
    /// Opened when the appliance stops (SIGTERM): the listeners close, each connection
    /// stops reading, answers what it already read, and closes.
    pub drain: crate::signal::LocalLatch,
    /// Whether this appliance may acknowledge (active, lease fresh): every request but the
    /// seal's asks first; shared by every core.
    pub lease: Arc<crate::lease::Lease>,
}

//! Metrics and health for SREs: per-core counters and latency histograms, merged when
//! Prometheus scrapes the admin listener.
//!
//! Each core counts into plain fields it alone owns ([`NetMetrics`] on the connection side,
//! the shard's [`ShardFigures`]); nothing on the request path touches memory
//! another thread writes. Every `server.metrics_publish_ms` the core copies its figures into
//! its own slot of the [`Registry`] (a mutex only that core and the scraper take), and a
//! scrape merges the slots. A scrape therefore sees figures at most one publish interval
//! old; the seal state and the policy generation are read live.
//!
//! The admin listener (`server.admin_listen`, loopback by default) runs on a thread of its
//! own, never on an executor, and answers one small request per connection:
//! `GET /metrics` (Prometheus text format 0.0.4), `GET /healthz` (every core published
//! recently: none is stuck) and `GET /readyz` (unsealed, the store took the last commit of
//! every shard, every core alive).

use crate::admission::{Refused, SlotsInUse};
use crate::lifecycle::AssetState;
use crate::policy::DenyReason;
use crate::seal::cache::{clock_ms, SealState, SeedCache};
use crate::wire::{Opcode, Status};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest request head the admin listener reads.
const ADMIN_REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long the admin listener waits on one client's read or write.
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound of the latency histograms (60 s, in microseconds).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Bucket bounds (seconds) of the latency histograms as Prometheus sees them.
const LATENCY_BUCKETS_S: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];
/// Bucket bounds of the commit batch size histogram (records).
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];
/// Opcode slots of the request counters: slot 0 counts requests with an unknown opcode.
const OPCODE_SLOTS: usize = 32;

/// A latency histogram in microseconds (2 significant figures: 1 % resolution).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("valid histogram bounds")
}

/// A histogram of batch sizes (records).
pub fn batch_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(
        1,
        u64::from(crate::bounds::COMMIT_BATCH_RECORDS_CAP).max(2),
        2,
    )
    .expect("valid histogram bounds")
}

/// A latency histogram and the exact sum of what it recorded.
#[derive(Clone, Debug)]
pub struct Latency {
    pub us: Histogram<u64>,
    pub sum_us: u64,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            us: latency_histogram(),
            sum_us: 0,
        }
    }
}

impl Latency {
    pub fn record(&mut self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.us.saturating_record(us.max(1));
        self.sum_us = self.sum_us.saturating_add(us);
    }

    fn add(&mut self, other: &Latency) {
        // Same bounds on both sides: `add` cannot fail; saturate if it ever did.
        let _ = self.us.add(&other.us);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    fn copy_from(&mut self, other: &Latency) {
        self.us.reset();
        self.sum_us = 0;
        self.add(other);
    }
}

/// What a core's connection side counts (owned by the core, in its context).
#[derive(Clone, Debug)]
pub struct NetMetrics {
    /// Replies by request opcode (slot 0: unknown) and status (position in [`Status::ALL`]).
    pub replies: [[u64; Status::ALL.len()]; OPCODE_SLOTS],
    /// DERIVE requests that reached a shard: from the frame's decoding to its reply.
    pub derive_latency: Latency,
    pub connections_accepted: u64,
    /// Refused a slot, by [`Refused`] (a bound of the core, an identity or a source).
    pub connections_refused: [u64; Refused::ALL.len()],
    /// Handshakes put out of a full table by a newer one (`limits.max_handshakes_per_core`).
    pub handshakes_evicted: u64,
    /// Frames that did not arrive whole in time (`limits.frame_timeout_ms`).
    pub frame_timeouts: u64,
    /// Connections closed idle (`limits.idle_timeout_s`).
    pub idle_closed: u64,
    /// Connections closed because their client did not read (`limits.write_timeout_ms`).
    pub write_timeouts: u64,
    pub handshake_failed: u64,
    pub handshake_timed_out: u64,
    /// A client certificate that names no usable identity.
    pub certificate_refused: u64,
    /// Operations this core handed to the core that owns their asset.
    pub cross_core: u64,
}

impl Default for NetMetrics {
    fn default() -> NetMetrics {
        NetMetrics {
            replies: [[0; Status::ALL.len()]; OPCODE_SLOTS],
            derive_latency: Latency::default(),
            connections_accepted: 0,
            connections_refused: [0; Refused::ALL.len()],
            handshakes_evicted: 0,
            frame_timeouts: 0,
            idle_closed: 0,
            write_timeouts: 0,
            handshake_failed: 0,
            handshake_timed_out: 0,
            certificate_refused: 0,
            cross_core: 0,
        }
    }
}

impl NetMetrics {
    pub fn count_reply(&mut self, opcode: u8, status: Status) {
        let op = match Opcode::from_u8(opcode & !crate::wire::REPLY_BIT) {
            Some(op) if (op as usize) < OPCODE_SLOTS => op as usize,
            _ => 0,
        };
        if let Some(s) = Status::ALL.iter().position(|s| *s == status) {
            self.replies[op][s] += 1;
        }
    }
}

/// What a shard counts (owned by the shard), cumulative since start.
#[derive(Clone, Debug)]
pub struct ShardFigures {
    /// From an operation's acceptance to the sealing of its batch.
    pub queue_wait: Latency,
    /// From a batch's sealing to the store's answer (committed batches).
    pub commit: Latency,
    pub batch_records: Histogram<u64>,
    pub batch_records_sum: u64,
    pub commits_failed: u64,
    /// Whether the store took this shard's last batch (true until one fails).
    pub store_ok: bool,
    pub transitions: HashMap<(AssetState, AssetState), u64>,
    /// Durable registrations (the transition from no asset to ACTIVE).
    pub registered: u64,
    pub rate_limited: u64,
    pub assets: u64,
    /// Sequence number of the shard's newest durable audit record.
    pub audit_head_seq: u64,
}

impl Default for ShardFigures {
    fn default() -> ShardFigures {
        ShardFigures {
            queue_wait: Latency::default(),
            commit: Latency::default(),
            batch_records: batch_histogram(),
            batch_records_sum: 0,
            commits_failed: 0,
            store_ok: true,
            transitions: HashMap::new(),
            registered: 0,
            rate_limited: 0,
            assets: 0,
            audit_head_seq: 0,
        }
    }
}

/// One core's published figures.
#[derive(Clone, Debug, Default)]
pub struct CoreFigures {
    /// When the core last published (process clock, ms); 0: never.
    pub published_ms: u64,
    pub net: NetMetrics,
    pub shard: ShardFigures,
    pub denials: [u64; DenyReason::ALL.len()],
    pub connections_open: u64,
    /// The handshake and established slots in use.
    pub slots: SlotsInUse,
}

impl CoreFigures {
    /// Copies `net` and `shard` over this slot's (without reallocating the histograms).
    pub fn publish(
        &mut self,
        net: &NetMetrics,
        shard: &ShardFigures,
        denials: [u64; DenyReason::ALL.len()],
        connections_open: u64,
        slots: SlotsInUse,
    ) {
        let NetMetrics {
            replies,
            derive_latency,
            connections_accepted,
            connections_refused,
            handshakes_evicted,
            frame_timeouts,
            idle_closed,
            write_timeouts,
            handshake_failed,
            handshake_timed_out,
            certificate_refused,
            cross_core,
        } = net;
        self.net.replies = *replies;
        self.net.derive_latency.copy_from(derive_latency);
        self.net.connections_accepted = *connections_accepted;
        self.net.connections_refused = *connections_refused;
        self.net.handshakes_evicted = *handshakes_evicted;
        self.net.frame_timeouts = *frame_timeouts;
        self.net.idle_closed = *idle_closed;
        self.net.write_timeouts = *write_timeouts;
        self.net.handshake_failed = *handshake_failed;
        self.net.handshake_timed_out = *handshake_timed_out;
        self.net.certificate_refused = *certificate_refused;
        self.net.cross_core = *cross_core;
        let s = &mut self.shard;
        s.queue_wait.copy_from(&shard.queue_wait);
        s.commit.copy_from(&shard.commit);
        s.batch_records.reset();
        let _ = s.batch_records.add(&shard.batch_records);
        s.batch_records_sum = shard.batch_records_sum;
        s.commits_failed = shard.commits_failed;
        s.store_ok = shard.store_ok;
        s.transitions.clone_from(&shard.transitions);
        s.registered = shard.registered;
        s.rate_limited = shard.rate_limited;
        s.assets = shard.assets;
        s.audit_head_seq = shard.audit_head_seq;
        self.denials = denials;
        self.connections_open = connections_open;
        self.slots = slots;
        self.published_ms = clock_ms().max(1);
    }
}

/// The figures of every core, and the live sources a scrape reads.
pub struct Registry {
    cores: Vec<Mutex<CoreFigures>>,
    seal: Arc<SeedCache>,
    policy: Arc<crate::policy::PolicyCell>,
    publish_every: Duration,
    auditor: Option<Arc<Mutex<crate::auditor::AuditorStatus>>>,
    /// The TLS settings in force (their certificate's expiry and generation).
    tls: Option<Arc<crate::published::Published<crate::settings::ConnectionSettings>>>,
    /// Set when the appliance stops: /readyz fails, so a balancer sends no more.
    draining: std::sync::atomic::AtomicBool,
}

/// What /healthz and /readyz found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Registry {
    pub fn new(
        cores: usize,
        seal: Arc<SeedCache>,
        policy: Arc<crate::policy::PolicyCell>,
        publish_every: Duration,
    ) -> Registry {
        Registry {
            cores: (0..cores)
                .map(|_| Mutex::new(CoreFigures::default()))
                .collect(),
            seal,
            policy,
            publish_every,
            auditor: None,
            tls: None,
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The reconciliation's figures (read at scrape time).
    pub fn with_auditor(
        mut self,
        status: Option<Arc<Mutex<crate::auditor::AuditorStatus>>>,
    ) -> Registry {
        self.auditor = status;
        self
    }

    /// The TLS settings in force (read at scrape time).
    pub fn with_tls(
        mut self,
        settings: Arc<crate::published::Published<crate::settings::ConnectionSettings>>,
    ) -> Registry {
        self.tls = Some(settings);
        self
    }

    /// The appliance is stopping: /readyz answers not ready from now on.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connections open on every core, as last published.
    pub fn open_connections(&self) -> u64 {
        self.snapshot().iter().map(|c| c.connections_open).sum()
    }

    /// Core `core`'s slot: only that core's publisher and the scraper lock it.
    pub fn slot(&self, core: usize) -> Option<&Mutex<CoreFigures>> {
        self.cores.get(core)
    }

    fn snapshot(&self) -> Vec<CoreFigures> {
        self.cores
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Alive: every core published within three publish intervals (at least 2 s).
    pub fn health(&self) -> Health {
        self.check(&self.snapshot(), false)
    }

    /// Ready: alive, unsealed (or serving a stale seed), and the store took the last
    /// batch of every shard.
    pub fn readiness(&self) -> Health {
        self.check(&self.snapshot(), true)
    }

    fn check(&self, cores: &[CoreFigures], ready: bool) -> Health {
        let now = clock_ms();
        let stale_ms = (3 * self.publish_every.as_millis() as u64).max(2_000);
        let mut problems = Vec::new();
        for (i, c) in cores.iter().enumerate() {
            if c.published_ms == 0 {
                problems.push(format!("core {i} has not started"));
            } else if now.saturating_sub(c.published_ms) > stale_ms {
                problems.push(format!(
                    "core {i} has not reported for {} ms (stuck?)",
                    now - c.published_ms
                ));
            }
        }
        if ready {
            if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
                problems.push("stopping: draining connections".into());
            }
            match self.seal.status().state {
                SealState::Unsealed | SealState::ServingStale { .. } => {}
                other => problems.push(format!("sealed: {}", seal_state_name(&other))),
            }
            for (i, c) in cores.iter().enumerate() {
                if !c.shard.store_ok {
                    problems.push(format!("shard {i}: the store refused its last batch"));
                }
            }
        }
        Health {
            ok: problems.is_empty(),
            problems,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = render(&self.snapshot(), &self.seal, self.policy.generation());
        if let Some(status) = &self.auditor {
            let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            render_auditor(&mut out, &s);
        }
        if let Some(tls) = &self.tls {
            render_tls(
                &mut out,
                tls.generation(),
                tls.current().certificate.not_after,
            );
        }
        if let Some(heap) = crate::heap::figures() {
            render_heap(&mut out, heap);
        }
        out
    }
}

fn render_heap(out: &mut String, heap: crate::heap::HeapFigures) {
    let mut f = Family { out };
    f.head(
        "custody_heap_bytes",
        "gauge",
        "The allocator's heap (jemalloc): in_use (allocated and not freed), free (resident beyond in_use: freed pages not yet given back, within about a second, and the allocator's metadata), sqlite (the part of in_use SQLite holds: its page caches).",
    );
    f.sample("custody_heap_bytes", "kind=\"in_use\"", heap.in_use_bytes);
    f.sample("custody_heap_bytes", "kind=\"free\"", heap.free_bytes);
    f.sample(
        "custody_heap_bytes",
        "kind=\"sqlite\"",
        crate::store::sqlite::memory_used_bytes(),
    );
}

/// The label value of a seal state.
pub fn seal_state_name(state: &SealState) -> &'static str {
    match state {
        SealState::Unsealed => "unsealed",
        SealState::Sealed { .. } => "sealed",
        SealState::Unsealing { .. } => "unsealing",
        SealState::ServingStale { .. } => "serving_stale",
        SealState::SealedByOperator { .. } => "sealed_by_operator",
        SealState::SealedByFailure { .. } => "sealed_by_failure",
    }
}

const SEAL_STATE_NAMES: [&str; 6] = [
    "unsealed",
    "sealed",
    "unsealing",
    "serving_stale",
    "sealed_by_operator",
    "sealed_by_failure",
];

/// Writes one metric family.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    /// A histogram from microsecond (`scale` 1e-6) or unit (`scale` 1) values.
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        h: &Histogram<u64>,
        sum: f64,
        bounds: &[f64],
        scale: f64,
    ) {
        self.head(name, "histogram", help);
        for le in bounds {
            let upto = (le / scale).round() as u64;
            let count = h.count_between(0, upto.max(1));
            self.sample(&format!("{name}_bucket"), &format!("le=\"{le}\""), count);
        }
        self.sample(&format!("{name}_bucket"), "le=\"+Inf\"", h.len());
        self.sample(&format!("{name}_sum"), "", sum);
        self.sample(&format!("{name}_count"), "", h.len());
    }
}

fn render(cores: &[CoreFigures], seal: &SeedCache, policy_generation: u64) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let mut f = Family { out: &mut out };

    // Requests by operation and status, summed over the cores.
    f.head(
        "custody_requests_total",
        "counter",
        "Requests answered, by operation and status.",
    );
    for (op, slot) in (0..OPCODE_SLOTS).map(|i| {
        let name = Opcode::ALL
            .iter()
            .find(|o| **o as usize == i)
            .map_or("UNKNOWN", |o| o.name());
        (name, i)
    }) {
        for (s, status) in Status::ALL.iter().enumerate() {
            let n: u64 = cores.iter().map(|c| c.net.replies[slot][s]).sum();
            if n > 0 {
                f.sample(
                    "custody_requests_total",
                    &format!("op=\"{op}\",status=\"{}\"", status.name()),
                    n,
                );
            }
        }
    }

    let mut derive = Latency::default();
    let mut queue = Latency::default();
    let mut commit = Latency::default();
    let mut batches = batch_histogram();
    let mut batch_sum = 0u64;
    let mut transitions: HashMap<(AssetState, AssetState), u64> = HashMap::new();
    for c in cores {
        derive.add(&c.net.derive_latency);
        queue.add(&c.shard.queue_wait);
        commit.add(&c.shard.commit);
        let _ = batches.add(&c.shard.batch_records);
        batch_sum = batch_sum.saturating_add(c.shard.batch_records_sum);
        for (k, v) in &c.shard.transitions {
            *transitions.entry(*k).or_default() += v;
        }
    }
    f.histogram(
        "custody_derivation_latency_seconds",
        "DERIVE requests that reached a shard, from decoding to the reply (the audit record durable, the key derived).",
        &derive.us,
        derive.sum_us as f64 / 1e6,
        &LATENCY_BUCKETS_S,
        1e-6,
    );
    f.histogram(
        "custody_shard_queue_wait_seconds",
        "Operations from acceptance by their shard to the sealing of their commit batch.",
        &queue.us,
        queue.sum_us as f64 / 1e6,
        &LATENCY_BUCKETS_S,
        1e-6,
    );
    f.histogram(
        "custody_commit_latency_seconds",
        "Committed batches, from sealing to the store's answer.",
        &commit.us,
        commit.sum_us as f64 / 1e6,
        &LATENCY_BUCKETS_S,
        1e-6,
    );
    f.histogram(
        "custody_commit_batch_records",
        "Audit records per committed batch.",
        &batches,
        batch_sum as f64,
        &BATCH_BUCKETS,
        1.0,
    );
    f.head(
        "custody_store_errors_total",
        "counter",
        "Batches the store failed or did not commit in time, per shard.",
    );
    for (i, c) in cores.iter().enumerate() {
        f.sample(
            "custody_store_errors_total",
            &format!("shard=\"{i}\""),
            c.shard.commits_failed,
        );
    }
    f.head(
        "custody_store_up",
        "gauge",
        "1 when the store took the shard's last batch, 0 when it failed (until one commits).",
    );
    for (i, c) in cores.iter().enumerate() {
        f.sample(
            "custody_store_up",
            &format!("shard=\"{i}\""),
            u8::from(c.shard.store_ok),
        );
    }

    f.head(
        "custody_key_lifecycle_transitions_total",
        "counter",
        "Durable asset state transitions, by state before and after (registration: from NONE).",
    );
    f.sample(
        "custody_key_lifecycle_transitions_total",
        "from=\"NONE\",to=\"ACTIVE\"",
        cores.iter().map(|c| c.shard.registered).sum::<u64>(),
    );
    let mut pairs: Vec<_> = transitions.into_iter().collect();
    pairs.sort_by_key(|((a, b), _)| (*a as u8, *b as u8));
    for ((from, to), n) in pairs {
        f.sample(
            "custody_key_lifecycle_transitions_total",
            &format!("from=\"{}\",to=\"{}\"", from.name(), to.name()),
            n,
        );
    }

    f.head(
        "custody_denied_requests_total",
        "counter",
        "Requests the policy refused, by reason.",
    );
    for (i, reason) in DenyReason::ALL.iter().enumerate() {
        let n: u64 = cores.iter().map(|c| c.denials[i]).sum();
        f.sample(
            "custody_denied_requests_total",
            &format!("reason=\"{}\"", reason.name()),
            n,
        );
    }
    f.head(
        "custody_rate_limited_requests_total",
        "counter",
        "Requests refused by the (requester, asset) rate limit.",
    );
    f.sample(
        "custody_rate_limited_requests_total",
        "",
        cores.iter().map(|c| c.shard.rate_limited).sum::<u64>(),
    );
    f.head(
        "custody_assets",
        "gauge",
        "Assets in each shard's registry.",
    );
    for (i, c) in cores.iter().enumerate() {
        f.sample("custody_assets", &format!("shard=\"{i}\""), c.shard.assets);
    }

    f.head(
        "custody_audit_head_seq",
        "gauge",
        "Sequence number of each shard's newest durable audit record. It never goes down, across restarts too: a fall means records were cut from the store's log.",
    );
    // Only from cores that have published: before its shard is loaded a core's slot says
    // 0, which would look like a log cut short (CustodyAuditHeadWentBack).
    for (i, c) in cores.iter().enumerate().filter(|(_, c)| c.published_ms > 0) {
        f.sample(
            "custody_audit_head_seq",
            &format!("shard=\"{i}\""),
            c.shard.audit_head_seq,
        );
    }

    f.head(
        "custody_cross_core_requests_total",
        "counter",
        "Operations a core handed to the core that owns their asset (a shard-aware client on the per-shard ports causes none).",
    );
    for (i, c) in cores.iter().enumerate() {
        f.sample(
            "custody_cross_core_requests_total",
            &format!("core=\"{i}\""),
            c.net.cross_core,
        );
    }

    // Connections, per core.
    f.head("custody_connections", "gauge", "Open client connections.");
    for (i, c) in cores.iter().enumerate() {
        f.sample(
            "custody_connections",
            &format!("core=\"{i}\""),
            c.connections_open,
        );
    }
    f.head(
        "custody_connections_accepted_total",
        "counter",
        "Client connections accepted.",
    );
    for (i, c) in cores.iter().enumerate() {
        f.sample(
            "custody_connections_accepted_total",
            &format!("core=\"{i}\""),
            c.net.connections_accepted,
        );
    }
    f.head(
        "custody_connections_refused_total",
        "counter",
        "Client connections refused a slot, by the bound hit: source_handshakes (limits.max_handshakes_per_source, before TLS), core (limits.max_connections_per_core), identity (limits.max_connections_per_identity), roleless_identity (limits.max_connections_per_roleless_identity), roleless (limits.max_roleless_connections_per_core).",
    );
    for (i, c) in cores.iter().enumerate() {
        for reason in Refused::ALL {
            f.sample(
                "custody_connections_refused_total",
                &format!("core=\"{i}\",reason=\"{}\"", reason.name()),
                c.net.connections_refused[reason as usize],
            );
        }
    }
    f.head(
        "custody_connection_slots",
        "gauge",
        "Connection slots in use, by kind: handshakes (in progress, limits.max_handshakes_per_core), established (limits.max_connections_per_core), roleless (established by identities with no role, limits.max_roleless_connections_per_core), identity_max (the most one identity holds, limits.max_connections_per_identity).",
    );
    for (i, c) in cores.iter().enumerate() {
        for (kind, n) in [
            ("handshakes", c.slots.handshakes),
            ("established", c.slots.established),
            ("roleless", c.slots.roleless),
            ("identity_max", c.slots.identity_max),
        ] {
            f.sample(
                "custody_connection_slots",
                &format!("core=\"{i}\",kind=\"{kind}\""),
                u64::from(n),
            );
        }
    }
    f.head(
        "custody_connections_closed_total",
        "counter",
        "Client connections the appliance closed, by why: handshake_evicted (a newer handshake took the slot of the oldest, limits.max_handshakes_per_core), frame_timeout (limits.frame_timeout_ms), idle (limits.idle_timeout_s), write_timeout (limits.write_timeout_ms).",
    );
    for (i, c) in cores.iter().enumerate() {
        for (why, n) in [
            ("handshake_evicted", c.net.handshakes_evicted),
            ("frame_timeout", c.net.frame_timeouts),
            ("idle", c.net.idle_closed),
            ("write_timeout", c.net.write_timeouts),
        ] {
            f.sample(
                "custody_connections_closed_total",
                &format!("core=\"{i}\",reason=\"{why}\""),
                n,
            );
        }
    }
    f.head(
        "custody_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed, by reason (refused, timeout, certificate: no usable identity).",
    );
    for (i, c) in cores.iter().enumerate() {
        for (reason, n) in [
            ("refused", c.net.handshake_failed),
            ("timeout", c.net.handshake_timed_out),
            ("certificate", c.net.certificate_refused),
        ] {
            f.sample(
                "custody_tls_handshake_failures_total",
                &format!("core=\"{i}\",reason=\"{reason}\""),
                n,
            );
        }
    }

    // The seal, read live.
    let status = seal.status();
    let now = clock_ms();
    let current = seal_state_name(&status.state);
    f.head(
        "custody_seal_state",
        "gauge",
        "The appliance's seal state: 1 for the current state, 0 for the others.",
    );
    for name in SEAL_STATE_NAMES {
        f.sample(
            "custody_seal_state",
            &format!("state=\"{name}\""),
            u8::from(name == current),
        );
    }
    let since = match &status.state {
        SealState::Unsealed => status.key_unsealed_ms,
        SealState::Sealed { since_ms }
        | SealState::Unsealing { since_ms, .. }
        | SealState::ServingStale { since_ms }
        | SealState::SealedByOperator { since_ms }
        | SealState::SealedByFailure { since_ms, .. } => Some(*since_ms),
    };
    f.head(
        "custody_seal_state_seconds",
        "gauge",
        "How long the appliance has been in its current seal state.",
    );
    f.sample(
        "custody_seal_state_seconds",
        "",
        since.map_or(0.0, |s| now.saturating_sub(s) as f64 / 1e3),
    );
    let (received, threshold) = match status.state {
        SealState::Unsealing {
            received,
            threshold,
            ..
        } => (received, threshold),
        _ => (0, 0),
    };
    f.head(
        "custody_unseal_shares_received",
        "gauge",
        "Unseal shares submitted so far (shamir provider, while unsealing).",
    );
    f.sample("custody_unseal_shares_received", "", received);
    f.head(
        "custody_unseal_shares_threshold",
        "gauge",
        "Unseal shares needed (shamir provider, while unsealing; else 0).",
    );
    f.sample("custody_unseal_shares_threshold", "", threshold);
    f.head(
        "custody_hsm_calls_total",
        "counter",
        "Calls to the seal provider (the HSM), by result.",
    );
    for (result, n) in [
        ("ok", status.calls.ok),
        ("failed", status.calls.failed),
        ("timed_out", status.calls.timed_out),
    ] {
        f.sample(
            "custody_hsm_calls_total",
            &format!("result=\"{result}\""),
            n,
        );
    }
    f.head(
        "custody_hsm_breaker_opened_total",
        "counter",
        "Times the circuit breaker in front of the seal provider opened.",
    );
    f.sample(
        "custody_hsm_breaker_opened_total",
        "",
        status.calls.breaker_opened,
    );
    f.head(
        "custody_seed_cache_age_seconds",
        "gauge",
        "Age of the keyed seed state the cores serve with (absent while sealed).",
    );
    if let Some(at) = status.key_unsealed_ms {
        f.sample(
            "custody_seed_cache_age_seconds",
            "",
            now.saturating_sub(at) as f64 / 1e3,
        );
    }
    f.head(
        "custody_policy_generation",
        "gauge",
        "The access policy's generation in force (1 at start, one more per reload).",
    );
    f.sample("custody_policy_generation", "", policy_generation);
    out
}

fn render_tls(out: &mut String, generation: u64, not_after: i64) {
    let mut f = Family { out };
    f.head(
        "custody_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the server certificate new connections are shown expires (Unix seconds); a reload (SIGHUP) puts a new one in force.",
    );
    f.sample(
        "custody_tls_certificate_expiry_timestamp_seconds",
        "",
        not_after,
    );
    f.head(
        "custody_tls_generation",
        "gauge",
        "The TLS certificate, key and connection limits' generation in force (1 at start, one more per reload).",
    );
    f.sample("custody_tls_generation", "", generation);
}

fn render_auditor(out: &mut String, s: &crate::auditor::AuditorStatus) {
    let mut f = Family { out };
    f.head(
        "custody_audit_reconciliation_drift_ratio",
        "gauge",
        "Assets whose stored counter differs from their newest audited counter, over the assets checked, at the last reconciliation.",
    );
    f.sample(
        "custody_audit_reconciliation_drift_ratio",
        "",
        s.drift_ratio,
    );
    f.head(
        "custody_audit_chain_broken_shards",
        "gauge",
        "Shards whose audit hash chain or checkpoints did not verify (CHAIN_BROKEN).",
    );
    f.sample("custody_audit_chain_broken_shards", "", s.broken_shards);
    f.head(
        "custody_audit_reconciliation_findings_total",
        "counter",
        "Reconciliation findings by kind, over every run (drift is found again at each run until fixed).",
    );
    for (i, kind) in crate::reconcile::FindingKind::ALL.iter().enumerate() {
        f.sample(
            "custody_audit_reconciliation_findings_total",
            &format!("kind=\"{}\"", kind.name()),
            s.findings[i],
        );
    }
    f.head(
        "custody_audit_reconciliation_runs_total",
        "counter",
        "Reconciliation runs, by result.",
    );
    f.sample(
        "custody_audit_reconciliation_runs_total",
        "result=\"ok\"",
        s.runs,
    );
    f.sample(
        "custody_audit_reconciliation_runs_total",
        "result=\"failed\"",
        s.failed_runs,
    );
    f.head(
        "custody_audit_reconciliation_records_checked_total",
        "counter",
        "Audit records the reconciliation checked.",
    );
    f.sample(
        "custody_audit_reconciliation_records_checked_total",
        "",
        s.records_checked,
    );
    f.head(
        "custody_audit_reconciliation_last_run_timestamp_seconds",
        "gauge",
        "When the last reconciliation finished (Unix time; 0 before the first).",
    );
    f.sample(
        "custody_audit_reconciliation_last_run_timestamp_seconds",
        "",
        s.last_run_unix_ms as f64 / 1e3,
    );
    f.head(
        "custody_audit_reconciliation_duration_seconds",
        "gauge",
        "How long the last reconciliation took.",
    );
    f.sample(
        "custody_audit_reconciliation_duration_seconds",
        "",
        s.last_duration.as_secs_f64(),
    );
}

/// The name of a raw opcode byte (a reply's bit ignored); "UNKNOWN" for none.
pub fn opcode_label(opcode: u8) -> &'static str {
    Opcode::from_u8(opcode & !crate::wire::REPLY_BIT).map_or("UNKNOWN", Opcode::name)
}

/// Binds the admin listener (a start-up failure if the address is taken) and serves it
/// on a thread of its own.
pub fn spawn_admin_listener(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("custody-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &registry) {
                            tracing::debug!(error = %e, "admin listener: request not answered");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin listener: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(bound)
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminRequest {
    Get {
        path: String,
        head: bool,
    },
    /// Not GET or HEAD.
    Method,
    Malformed,
}

/// Parses an HTTP/1.x request head (pure; the fuzz target's entry).
pub fn parse_request(head: &[u8]) -> AdminRequest {
    let Ok(text) = std::str::from_utf8(head) else {
        return AdminRequest::Malformed;
    };
    let Some(line) = text.split("\r\n").next() else {
        return AdminRequest::Malformed;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return AdminRequest::Malformed;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return AdminRequest::Malformed;
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    match method {
        "GET" => AdminRequest::Get { path, head: false },
        "HEAD" => AdminRequest::Get { path, head: true },
        _ => AdminRequest::Method,
    }
}

/// The fuzz target's entry: any bytes through the request-head parser; a GET's path
/// must be a prefix-free piece of the request line.
pub fn fuzz_decode(data: &[u8]) {
    if let AdminRequest::Get { path, .. } = parse_request(data) {
        assert!(path.starts_with('/') && !path.contains(' ') && !path.contains('?'));
    }
}

fn answer(mut s: TcpStream, registry: &Registry) -> std::io::Result<()> {
    s.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
    s.set_write_timeout(Some(ADMIN_IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(end);
        }
        if buf.len() >= ADMIN_REQUEST_BYTES_MAX {
            break None;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (code, reason, content_type, body, head_only) =
        match head_end.map(|e| parse_request(&buf[..e])) {
            None => (
                431,
                "Request Header Fields Too Large",
                "text/plain",
                "request head too large\n".to_owned(),
                false,
            ),
            Some(AdminRequest::Malformed) => (
                400,
                "Bad Request",
                "text/plain",
                "bad request\n".to_owned(),
                false,
            ),
            Some(AdminRequest::Method) => (
                405,
                "Method Not Allowed",
                "text/plain",
                "GET or HEAD only\n".to_owned(),
                false,
            ),
            Some(AdminRequest::Get { path, head }) => match path.as_str() {
                "/metrics" => (
                    200,
                    "OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    registry.render(),
                    head,
                ),
                "/healthz" | "/readyz" => {
                    let h = if path == "/healthz" {
                        registry.health()
                    } else {
                        registry.readiness()
                    };
                    let body = if h.ok {
                        "ok\n".to_owned()
                    } else {
                        h.problems.join("\n") + "\n"
                    };
                    if h.ok {
                        (200, "OK", "text/plain", body, head)
                    } else {
                        (503, "Service Unavailable", "text/plain", body, head)
                    }
                }
                _ => (
                    404,
                    "Not Found",
                    "text/plain",
                    "not found: /metrics, /healthz, /readyz\n".to_owned(),
                    head,
                ),
            },
        };
    let mut reply = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        reply.extend_from_slice(body.as_bytes());
    }
    s.write_all(&reply)?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_or_are_refused() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x"),
            AdminRequest::Get {
                path: "/metrics".into(),
                head: false
            }
        );
        assert_eq!(
            parse_request(b"HEAD /readyz?verbose=1 HTTP/1.0"),
            AdminRequest::Get {
                path: "/readyz".into(),
                head: true
            }
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1"),
            AdminRequest::Method
        );
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET metrics HTTP/1.1",
            b"GET /metrics SPDY/3",
            b"GET /metrics HTTP/1.1 extra",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_request(bad), AdminRequest::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn fuzz_entry_survives_mutations() {
        crate::testing::mutation_sweep(
            b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\n",
            5_000,
            6,
            0x2545_f491_4f6c_dd1d,
            fuzz_decode,
        );
    }

    #[test]
    fn histograms_render_cumulative_buckets_with_sum_and_count() {
        let mut l = Latency::default();
        for us in [50, 800, 800, 30_000, 2_000_000] {
            l.record(Duration::from_micros(us));
        }
        let mut out = String::new();
        Family { out: &mut out }.histogram(
            "x_seconds",
            "help",
            &l.us,
            l.sum_us as f64 / 1e6,
            &LATENCY_BUCKETS_S,
            1e-6,
        );
        let value = |le: &str| -> u64 {
            let line = out
                .lines()
                .find(|x| x.starts_with(&format!("x_seconds_bucket{{le=\"{le}\"}}")))
                .unwrap_or_else(|| panic!("no bucket {le}:\n{out}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(value("0.0001"), 1);
        assert_eq!(value("0.001"), 3);
        assert_eq!(value("0.05"), 4);
        assert_eq!(value("2.5"), 5);
        assert_eq!(value("+Inf"), 5);
        assert!(out.contains("x_seconds_sum 2.03165\n"), "{out}");
        assert!(out.contains("x_seconds_count 5\n"), "{out}");
        assert!(out.starts_with("# HELP x_seconds help\n# TYPE x_seconds histogram\n"));
    }

    #[test]
    fn replies_are_counted_by_opcode_and_status() {
        let mut m = NetMetrics::default();
        m.count_reply(Opcode::Derive as u8, Status::Ok);
        m.count_reply(Opcode::Derive as u8 | crate::wire::REPLY_BIT, Status::Ok);
        m.count_reply(0x7f, Status::UnknownOpcode);
        let ok = Status::ALL.iter().position(|s| *s == Status::Ok).unwrap();
        let unknown = Status::ALL
            .iter()
            .position(|s| *s == Status::UnknownOpcode)
            .unwrap();
        assert_eq!(m.replies[Opcode::Derive as usize][ok], 2);
        assert_eq!(m.replies[0][unknown], 1);
    }
}

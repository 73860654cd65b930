//! The Prometheus text exposition (format 0.0.4): each family, or group of families,
//! written by a function of its own from the cores' published figures and the live
//! sources (the seal, the policy, the auditor, the TLS settings, the heap).

use super::figures::{merge, CoreFigures, Merged, OPCODE_SLOTS};
use crate::admission::Refused;
use crate::policy::DenyReason;
use crate::seal::cache::{clock_ms, CacheStatus, SealState, SeedCache};
use crate::wire::{Opcode, Status};
use hdrhistogram::Histogram;
use std::fmt::Write as _;

/// Bucket bounds (seconds) of the latency histograms as Prometheus sees them.
const LATENCY_BUCKETS_S: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];
/// Bucket bounds of the commit batch size histogram (records).
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

pub(super) fn render_heap(out: &mut String, heap: crate::heap::HeapFigures) {
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

/// The role and, on a shared store, the lease: its age, takeovers and step-downs.
pub(super) fn render_lease(out: &mut String, lease: &crate::lease::Lease) {
    use crate::lease::Role;
    let mut f = Family { out };
    f.head(
        "custody_role",
        "gauge",
        "This appliance's role: 1 for the one it has (active holds the store's lease and acknowledges; lapsed holds it but could not renew it in time and acknowledges nothing; activating has taken the lease and is loading its shards; standby answers NOT_ACTIVE).",
    );
    let role = lease.role_name();
    for name in [
        Role::Active.name(),
        crate::lease::LAPSED,
        Role::Activating.name(),
        Role::Standby.name(),
    ] {
        let label = format!("role=\"{name}\"");
        f.sample("custody_role", &label, u64::from(name == role));
    }
    // The lease's families are exported on the single-node store too (acknowledging for
    // good, no token, no takeovers), so that one dashboard and one set of alerts fit both.
    f.head(
        "custody_lease_acknowledging",
        "gauge",
        "1 while this appliance may acknowledge: active, and its last lease renewal recent enough (store.postgres_owner_lease_ms minus store.postgres_owner_lease_margin_ms).",
    );
    f.sample(
        "custody_lease_acknowledging",
        "",
        u64::from(lease.may_acknowledge()),
    );
    f.head(
        "custody_lease_age_ms",
        "gauge",
        "Milliseconds since the last lease renewal was sent (absent while no lease is held, and on the single-node store).",
    );
    if let Some(age) = lease.age_ms() {
        f.sample("custody_lease_age_ms", "", age);
    }
    f.head(
        "custody_lease_token",
        "gauge",
        "The fencing token this appliance holds (0: none).",
    );
    f.sample("custody_lease_token", "", lease.token().max(0) as u64);
    f.head(
        "custody_lease_takeovers_total",
        "counter",
        "Times this appliance took the store's lease (its start as the active included).",
    );
    f.sample("custody_lease_takeovers_total", "", lease.takeovers());
    f.head(
        "custody_lease_step_downs_total",
        "counter",
        "Times this appliance found another holding the lease and stepped down to standby.",
    );
    f.sample("custody_lease_step_downs_total", "", lease.step_downs());
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

/// The families of the cores' figures, the seal's and the policy's, in their order.
pub(super) fn render(cores: &[CoreFigures], seal: &SeedCache, policy_generation: u64) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let mut f = Family { out: &mut out };
    render_requests(&mut f, cores);
    let merged = merge(cores);
    render_latencies(&mut f, &merged);
    render_store(&mut f, cores);
    render_transitions(&mut f, cores, merged);
    render_refusals(&mut f, cores);
    render_shards(&mut f, cores);
    render_connections(&mut f, cores);
    render_connections_closed(&mut f, cores);
    // The seal, read live.
    let status = seal.status();
    let now = clock_ms();
    render_seal_state(&mut f, &status, now);
    render_seal_provider(&mut f, &status, now);
    f.head(
        "custody_policy_generation",
        "gauge",
        "The access policy's generation in force (1 at start, one more per reload).",
    );
    f.sample("custody_policy_generation", "", policy_generation);
    out
}

/// Requests by operation and status, summed over the cores.
fn render_requests(f: &mut Family<'_>, cores: &[CoreFigures]) {
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
}

/// The latency histograms and the commit batch sizes, merged over the cores.
fn render_latencies(f: &mut Family<'_>, m: &Merged) {
    f.histogram(
        "custody_derivation_latency_seconds",
        "DERIVE requests that reached a shard, from decoding to the reply (the audit record durable, the key derived).",
        &m.derive.us,
        m.derive.sum_us as f64 / 1e6,
        &LATENCY_BUCKETS_S,
        1e-6,
    );
    f.histogram(
        "custody_shard_queue_wait_seconds",
        "Operations from acceptance by their shard to the sealing of their commit batch.",
        &m.queue.us,
        m.queue.sum_us as f64 / 1e6,
        &LATENCY_BUCKETS_S,
        1e-6,
    );
    f.histogram(
        "custody_commit_latency_seconds",
        "Committed batches, from sealing to the store's answer.",
        &m.commit.us,
        m.commit.sum_us as f64 / 1e6,
        &LATENCY_BUCKETS_S,
        1e-6,
    );
    f.histogram(
        "custody_commit_batch_records",
        "Audit records per committed batch.",
        &m.batches,
        m.batch_sum as f64,
        &BATCH_BUCKETS,
        1.0,
    );
}

/// The store's failures and whether it took each shard's last batch.
fn render_store(f: &mut Family<'_>, cores: &[CoreFigures]) {
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
}

/// The durable lifecycle transitions: the registrations, then the merged pairs in order.
fn render_transitions(f: &mut Family<'_>, cores: &[CoreFigures], merged: Merged) {
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
    let mut pairs: Vec<_> = merged.transitions.into_iter().collect();
    pairs.sort_by_key(|((a, b), _)| (*a as u8, *b as u8));
    for ((from, to), n) in pairs {
        f.sample(
            "custody_key_lifecycle_transitions_total",
            &format!("from=\"{}\",to=\"{}\"", from.name(), to.name()),
            n,
        );
    }
}

/// Requests the policy and the rate limit refused.
fn render_refusals(f: &mut Family<'_>, cores: &[CoreFigures]) {
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
}

/// What each shard holds (its assets, its audit head) and what the cores hand each other.
fn render_shards(f: &mut Family<'_>, cores: &[CoreFigures]) {
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
}

/// Connections per core: open, accepted, refused a slot, and the slots in use.
fn render_connections(f: &mut Family<'_>, cores: &[CoreFigures]) {
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
}

/// Connections per core the appliance closed, and the TLS handshakes that failed.
fn render_connections_closed(f: &mut Family<'_>, cores: &[CoreFigures]) {
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
}

/// The seal state, how long it has held, and the unseal shares while unsealing.
fn render_seal_state(f: &mut Family<'_>, status: &CacheStatus, now: u64) {
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
}

/// The calls to the seal provider, its breaker, and the age of the seed state served.
fn render_seal_provider(f: &mut Family<'_>, status: &CacheStatus, now: u64) {
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
}

pub(super) fn render_tls(out: &mut String, generation: u64, not_after: i64) {
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

pub(super) fn render_auditor(out: &mut String, s: &crate::auditor::AuditorStatus) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Latency;
    use std::time::Duration;

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
}

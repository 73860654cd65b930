//! What each core counts and publishes: the latency and batch histograms, the connection
//! side's [`NetMetrics`], the shard's [`ShardFigures`], one core's published
//! [`CoreFigures`], and their merge over the cores when a scrape sums them.

use crate::admission::{Refused, SlotsInUse};
use crate::lifecycle::AssetState;
use crate::policy::DenyReason;
use crate::seal::cache::clock_ms;
use crate::wire::{Opcode, Status};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::time::Duration;

/// Upper bound of the latency histograms (60 s, in microseconds).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Opcode slots of the request counters: slot 0 counts requests with an unknown opcode.
pub(super) const OPCODE_SLOTS: usize = 32;

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

/// The figures a scrape sums over the cores into one family each.
pub(super) struct Merged {
    pub derive: Latency,
    pub queue: Latency,
    pub commit: Latency,
    pub batches: Histogram<u64>,
    pub batch_sum: u64,
    pub transitions: HashMap<(AssetState, AssetState), u64>,
}

/// Sums the histograms and the lifecycle transitions of every core.
pub(super) fn merge(cores: &[CoreFigures]) -> Merged {
    let mut m = Merged {
        derive: Latency::default(),
        queue: Latency::default(),
        commit: Latency::default(),
        batches: batch_histogram(),
        batch_sum: 0,
        transitions: HashMap::new(),
    };
    for c in cores {
        m.derive.add(&c.net.derive_latency);
        m.queue.add(&c.shard.queue_wait);
        m.commit.add(&c.shard.commit);
        let _ = m.batches.add(&c.shard.batch_records);
        m.batch_sum = m.batch_sum.saturating_add(c.shard.batch_records_sum);
        for (k, v) in &c.shard.transitions {
            *m.transitions.entry(*k).or_default() += v;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

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

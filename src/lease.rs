//! Who may acknowledge: this appliance's role and its lease on the store (I6).
//!
//! With the PostgreSQL store any number of appliances run against one database; one
//! holds the store's owner lease and is *active*, the others are *standbys*. The lease is
//! a row the active renews (PostgreSQL's clock decides when it lapses, never a host's);
//! each acquisition moves the row's fencing token forward, and every commit carries the
//! token it was read under, so a stale active's commit always fails. This module is the
//! pure part: the state every core reads on each request, and the rules for moving it.
//! The I/O (taking and renewing the row) is `store::postgres::lease`.
//!
//! An appliance acknowledges only while [`Lease::may_acknowledge`] holds: it is active
//! (every core has loaded its shard under the token in force) and its last renewal is
//! recent enough that the lease cannot have lapsed at PostgreSQL yet. That deadline is
//! the instant the renewal was *sent* plus the lease minus a margin
//! ([`LeaseTiming::margin`]): the server stamps the renewal after it was sent, so the
//! server's lapse comes at least the margin after the appliance stops acknowledging.
//!
//! A lease covers a *scope* of the asset space; today there is one, the whole space
//! ([`WHOLE_ASSET_SPACE`]). Holding one lease per partition (several actives on disjoint
//! partitions) would keep one [`Lease`] per scope and route each shard to its scope's.
//!
//! The state is written by the lease thread and read by every core: a hand-off between
//! threads, written against [`crate::sync`] so that `loom-tests/` checks it under loom.
//!
//! The embedded SQLite store is single-node: its appliance is active for good
//! ([`Lease::sole`]).

use crate::sync::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Mutex, Ordering};
use std::time::{Duration, Instant};

/// The lease scope of the whole asset space: the one row of `custody_owner` today.
pub const WHOLE_ASSET_SPACE: i16 = 1;

/// What this appliance is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Holds no lease: answers NOT_ACTIVE, watches the lease, takes it when it lapses.
    Standby = 0,
    /// Holds the lease; its cores are loading their shards under the new token.
    Activating = 1,
    /// Holds the lease and every core has loaded its shard under it.
    Active = 2,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Activating => "activating",
            Role::Active => "active",
        }
    }

    fn from_u8(v: u8) -> Role {
        match v {
            1 => Role::Activating,
            2 => Role::Active,
            _ => Role::Standby,
        }
    }
}

/// [`Lease::role_name`] of an active that could not renew its lease in time.
pub const LAPSED: &str = "lapsed";

/// The lease's timing, from `store.postgres_owner_lease_ms` and
/// `store.postgres_owner_lease_margin_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long the lease lasts at PostgreSQL after a renewal.
    pub lease: Duration,
    /// How much sooner than that the active stops acknowledging when it cannot renew.
    pub margin: Duration,
}

impl LeaseTiming {
    /// How often the active renews: four times a lease, so that two renewals can fail
    /// in a row before the margin is reached at the defaults.
    pub fn renew_every(&self) -> Duration {
        self.lease / 4
    }

    /// How often a standby looks at the lease: ten times a lease (at most a tenth of the
    /// lease is added to a takeover).
    pub fn watch_every(&self) -> Duration {
        self.lease / 10
    }

    /// How long after a renewal was sent the active may go on acknowledging.
    pub fn acknowledge_for(&self) -> Duration {
        self.lease.saturating_sub(self.margin)
    }
}

/// The lease state every core reads. The hot path ([`Lease::may_acknowledge`]) is two
/// atomic loads and a clock read; the rest changes a few times a lease at most.
pub struct Lease {
    epoch: Instant,
    cores: u32,
    role: AtomicU8,
    /// The fencing token this appliance holds (0: none).
    token: AtomicI64,
    /// Nanoseconds after `epoch` until which this appliance may acknowledge (0: not at
    /// all; `u64::MAX`: for good, the single-node store).
    until_ns: AtomicU64,
    /// Cores whose shard is loaded under `token`.
    ready: Mutex<(i64, u32)>,
    /// When the last renewal (or the acquisition) was sent, nanoseconds after `epoch`.
    renewed_ns: AtomicU64,
    takeovers: AtomicU64,
    step_downs: AtomicU64,
    /// The active's client address as the store names it (a standby's NOT_ACTIVE).
    active: Mutex<Option<String>>,
    /// Set once the appliance drains: it neither renews nor takes the lease again.
    leaving: AtomicBool,
    single_node: bool,
}

impl Lease {
    /// The lease of an appliance that shares its store with others: a standby until it
    /// takes the lease.
    pub fn shared(cores: usize) -> Lease {
        Lease::new(cores, false)
    }

    /// The single-node store's: active for good, nothing to renew.
    pub fn sole(cores: usize) -> Lease {
        let lease = Lease::new(cores, true);
        lease.role.store(Role::Active as u8, Ordering::Release);
        lease.until_ns.store(u64::MAX, Ordering::Release);
        lease
    }

    /// A lease taken once and never renewed (tools, tests and benches that hold the
    /// store with [`crate::store::postgres::acquire_ownership`]): active under `token`
    /// until it is found lost.
    pub fn held(token: i64) -> Lease {
        let lease = Lease::new(1, false);
        lease.token.store(token, Ordering::Release);
        lease.role.store(Role::Active as u8, Ordering::Release);
        lease.until_ns.store(u64::MAX, Ordering::Release);
        lease
    }

    fn new(cores: usize, single_node: bool) -> Lease {
        Lease {
            epoch: Instant::now(),
            cores: cores.max(1) as u32,
            role: AtomicU8::new(Role::Standby as u8),
            token: AtomicI64::new(0),
            until_ns: AtomicU64::new(0),
            ready: Mutex::new((0, 0)),
            renewed_ns: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            step_downs: AtomicU64::new(0),
            active: Mutex::new(None),
            leaving: AtomicBool::new(false),
            single_node,
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Whether this appliance may acknowledge now: active, and its lease renewed recently
    /// enough that it cannot have lapsed at the store.
    #[inline]
    pub fn may_acknowledge(&self) -> bool {
        if self.role.load(Ordering::Acquire) != Role::Active as u8 {
            return false;
        }
        // For good (the single-node store, a held lease): no clock read on the hot path.
        let until = self.until_ns.load(Ordering::Acquire);
        until == u64::MAX || self.ns(Instant::now()) < until
    }

    /// [`Lease::may_acknowledge`] for a commit made under `token`: the token must still be
    /// the one held (a batch read under an older one is not this lease's).
    pub fn may_acknowledge_for(&self, token: i64) -> bool {
        self.may_acknowledge() && self.token.load(Ordering::Acquire) == token
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }

    /// The role as operators see it (metrics, status line): `lapsed` for an active that
    /// holds the lease but could not renew it in time, and so acknowledges nothing.
    pub fn role_name(&self) -> &'static str {
        match self.role() {
            Role::Active if !self.may_acknowledge() => LAPSED,
            role => role.name(),
        }
    }

    /// The token held (0 when none): what a shard loads and commits under.
    pub fn token(&self) -> i64 {
        self.token.load(Ordering::Acquire)
    }

    pub fn is_single_node(&self) -> bool {
        self.single_node
    }

    /// The lease was taken with `token` (its request sent at `sent`): the cores load their
    /// shards under it, and the role turns active once all have.
    pub fn acquired(&self, token: i64, sent: Instant, timing: &LeaseTiming) {
        assert!(token > 0, "a fencing token is positive");
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        *ready = (token, 0);
        self.token.store(token, Ordering::Release);
        self.role.store(Role::Activating as u8, Ordering::Release);
        self.renewed(token, sent, timing);
        self.takeovers.fetch_add(1, Ordering::Relaxed);
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A renewal of `token`, sent at `sent`, succeeded.
    pub fn renewed(&self, token: i64, sent: Instant, timing: &LeaseTiming) {
        if self.token() != token {
            return;
        }
        let sent_ns = self.ns(sent);
        let until = sent_ns.saturating_add(timing.acknowledge_for().as_nanos() as u64);
        // Never backward: an older renewal's answer arriving late does not shorten it.
        self.until_ns.fetch_max(until, Ordering::AcqRel);
        self.renewed_ns.fetch_max(sent_ns, Ordering::AcqRel);
    }

    /// A core has loaded its shard under `token`. Returns true when this made every core
    /// ready, and the role active.
    pub fn core_ready(&self, token: i64) -> bool {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if ready.0 != token || self.token() != token {
            return false;
        }
        ready.1 += 1;
        assert!(
            ready.1 <= self.cores,
            "more cores ready ({}) than the appliance has ({})",
            ready.1,
            self.cores
        );
        if ready.1 == self.cores && self.role() == Role::Activating {
            self.role.store(Role::Active as u8, Ordering::Release);
            return true;
        }
        false
    }

    /// The lease is lost (another appliance took it, or it lapsed): acknowledge nothing
    /// from now on. Returns false if `token` was not the one held (already stepped down).
    pub fn step_down(&self, token: i64) -> bool {
        assert!(
            !self.single_node,
            "the single-node store has no lease to lose"
        );
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if self.token() != token || token == 0 {
            return false;
        }
        self.role.store(Role::Standby as u8, Ordering::Release);
        self.until_ns.store(0, Ordering::Release);
        self.token.store(0, Ordering::Release);
        *ready = (0, 0);
        self.step_downs.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The appliance has drained: from now on it neither renews nor takes the lease (the
    /// store's release hands it on at once).
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    pub fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// What the store says of the active (a standby's view; `None` when unknown).
    pub fn set_active_address(&self, address: Option<String>) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = address;
    }

    pub fn active_address(&self) -> Option<String> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Milliseconds since the last renewal was sent (`None` when no lease is held, or on
    /// the single-node store).
    pub fn age_ms(&self) -> Option<u64> {
        if self.single_node || self.token() == 0 {
            return None;
        }
        let renewed = self.renewed_ns.load(Ordering::Acquire);
        Some(self.ns(Instant::now()).saturating_sub(renewed) / 1_000_000)
    }

    /// Times this appliance took the lease.
    pub fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }

    /// Times it lost it.
    pub fn step_downs(&self) -> u64 {
        self.step_downs.load(Ordering::Relaxed)
    }

    /// Why this appliance does not acknowledge now, for the NOT_ACTIVE a request gets
    /// (with [`Lease::active_address`]) and for /readyz.
    pub fn why_not_acknowledging(&self) -> String {
        match self.role() {
            Role::Standby => "this appliance is a standby".to_owned(),
            Role::Activating => "this appliance is taking over; its shards are loading".into(),
            Role::Active => format!(
                "this appliance could not renew its lease in time (last renewal sent {} ms ago)",
                self.age_ms().unwrap_or(0)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> LeaseTiming {
        LeaseTiming {
            lease: Duration::from_millis(2000),
            margin: Duration::from_millis(500),
        }
    }

    #[test]
    fn a_standby_acknowledges_nothing_until_every_core_loaded() {
        let l = Lease::shared(2);
        assert!(!l.may_acknowledge());
        l.acquired(7, Instant::now(), &timing());
        assert_eq!(l.role(), Role::Activating);
        assert!(!l.may_acknowledge());
        assert!(
            !l.core_ready(6),
            "a core loaded under another token does not count"
        );
        assert!(!l.core_ready(7));
        assert!(!l.may_acknowledge());
        assert!(l.core_ready(7));
        assert!(l.may_acknowledge());
        assert!(l.may_acknowledge_for(7));
        assert!(!l.may_acknowledge_for(6));
        assert_eq!(l.takeovers(), 1);
    }

    #[test]
    fn acknowledging_stops_a_margin_before_the_lease_lapses() {
        let short = LeaseTiming {
            lease: Duration::from_millis(200),
            margin: Duration::from_millis(50),
        };
        let l = Lease::shared(1);
        let sent = Instant::now();
        l.acquired(3, sent, &short);
        l.core_ready(3);
        assert!(l.may_acknowledge());
        // Past the lease minus the margin since the renewal was sent: no more.
        std::thread::sleep(Duration::from_millis(160));
        assert_eq!(l.role(), Role::Active);
        assert!(!l.may_acknowledge());
        assert!(l.why_not_acknowledging().contains("could not renew"));
        l.renewed(3, Instant::now(), &short);
        assert!(l.may_acknowledge());
        // A late answer to an older renewal does not shorten the lease.
        l.renewed(3, sent, &short);
        assert!(l.may_acknowledge());
        // Nor does a renewal of a token no longer held extend it.
        l.step_down(3);
        l.renewed(3, Instant::now(), &short);
        assert!(!l.may_acknowledge());
    }

    #[test]
    fn stepping_down_is_for_the_token_held() {
        let l = Lease::shared(1);
        l.acquired(4, Instant::now(), &timing());
        l.core_ready(4);
        assert!(!l.step_down(3));
        assert!(l.may_acknowledge());
        assert!(l.step_down(4));
        assert!(!l.may_acknowledge());
        assert_eq!(l.role(), Role::Standby);
        assert_eq!(l.token(), 0);
        assert!(!l.step_down(4), "once");
        assert_eq!(l.step_downs(), 1);
        l.set_active_address(Some("b.example:7443".into()));
        assert_eq!(l.why_not_acknowledging(), "this appliance is a standby");
        assert_eq!(l.active_address().as_deref(), Some("b.example:7443"));
    }

    #[test]
    fn an_active_past_its_deadline_is_reported_lapsed() {
        let short = LeaseTiming {
            lease: Duration::from_millis(100),
            margin: Duration::from_millis(40),
        };
        let l = Lease::shared(1);
        l.acquired(2, Instant::now(), &short);
        l.core_ready(2);
        assert_eq!(l.role_name(), "active");
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(l.role_name(), LAPSED);
        assert_eq!(l.role(), Role::Active, "it still holds the lease");
    }

    #[test]
    fn the_single_node_store_is_active_for_good() {
        let l = Lease::sole(2);
        assert!(l.may_acknowledge());
        assert_eq!(l.age_ms(), None);
        assert_eq!(l.role(), Role::Active);
    }

    #[test]
    fn the_default_timing_renews_twice_within_the_margin() {
        let t = timing();
        assert_eq!(t.renew_every(), Duration::from_millis(500));
        assert_eq!(t.acknowledge_for(), Duration::from_millis(1500));
        assert_eq!(t.watch_every(), Duration::from_millis(200));
    }
}

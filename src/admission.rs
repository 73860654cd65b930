//! Who may hold a connection slot on this core: pure bookkeeping, no I/O, no clock.
//!
//! Two kinds of slot, kept apart so that a client that has not authenticated can never take
//! the slot of one that has (I8):
//!
//! - **Handshakes in progress**: at most `limits.max_handshakes_per_core`, and at most
//!   `limits.max_handshakes_per_source` from one source (an IPv4 address, or an IPv6 /64:
//!   one host is given a whole /64). A source at its bound is refused at once. When the
//!   core's table is full, a new handshake *evicts the oldest one*: a flood from many
//!   sources then cycles through the table in a fraction of a second, and a real client's
//!   handshake, which takes a few milliseconds, completes in between; a full table that
//!   refused newcomers would instead lock everyone out for a whole handshake timeout.
//! - **Established connections** (after the handshake, when the identity is known): at most
//!   `limits.max_connections_per_core`; one identity with a role at most
//!   `limits.max_connections_per_identity`; an identity with no role (it may only say HELLO
//!   and SEAL_STATUS) at most `limits.max_connections_per_roleless_identity`, and all of
//!   them together at most `limits.max_roleless_connections_per_core`. Start-up checks
//!   that each per-identity bound is below the core's, so one identity never fills a core.
//!
//! Established connections are not bounded per source address: services of a firm share
//! hosts and NAT addresses, and a per-source bound would let a roleless identity on a
//! shared host lock out a deriver on the same host. The identity bounds cover them.
//!
//! Every map here holds an entry only while its count is above zero, so each is bounded by
//! the slots it counts.

use crate::config::ConnectionLimits;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The part of a client's address that the per-source bound counts: an IPv4 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 address's /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a connection was refused a slot. The numbers index the per-reason counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_handshakes_per_source`: closed before TLS.
    SourceHandshakes = 0,
    /// `limits.max_connections_per_core`: refused after the handshake.
    CoreConnections = 1,
    /// `limits.max_connections_per_identity`.
    IdentityConnections = 2,
    /// `limits.max_connections_per_roleless_identity`.
    RolelessIdentityConnections = 3,
    /// `limits.max_roleless_connections_per_core`.
    RolelessConnections = 4,
}

impl Refused {
    pub const ALL: [Refused; 5] = [
        Refused::SourceHandshakes,
        Refused::CoreConnections,
        Refused::IdentityConnections,
        Refused::RolelessIdentityConnections,
        Refused::RolelessConnections,
    ];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Refused::SourceHandshakes => "source_handshakes",
            Refused::CoreConnections => "core",
            Refused::IdentityConnections => "identity",
            Refused::RolelessIdentityConnections => "roleless_identity",
            Refused::RolelessConnections => "roleless",
        }
    }

    /// The configuration key of the bound that was hit.
    pub fn key(self) -> &'static str {
        match self {
            Refused::SourceHandshakes => "limits.max_handshakes_per_source",
            Refused::CoreConnections => "limits.max_connections_per_core",
            Refused::IdentityConnections => "limits.max_connections_per_identity",
            Refused::RolelessIdentityConnections => "limits.max_connections_per_roleless_identity",
            Refused::RolelessConnections => "limits.max_roleless_connections_per_core",
        }
    }
}

/// A handshake's place in the table (the oldest has the smallest).
pub type HandshakeTicket = u64;

/// What a new handshake was given.
#[derive(Debug, PartialEq, Eq)]
pub struct HandshakeAdmitted<E> {
    pub ticket: HandshakeTicket,
    /// The oldest handshakes, put out to make room (one, or more after a reload lowered
    /// the bound): each one's task must be told to end.
    pub evicted: Vec<E>,
}

/// One core's slots. `E` is what the caller needs to end an evicted handshake (a wake-up).
pub struct Admission<E> {
    handshakes: BTreeMap<HandshakeTicket, (Source, E)>,
    handshakes_by_source: HashMap<Source, u32>,
    next_ticket: HandshakeTicket,
    established: u32,
    roleless: u32,
    by_identity: HashMap<Arc<str>, u32>,
}

impl<E> Default for Admission<E> {
    fn default() -> Self {
        Admission {
            handshakes: BTreeMap::new(),
            handshakes_by_source: HashMap::new(),
            next_ticket: 0,
            established: 0,
            roleless: 0,
            by_identity: HashMap::new(),
        }
    }
}

/// The slots in use, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotsInUse {
    pub handshakes: u32,
    pub established: u32,
    pub roleless: u32,
    /// The most connections one identity holds on this core.
    pub identity_max: u32,
}

impl<E> Admission<E> {
    /// A TCP connection from `source` asks to start its handshake.
    pub fn begin_handshake(
        &mut self,
        source: Source,
        wake: E,
        limits: &ConnectionLimits,
    ) -> Result<HandshakeAdmitted<E>, Refused> {
        let from_source = self.handshakes_by_source.get(&source).copied().unwrap_or(0);
        if from_source >= limits.max_handshakes_per_source {
            return Err(Refused::SourceHandshakes);
        }
        let mut evicted = Vec::new();
        // A reload may lower the bound below what is held: evict down to it.
        while self.handshakes.len() >= limits.max_handshakes_per_core as usize {
            let Some((&ticket, _)) = self.handshakes.first_key_value() else {
                break;
            };
            evicted.extend(self.end_handshake(ticket));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.handshakes.insert(ticket, (source, wake));
        *self.handshakes_by_source.entry(source).or_insert(0) += 1;
        self.check();
        Ok(HandshakeAdmitted { ticket, evicted })
    }

    /// A handshake ended (done, failed, timed out or evicted); ending one twice is harmless.
    /// Returns its wake-up if it was still in the table.
    pub fn end_handshake(&mut self, ticket: HandshakeTicket) -> Option<E> {
        let (source, wake) = self.handshakes.remove(&ticket)?;
        let count = self
            .handshakes_by_source
            .get_mut(&source)
            .expect("every handshake is counted under its source");
        assert!(*count > 0);
        *count -= 1;
        if *count == 0 {
            self.handshakes_by_source.remove(&source);
        }
        Some(wake)
    }

    /// An authenticated connection of `identity` asks for an established slot.
    pub fn establish(
        &mut self,
        identity: &Arc<str>,
        has_role: bool,
        limits: &ConnectionLimits,
    ) -> Result<(), Refused> {
        if self.established >= limits.max_connections_per_core {
            return Err(Refused::CoreConnections);
        }
        let held = self.by_identity.get(identity).copied().unwrap_or(0);
        if has_role {
            if held >= limits.max_connections_per_identity {
                return Err(Refused::IdentityConnections);
            }
        } else {
            if held >= limits.max_connections_per_roleless_identity {
                return Err(Refused::RolelessIdentityConnections);
            }
            if self.roleless >= limits.max_roleless_connections_per_core {
                return Err(Refused::RolelessConnections);
            }
            self.roleless += 1;
        }
        self.established += 1;
        *self.by_identity.entry(identity.clone()).or_insert(0) += 1;
        Ok(())
    }

    /// An established connection closed; `had_role` as it was given its slot.
    pub fn close(&mut self, identity: &str, had_role: bool) {
        assert!(self.established > 0, "a close without an established slot");
        self.established -= 1;
        if !had_role {
            assert!(
                self.roleless > 0,
                "a roleless close without a roleless slot"
            );
            self.roleless -= 1;
        }
        let count = self
            .by_identity
            .get_mut(identity)
            .expect("every established connection is counted under its identity");
        assert!(*count > 0);
        *count -= 1;
        if *count == 0 {
            self.by_identity.remove(identity);
        }
        self.check();
    }

    pub fn in_use(&self) -> SlotsInUse {
        SlotsInUse {
            handshakes: self.handshakes.len() as u32,
            established: self.established,
            roleless: self.roleless,
            identity_max: self.by_identity.values().copied().max().unwrap_or(0),
        }
    }

    /// The counts agree with each other (cheap: the maps hold one entry per source and
    /// identity with a slot, and are only walked in debug builds).
    fn check(&self) {
        assert!(self.roleless <= self.established);
        debug_assert_eq!(
            self.handshakes_by_source
                .values()
                .map(|&n| n as usize)
                .sum::<usize>(),
            self.handshakes.len()
        );
        debug_assert_eq!(
            self.by_identity
                .values()
                .map(|&n| u64::from(n))
                .sum::<u64>(),
            u64::from(self.established)
        );
    }
}

/// Logs a refusal at most once a second per reason on a core, with how many went unlogged
/// since: a flood of refusals must not become a flood of log writes on the core's thread.
#[derive(Default)]
pub struct RefusalLog {
    last_ms: [u64; Refused::ALL.len()],
    unlogged: [u64; Refused::ALL.len()],
}

/// Shortest time between two log lines of one refusal reason on one core.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 1000;

impl RefusalLog {
    /// Whether to log this refusal now; if so, how many of its reason went unlogged before.
    pub fn should_log(&mut self, reason: Refused, now_ms: u64) -> Option<u64> {
        let i = reason as usize;
        if self.last_ms[i] != 0 && now_ms < self.last_ms[i] + REFUSAL_LOG_INTERVAL_MS {
            self.unlogged[i] += 1;
            return None;
        }
        self.last_ms[i] = now_ms.max(1);
        Some(std::mem::take(&mut self.unlogged[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections_per_core: 10,
            max_inflight_per_connection: 8,
            max_connections_per_identity: 4,
            max_connections_per_roleless_identity: 1,
            max_roleless_connections_per_core: 2,
            max_handshakes_per_core: 3,
            max_handshakes_per_source: 2,
            frame_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
        }
    }

    fn ip(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    #[test]
    fn a_source_at_its_bound_is_refused_and_others_still_get_in() {
        let l = limits();
        let mut a = Admission::<u32>::default();
        a.begin_handshake(ip("10.0.0.1"), 1, &l).unwrap();
        a.begin_handshake(ip("10.0.0.1"), 2, &l).unwrap();
        assert_eq!(
            a.begin_handshake(ip("10.0.0.1"), 3, &l),
            Err(Refused::SourceHandshakes)
        );
        let other = a.begin_handshake(ip("10.0.0.2"), 4, &l).unwrap();
        assert!(other.evicted.is_empty());
        assert_eq!(a.in_use().handshakes, 3);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_handshake_and_ending_it_again_is_harmless() {
        let l = limits();
        let mut a = Admission::<u32>::default();
        let first = a.begin_handshake(ip("10.0.0.1"), 1, &l).unwrap();
        a.begin_handshake(ip("10.0.0.2"), 2, &l).unwrap();
        a.begin_handshake(ip("10.0.0.3"), 3, &l).unwrap();
        let fourth = a.begin_handshake(ip("10.0.0.4"), 4, &l).unwrap();
        assert_eq!(fourth.evicted, vec![1]);
        assert_eq!(a.in_use().handshakes, 3);
        // The evicted task ends its ticket as it goes: nothing changes.
        assert_eq!(a.end_handshake(first.ticket), None);
        assert_eq!(a.in_use().handshakes, 3);
        // Its source's count went with it: 10.0.0.1 may start two again.
        a.begin_handshake(ip("10.0.0.1"), 5, &l).unwrap();
        a.begin_handshake(ip("10.0.0.1"), 6, &l).unwrap();
        assert_eq!(a.in_use().handshakes, 3);
    }

    #[test]
    fn a_lowered_bound_evicts_down_to_it() {
        let mut l = limits();
        l.max_handshakes_per_source = 10;
        let mut a = Admission::<u32>::default();
        for w in 0..3 {
            a.begin_handshake(ip("10.0.0.1"), w, &l).unwrap();
        }
        l.max_handshakes_per_core = 1;
        let next = a.begin_handshake(ip("10.0.0.1"), 9, &l).unwrap();
        // All three were evicted, oldest first, and each is reported, so that every one
        // of their tasks is told to end.
        assert_eq!(next.evicted, vec![0, 1, 2]);
        assert_eq!(a.in_use().handshakes, 1);
    }

    #[test]
    fn ipv6_sources_count_by_slash_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"));
    }

    #[test]
    fn one_identity_never_takes_another_identitys_slots() {
        let l = limits();
        let mut a = Admission::<()>::default();
        let (hog, other): (Arc<str>, Arc<str>) = (Arc::from("hog"), Arc::from("other"));
        for _ in 0..4 {
            a.establish(&hog, true, &l).unwrap();
        }
        assert_eq!(
            a.establish(&hog, true, &l),
            Err(Refused::IdentityConnections)
        );
        a.establish(&other, true, &l).unwrap();
        assert_eq!(a.in_use().identity_max, 4);
        a.close(&hog, true);
        a.establish(&hog, true, &l).unwrap();
    }

    #[test]
    fn roleless_identities_have_small_slots_of_their_own() {
        let l = limits();
        let mut a = Admission::<()>::default();
        let ids: Vec<Arc<str>> = ["x", "y", "z"].into_iter().map(Arc::from).collect();
        a.establish(&ids[0], false, &l).unwrap();
        assert_eq!(
            a.establish(&ids[0], false, &l),
            Err(Refused::RolelessIdentityConnections)
        );
        a.establish(&ids[1], false, &l).unwrap();
        assert_eq!(
            a.establish(&ids[2], false, &l),
            Err(Refused::RolelessConnections)
        );
        // A deriver is not held back by them.
        let deriver: Arc<str> = Arc::from("deriver");
        a.establish(&deriver, true, &l).unwrap();
        assert_eq!(
            a.in_use(),
            SlotsInUse {
                handshakes: 0,
                established: 3,
                roleless: 2,
                identity_max: 1
            }
        );
        a.close(&ids[1], false);
        a.establish(&ids[2], false, &l).unwrap();
    }

    #[test]
    fn the_core_bound_holds_over_every_identity() {
        let mut l = limits();
        l.max_connections_per_core = 3;
        let mut a = Admission::<()>::default();
        for name in ["a", "b", "c"] {
            a.establish(&Arc::from(name), true, &l).unwrap();
        }
        assert_eq!(
            a.establish(&Arc::from("d"), true, &l),
            Err(Refused::CoreConnections)
        );
    }

    #[test]
    #[should_panic(expected = "a close without an established slot")]
    fn a_close_without_a_slot_is_a_bug_that_is_caught() {
        Admission::<()>::default().close("nobody", true);
    }

    #[test]
    fn refusals_are_logged_once_a_second_per_reason_with_the_count_left_out() {
        let mut log = RefusalLog::default();
        assert_eq!(log.should_log(Refused::CoreConnections, 5_000), Some(0));
        assert_eq!(log.should_log(Refused::CoreConnections, 5_001), None);
        assert_eq!(log.should_log(Refused::CoreConnections, 5_999), None);
        // Another reason has its own second.
        assert_eq!(log.should_log(Refused::SourceHandshakes, 5_500), Some(0));
        assert_eq!(log.should_log(Refused::CoreConnections, 6_000), Some(2));
    }
}

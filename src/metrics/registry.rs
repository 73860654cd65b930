//! The [`Registry`]: one slot per core where that core publishes its figures, the live
//! sources a scrape also reads (the seal, the policy, the auditor, the TLS settings), and
//! what /healthz and /readyz conclude from them.

use super::figures::CoreFigures;
use super::render;
use crate::seal::cache::{clock_ms, SealState, SeedCache};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// The store's lease: the role, read live (`None`: tests that build a bare registry).
    lease: Option<Arc<crate::lease::Lease>>,
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
            lease: None,
        }
    }

    /// The store's lease (read at scrape time): the role, and /readyz only on the active.
    pub fn with_lease(mut self, lease: Arc<crate::lease::Lease>) -> Registry {
        self.lease = Some(lease);
        self
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

    /// Ready: alive, active (holding the store's lease, renewed in time), unsealed (or
    /// serving a stale seed), and the store took the last batch of every shard.
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
            if let Some(lease) = self.lease.as_ref().filter(|l| !l.may_acknowledge()) {
                problems.push(format!("NOT_ACTIVE: {}", lease.why_not_acknowledging()));
            }
            match self.seal.status().state {
                SealState::Unsealed | SealState::ServingStale { .. } => {}
                other => problems.push(format!("sealed: {}", render::seal_state_name(&other))),
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
        let mut out = render::render(&self.snapshot(), &self.seal, self.policy.generation());
        if let Some(status) = &self.auditor {
            let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            render::render_auditor(&mut out, &s);
        }
        if let Some(tls) = &self.tls {
            render::render_tls(
                &mut out,
                tls.generation(),
                tls.current().certificate.not_after,
            );
        }
        if let Some(lease) = &self.lease {
            render::render_lease(&mut out, lease);
        }
        if let Some(heap) = crate::heap::figures() {
            render::render_heap(&mut out, heap);
        }
        out
    }
}

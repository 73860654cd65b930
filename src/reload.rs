//! Re-reading the configuration while serving: SIGHUP and an admin's POLICY_RELOAD.
//!
//! A reload puts in force the policy, the TLS files and the connection limits, whole or
//! not at all; the other sections take a restart, and a reload that finds them changed
//! says so. It runs on a thread of its own (it reads files), never on an executor.

use crate::config::Config;
use crate::published::Published;
use crate::settings::ConnectionSettings;
use std::sync::Arc;

/// What a reload put in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadReport {
    /// The policy's generation now in force (1 at start, one more per reload).
    pub generation: u64,
    pub identities: usize,
    pub regions: usize,
    pub asset_groups: usize,
    /// The server certificate new connections are shown.
    pub certificate: crate::tls::CertificateInfo,
    /// The sections that changed in the file but are read only at start (the reload
    /// left them as they were; they take a restart).
    pub restart_needed: Vec<&'static str>,
}

/// Re-reads the configuration file and puts in force, whole or (when anything in the file
/// does not resolve, or a TLS file is unreadable, expired or not matching its key) not at
/// all: `[policy]` (roles, rate limits, asset groups, regions) and `limits.rate_limit`;
/// `[tls]` (certificate, key, client CA: for connections accepted from then on, while the
/// connections already established keep theirs); `limits.max_connections_per_core` and
/// `limits.max_inflight_per_connection`. On SIGHUP and on an admin's POLICY_RELOAD; one
/// reload at a time. The other sections take a restart, and a reload that finds them
/// changed says so.
pub struct Reloader {
    file: std::path::PathBuf,
    cell: Arc<crate::policy::PolicyCell>,
    settings: Arc<Published<ConnectionSettings>>,
    /// The configuration as started, with the reloaded parts as last put in force: what
    /// a reload compares the file with to name the changes that need a restart.
    running: std::sync::Mutex<Config>,
    /// The CPUs the process may use: a reload runs on them, not pinned to the CPU of the
    /// executor that spawned its thread (where `server.cores = 0` would resolve to 1).
    cpus: Vec<usize>,
    switch: Arc<crate::regions::RegionSwitch>,
    one_at_a_time: std::sync::Mutex<()>,
    /// An admin's POLICY_RELOAD is running (at most one thread for requests at a time).
    requested: std::sync::atomic::AtomicBool,
}

/// The right to run the one requested reload; released when dropped.
pub struct ReloadTicket(Arc<Reloader>);

impl ReloadTicket {
    pub fn reloader(&self) -> &Reloader {
        &self.0
    }
}

impl Drop for ReloadTicket {
    fn drop(&mut self) {
        self.0
            .requested
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Reloader {
    /// A reloader of `file`, which the appliance was started with as `running`: it
    /// replaces the policy in `cell`, the connection settings in `settings` and claims
    /// region slots in `switch`, on `cpus`.
    pub fn new(
        file: std::path::PathBuf,
        cell: Arc<crate::policy::PolicyCell>,
        settings: Arc<Published<ConnectionSettings>>,
        running: Config,
        cpus: Vec<usize>,
        switch: Arc<crate::regions::RegionSwitch>,
    ) -> Reloader {
        Reloader {
            file,
            cell,
            settings,
            running: std::sync::Mutex::new(running),
            cpus,
            switch,
            one_at_a_time: std::sync::Mutex::new(()),
            requested: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn file(&self) -> &std::path::Path {
        &self.file
    }

    /// The ticket for an admin's reload, unless one is running already (then the caller
    /// answers BUSY: requests never queue threads).
    pub fn try_request(self: &Arc<Self>) -> Option<ReloadTicket> {
        self.requested
            .compare_exchange(
                false,
                true,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .ok()
            .map(|_| ReloadTicket(self.clone()))
    }

    /// Blocking (reads the files): call it off the executors. `trigger` (SIGHUP, or who
    /// asked) goes into the log line that says what happened.
    pub fn reload(&self, trigger: &str) -> Result<ReloadReport, String> {
        let outcome = self.reload_quietly();
        match &outcome {
            Ok(r) => {
                tracing::warn!(
                    trigger,
                    file = %self.file.display(),
                    generation = r.generation,
                    identities = r.identities,
                    regions = r.regions,
                    asset_groups = r.asset_groups,
                    certificate = %r.certificate.subject,
                    certificate_serial = %r.certificate.serial,
                    "configuration reloaded: policy, TLS certificate and key, connection limits"
                );
                if !r.restart_needed.is_empty() {
                    tracing::warn!(
                        trigger,
                        sections = %r.restart_needed.join(", "),
                        "changed in the file but read only at start: these changes are not in force until a restart"
                    );
                }
            }
            Err(problems) => tracing::error!(
                trigger,
                file = %self.file.display(),
                %problems,
                "configuration not reloaded; the policy, TLS certificate and limits in force are unchanged"
            ),
        }
        outcome
    }

    fn reload_quietly(&self) -> Result<ReloadReport, String> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        crate::preflight::allow_cpus(&self.cpus);
        let new =
            crate::config::load(&self.file).map_err(|e| e.to_string().trim_end().to_owned())?;
        // Everything is read and checked before anything is put in force.
        let settings = ConnectionSettings::from_config(&new).map_err(|e| format!("tls: {e}"))?;
        // New regions get a slot (with the switch the store holds for them, if any), all
        // or none; a region left out keeps its slot and switch for a later reload. The
        // last check: from here on nothing fails.
        let slots = self
            .switch
            .claim(&new.policy.regions)
            .map_err(|e| format!("policy.regions: {e}"))?;
        let access =
            new.policy
                .access
                .clone()
                .with_regions(crate::policy::RegionTable::with_slots(
                    &new.policy.regions,
                    slots,
                ));
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let restart_needed = restart_needed(&running, &new);
        let identities = access.identities();
        let asset_groups = access.asset_groups().len();
        let certificate = settings.certificate.clone();
        self.settings.replace(settings);
        let generation = self.cell.replace(access);
        running.policy = new.policy;
        running.tls = new.tls;
        running.limits.connection = new.limits.connection;
        Ok(ReloadReport {
            generation,
            identities,
            regions: running.policy.regions.len(),
            asset_groups,
            certificate,
            restart_needed,
        })
    }
}

/// The sections of `new` that differ from `running` and that only a restart puts in force.
fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    // Compared through their Debug text, which every section has (the store's password is
    // redacted there, so a new password alone is not noticed). Nothing here is logged.
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut limits = new.limits.clone();
    limits.connection = running.limits.connection.clone();
    [
        ("server", differs(&running.server, &new.server)),
        ("store", differs(&running.store, &new.store)),
        (
            "seal",
            differs(&running.seal, &new.seal) || differs(&running.seal_timing, &new.seal_timing),
        ),
        ("audit", differs(&running.audit, &new.audit)),
        (
            "limits (other than the connection limits and rate_limit)",
            differs(&running.limits, &limits),
        ),
    ]
    .into_iter()
    .filter_map(|(section, changed)| changed.then_some(section))
    .collect()
}

/// A thread that waits for SIGHUP (blocked in every other thread, since it is blocked
/// here before the executors start) and reloads the policy.
pub fn spawn_sighup_thread(reloader: Arc<Reloader>) {
    // SAFETY: sigset manipulation on a local set. SIGHUP is blocked in every thread since
    // `block_stop_signals`, which runs before any thread starts; only this one takes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    let spawned = std::thread::Builder::new()
        .name("custody-reload".into())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: waits for a signal of `set`, which this thread has blocked.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            // The outcome is logged by the reload.
            let _ = reloader.reload("SIGHUP");
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the reload thread: SIGHUP will not reload the policy");
    }
}

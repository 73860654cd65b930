//! The seed cache: the keyed derivation state, refreshed through the seal provider every
//! TTL, kept serving through an HSM outage for at most `max_stale`, then sealed (I4).
//!
//! ```text
//!   cores ──get()──► CoreKey (per core: an Arc and the generation it came with)
//!                       │ generation changed? (one atomic load per request)
//!                       ▼
//!                  SeedCache ◄──publish / drop── supervisor thread ──unseal──► worker thread
//!                                                  (TTL, breaker,          (owns the provider;
//!                                                   max_stale, seal)        one call at a time)
//! ```
//!
//! - The supervisor asks the worker to unseal when the key is older than the TTL, and
//!   waits at most `hsm_timeout` for the answer. A call that hangs keeps the worker busy:
//!   no second call starts until it returns (zero or one unseal in flight, whatever the
//!   number of cores waiting).
//! - After `breaker_failures` failures in a row the breaker opens: no call for
//!   `breaker_open`, then one probe; a failed probe opens it again.
//! - While refreshes fail, the last key keeps serving until `max_stale` past its TTL, then
//!   it is dropped (zeroized) and derivations answer SEALED until an unseal succeeds.
//! - [`SeedCache::seal`] drops the key at once; cores drop their copies within
//!   [`CORE_KEY_REFRESH`].
//!
//! Readers never see a half-made key: a key is built whole, then published as an `Arc`
//! under a mutex that only the supervisor and a core whose generation is behind take.

use super::shamir::{ShareError, ShareGate, ShareSet, Submitted};
use super::slot::{KeySlot, Mailbox, Reader};
use super::SealError;
use crate::config::CacheTiming;
use crate::kdf::{DerivationKey, RootSeed, Scratch};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How often each core refreshes its copy of the key even without requests, so a sealed
/// or replaced key leaves every core's memory within this bound.
pub const CORE_KEY_REFRESH: Duration = Duration::from_millis(100);

/// Where the root seed comes from, as the cache calls it: on the worker thread, one call
/// at a time.
pub trait SealProvider: Send + 'static {
    fn unseal(&mut self) -> Result<RootSeed, SealError>;
}

/// What the cache is doing, for status, metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SealState {
    /// Serving a key younger than the TTL (the `shamir` provider's key has no TTL).
    Unsealed,
    /// `shamir` provider: no key, and no share submitted yet (how such an appliance starts).
    Sealed { since_ms: u64 },
    /// `shamir` provider: `received` of the `threshold` shares are in.
    Unsealing {
        since_ms: u64,
        received: u8,
        threshold: u8,
    },
    /// Serving a key past its TTL because refreshes fail; `since_ms` on the process clock.
    ServingStale { since_ms: u64 },
    /// No key: an operator sealed it.
    SealedByOperator { since_ms: u64 },
    /// No key: refreshes failed past `max_stale`.
    SealedByFailure { since_ms: u64, reason: String },
}

/// Counters of provider calls, by result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub ok: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    pub state: SealState,
    pub calls: CallCounts,
    /// When the serving key was unsealed (process clock, ms); `None` when sealed.
    pub key_unsealed_ms: Option<u64>,
    /// Provider calls in flight now: 0 or 1.
    pub in_flight: u32,
    /// The fingerprint of the seed last unsealed, or (`shamir`) of the seed the shares
    /// must rebuild: what operators compare with their ceremony record.
    pub fingerprint: Option<String>,
}

/// Milliseconds on a monotonic clock that starts with the process.
pub fn clock_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The shared cache. Cores read it through a [`CoreKey`].
pub struct SeedCache {
    /// The key and until when it may serve (process clock, ms).
    slot: KeySlot<DerivationKey>,
    status: Mutex<CacheStatus>,
    mailbox: Mailbox,
    /// `shamir` provider: the shares submitted so far. `None` for the other providers,
    /// which the supervisor thread calls.
    shares: Option<Mutex<ShareGate>>,
}

/// The answer to one accepted share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsealProgress {
    pub received: u8,
    pub threshold: u8,
    pub unsealed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SeedCache {
    /// Unseals once (within `hsm_timeout`; a failure here fails the start) and starts the
    /// supervisor and worker threads.
    pub fn start(
        provider: Box<dyn SealProvider>,
        timing: CacheTiming,
    ) -> Result<Arc<SeedCache>, SealError> {
        let worker = Worker::spawn(provider)?;
        let cache = Arc::new(SeedCache {
            slot: KeySlot::default(),
            status: Mutex::new(CacheStatus {
                state: SealState::SealedByFailure {
                    since_ms: clock_ms(),
                    reason: "not unsealed yet".into(),
                },
                calls: CallCounts::default(),
                key_unsealed_ms: None,
                in_flight: 0,
                fingerprint: None,
            }),
            mailbox: Mailbox::default(),
            shares: None,
        });
        let mut sup = Supervisor {
            cache: cache.clone(),
            timing,
            worker,
            failures: 0,
            breaker_until: None,
            fresh_until: None,
            operator_sealed: false,
            call_epoch: 0,
        };
        match sup.call() {
            Some(Ok(seed)) => {
                let epoch = sup.call_epoch;
                sup.publish(&seed, epoch)?
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(SealError::Hsm(format!(
                    "the first unseal did not answer within {} ms (seal.hsm_timeout_ms)",
                    timing.hsm_timeout.as_millis()
                )))
            }
        }
        std::thread::Builder::new()
            .name("custody-seal".into())
            .spawn(move || sup.run())
            .map_err(|e| SealError::Hsm(format!("cannot start the seal thread: {e}")))?;
        Ok(cache)
    }

    /// A cache for the `shamir` provider: it starts sealed, with no thread and no
    /// provider; [`SeedCache::submit_share`] unseals it once `set.threshold` shares of the
    /// set's seed are in. Its key has no TTL: it serves until an operator seals.
    pub fn start_with_shares(set: ShareSet) -> Result<Arc<SeedCache>, SealError> {
        let fingerprint = Some(set.fingerprint.clone());
        let gate = ShareGate::new(set)?;
        Ok(Arc::new(SeedCache {
            slot: KeySlot::default(),
            status: Mutex::new(CacheStatus {
                state: SealState::Sealed {
                    since_ms: clock_ms(),
                },
                calls: CallCounts::default(),
                key_unsealed_ms: None,
                in_flight: 0,
                fingerprint,
            }),
            mailbox: Mailbox::default(),
            shares: Some(Mutex::new(gate)),
        }))
    }

    /// Whether this cache unseals with shares (the `shamir` provider).
    pub fn uses_shares(&self) -> bool {
        self.shares.is_some()
    }

    /// The share set a `shamir` cache unseals with.
    pub fn share_set(&self) -> Option<ShareSet> {
        self.shares.as_ref().map(|g| lock(g).set().clone())
    }

    pub fn status(&self) -> CacheStatus {
        if let Some(gate) = &self.shares {
            // Shares left past UNSEAL_PROGRESS_TIMEOUT are gone: say so.
            let mut gate = lock(gate);
            let (received, _) = gate.progress(Instant::now());
            let mut s = lock(&self.status);
            if received == 0 && matches!(s.state, SealState::Unsealing { .. }) {
                s.state = SealState::Sealed {
                    since_ms: clock_ms(),
                };
            }
        }
        lock(&self.status).clone()
    }

    /// Drops the key at once (cores drop their copies within [`CORE_KEY_REFRESH`]); no
    /// refresh happens until [`SeedCache::unseal`] (or, for the `shamir` provider, until
    /// k shares are submitted again). Shares submitted so far are discarded.
    pub fn seal(&self) {
        // Shares mode: the gate first, so no share can be completing an unseal while the
        // slot is sealed (it would publish after this and serve on).
        let gate = self.shares.as_ref().map(lock);
        // Stop serving now, and let no unseal already under way publish after this.
        drop(self.slot.seal());
        lock(&self.status).key_unsealed_ms = None;
        self.set_state(SealState::SealedByOperator {
            since_ms: clock_ms(),
        });
        if let Some(mut gate) = gate {
            gate.reset();
            return;
        }
        self.mailbox.post(|c| {
            c.seal = true;
            c.unseal = false;
        });
    }

    /// Shares mode: discards shares left past [`super::shamir::UNSEAL_PROGRESS_TIMEOUT`]
    /// even when no request comes (each core calls this with its key refresh).
    pub fn expire_shares(&self) {
        if self.shares.is_some() {
            let _ = self.status();
        }
    }

    /// Asks for an unseal through the provider now (after an operator's seal, or to
    /// retry at once). A `shamir` cache unseals only with shares: nothing happens.
    pub fn unseal(&self) {
        if self.shares.is_some() {
            return;
        }
        self.mailbox.post(|c| {
            c.unseal = true;
            c.seal = false;
        });
    }

    /// `shamir` provider: takes one share. The share that completes the threshold
    /// unseals (if the shares rebuild the set's seed); a refused share changes nothing.
    pub fn submit_share(&self, text: &str) -> Result<UnsealProgress, ShareError> {
        let Some(gate) = &self.shares else {
            return Err(ShareError::NotShamir);
        };
        let mut gate = lock(gate);
        if self.slot.has_key() {
            return Err(ShareError::AlreadyUnsealed);
        }
        // A stop (or seal) from here on moves the epoch, and the publish below is refused.
        let epoch = self.slot.epoch();
        let threshold = gate.set().threshold;
        match gate.submit(text, Instant::now()) {
            Ok(Submitted::Progress {
                received,
                threshold,
            }) => {
                let since_ms = match lock(&self.status).state {
                    SealState::Unsealing { since_ms, .. } => since_ms,
                    _ => clock_ms(),
                };
                self.set_state(SealState::Unsealing {
                    since_ms,
                    received,
                    threshold,
                });
                tracing::info!(received, threshold, "unseal: share accepted");
                Ok(UnsealProgress {
                    received,
                    threshold,
                    unsealed: false,
                })
            }
            Ok(Submitted::Unsealed(seed)) => {
                let key = DerivationKey::new(&seed).map_err(|e| {
                    tracing::error!(error = %e, "unseal: the shares rebuilt the seed but its key cannot be kept; submit them again");
                    ShareError::Memory(e.to_string())
                })?;
                drop(seed);
                if !self.slot.publish(Arc::new(key), u64::MAX, epoch) {
                    return Err(ShareError::Interrupted);
                }
                {
                    let mut s = lock(&self.status);
                    s.calls.ok += 1;
                    s.key_unsealed_ms = Some(clock_ms());
                }
                self.set_state(SealState::Unsealed);
                Ok(UnsealProgress {
                    received: threshold,
                    threshold,
                    unsealed: true,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "unseal: share refused");
                if let ShareError::SeedMismatch { .. } = e {
                    lock(&self.status).calls.failed += 1;
                    self.set_state(SealState::Sealed {
                        since_ms: clock_ms(),
                    });
                }
                Err(e)
            }
        }
    }

    /// `shamir` provider: discards the shares submitted so far.
    pub fn reset_shares(&self) {
        if let Some(gate) = &self.shares {
            // Held across the status change, so a share submitted meanwhile is counted.
            let mut gate = lock(gate);
            gate.reset();
            if matches!(lock(&self.status).state, SealState::Unsealing { .. }) {
                self.set_state(SealState::Sealed {
                    since_ms: clock_ms(),
                });
            }
        }
    }

    /// Stops the seal thread and drops the key (for the graceful shutdown).
    pub fn stop(&self) {
        drop(self.slot.seal());
        self.mailbox.post(|c| c.stop = true);
    }

    fn set_state(&self, state: SealState) {
        let mut s = lock(&self.status);
        if s.state != state {
            match &state {
                SealState::Unsealed => tracing::info!("seed cache: unsealed"),
                SealState::Sealed { .. } => {
                    tracing::warn!("seed cache: sealed, waiting for shares")
                }
                SealState::Unsealing { .. } => {}
                SealState::ServingStale { .. } => {
                    tracing::warn!(
                        "seed cache: refresh failing, serving the last key until max_stale"
                    )
                }
                SealState::SealedByOperator { .. } => {
                    tracing::warn!("seed cache: sealed by an operator")
                }
                SealState::SealedByFailure { reason, .. } => {
                    tracing::error!(%reason, "seed cache: sealed; derivations answer SEALED until the provider answers")
                }
            }
        }
        s.state = state;
    }
}

/// The provider's thread: one call at a time, results over a channel.
struct Worker {
    requests: mpsc::SyncSender<()>,
    results: mpsc::Receiver<Result<RootSeed, SealError>>,
    in_flight: bool,
}

impl Worker {
    fn spawn(mut provider: Box<dyn SealProvider>) -> Result<Worker, SealError> {
        let (req_tx, req_rx) = mpsc::sync_channel::<()>(1);
        let (res_tx, res_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("custody-unseal".into())
            .spawn(move || {
                while req_rx.recv().is_ok() {
                    if res_tx.send(provider.unseal()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| SealError::Hsm(format!("cannot start the unseal thread: {e}")))?;
        Ok(Worker {
            requests: req_tx,
            results: res_rx,
            in_flight: false,
        })
    }
}

struct Supervisor {
    cache: Arc<SeedCache>,
    timing: CacheTiming,
    worker: Worker,
    failures: u32,
    breaker_until: Option<Instant>,
    /// The serving key's TTL ends here; `None` when there is no key.
    fresh_until: Option<Instant>,
    operator_sealed: bool,
    /// The seal epoch when the call in flight was asked for.
    call_epoch: u64,
}

impl Supervisor {
    /// One provider call, waited for at most `hsm_timeout`. `None`: timed out (the call
    /// stays in flight and its late answer is taken by [`Supervisor::collect_late`]).
    fn call(&mut self) -> Option<Result<RootSeed, SealError>> {
        if self.worker.in_flight {
            return None;
        }
        self.call_epoch = self.cache.slot.epoch();
        if self.worker.requests.send(()).is_err() {
            return Some(Err(SealError::Hsm("the unseal thread is gone".into())));
        }
        self.worker.in_flight = true;
        lock(&self.cache.status).in_flight = 1;
        let answer = self.worker.results.recv_timeout(self.timing.hsm_timeout);
        match answer {
            Ok(result) => {
                self.worker.in_flight = false;
                lock(&self.cache.status).in_flight = 0;
                Some(result)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.worker.in_flight = false;
                Some(Err(SealError::Hsm("the unseal thread is gone".into())))
            }
        }
    }

    /// Keys a new derivation state from `seed` and makes it the one cores serve, unless
    /// an operator sealed since `epoch` (then the seed is dropped). Fails (changing
    /// nothing) only if locked memory cannot be had.
    fn publish(&mut self, seed: &RootSeed, epoch: u64) -> Result<(), SealError> {
        let key = Arc::new(DerivationKey::new(seed)?);
        let now = Instant::now();
        self.fresh_until = Some(now + self.timing.ttl);
        self.failures = 0;
        self.breaker_until = None;
        let serve_until = clock_ms() + (self.timing.ttl + self.timing.max_stale).as_millis() as u64;
        // The previous key (if any) is replaced without a gap; it is dropped, and
        // zeroized, by the last core that still holds it, within CORE_KEY_REFRESH.
        if !self.cache.slot.publish(key, serve_until, epoch) {
            tracing::info!("seed cache: an unseal finished after an operator's seal; dropped");
            return Ok(());
        }
        let fingerprint = super::blob::fingerprint(seed);
        {
            let mut s = lock(&self.cache.status);
            s.calls.ok += 1;
            s.key_unsealed_ms = Some(clock_ms());
            s.fingerprint = Some(fingerprint);
        }
        tracing::info!(
            at_ms = crate::audit::now_ms(),
            "seed cache: refreshed through the provider"
        );
        self.cache.set_state(SealState::Unsealed);
        Ok(())
    }

    /// Publishes `seed`, or counts the failure.
    fn take(&mut self, seed: &RootSeed, epoch: u64) {
        if let Err(e) = self.publish(seed, epoch) {
            self.failed(e.to_string(), false);
        }
    }

    fn drop_key(&mut self, state: SealState) {
        drop(self.cache.slot.clear());
        self.fresh_until = None;
        lock(&self.cache.status).key_unsealed_ms = None;
        self.cache.set_state(state);
    }

    fn failed(&mut self, reason: String, timed_out: bool) {
        self.failures += 1;
        {
            let mut s = lock(&self.cache.status);
            if timed_out {
                s.calls.timed_out += 1;
            } else {
                s.calls.failed += 1;
            }
        }
        tracing::warn!(failures = self.failures, %reason, "seed cache: unseal failed");
        if self.failures >= self.timing.breaker_failures {
            self.breaker_until = Some(Instant::now() + self.timing.breaker_open);
            lock(&self.cache.status).calls.breaker_opened += 1;
        }
        match self.fresh_until {
            Some(fresh) if Instant::now() < fresh + self.timing.max_stale => {
                let already = matches!(
                    lock(&self.cache.status).state,
                    SealState::ServingStale { .. }
                );
                if Instant::now() >= fresh && !already {
                    self.cache.set_state(SealState::ServingStale {
                        since_ms: clock_ms(),
                    });
                }
            }
            _ => {
                if self.cache.slot.has_key() {
                    self.drop_key(SealState::SealedByFailure {
                        since_ms: clock_ms(),
                        reason,
                    });
                } else if !self.operator_sealed {
                    self.cache.set_state(SealState::SealedByFailure {
                        since_ms: clock_ms(),
                        reason,
                    });
                }
            }
        }
    }

    /// Takes the answer of a call that timed out, if it has come.
    fn collect_late(&mut self) {
        if !self.worker.in_flight {
            return;
        }
        if let Ok(result) = self.worker.results.try_recv() {
            self.worker.in_flight = false;
            lock(&self.cache.status).in_flight = 0;
            if let Ok(seed) = result {
                if !self.operator_sealed {
                    self.take(&seed, self.call_epoch);
                }
            }
        }
    }

    fn run(mut self) {
        loop {
            let commands = self.cache.mailbox.take();
            let (seal, unseal, stop) = (commands.seal, commands.unseal, commands.stop);
            if stop {
                // The process is stopping: the key goes, without a "sealed" warning.
                drop(self.cache.slot.clear());
                lock(&self.cache.status).key_unsealed_ms = None;
                tracing::info!("seed cache: key dropped (stopping)");
                return;
            }
            // `SeedCache::seal` drops the key itself; a seal and an unseal posted before
            // this thread woke coalesce into the unseal, so the empty slot is what says
            // the key went: refresh at once.
            if self.fresh_until.is_some() && !self.cache.slot.has_key() {
                self.fresh_until = None;
            }
            if seal {
                // `SeedCache::seal` already dropped the key and set the state.
                self.operator_sealed = true;
                self.breaker_until = None;
                drop(self.cache.slot.clear());
                self.fresh_until = None;
            }
            if unseal {
                self.operator_sealed = false;
                self.breaker_until = None;
            }
            self.collect_late();
            let now = Instant::now();
            // A key past max_stale goes, whatever else happens.
            if let Some(fresh) = self.fresh_until {
                if now >= fresh + self.timing.max_stale {
                    self.drop_key(SealState::SealedByFailure {
                        since_ms: clock_ms(),
                        reason: "the key passed max_stale without a successful refresh".into(),
                    });
                }
            }
            // Refresh a little before the TTL ends, so a key serves on while the call runs.
            // (At most half the TTL early, whatever the timeout, so refreshes never chain.)
            let lead = self.timing.hsm_timeout.min(self.timing.ttl / 2);
            let refresh_at = |fresh: Instant| fresh.checked_sub(lead).unwrap_or(fresh);
            let due = !self.operator_sealed
                && self
                    .fresh_until
                    .map_or(true, |fresh| now >= refresh_at(fresh))
                && self.breaker_until.map_or(true, |open| now >= open)
                && !self.worker.in_flight;
            if due {
                match self.call() {
                    Some(Ok(seed)) => self.take(&seed, self.call_epoch),
                    Some(Err(e)) => self.failed(e.to_string(), false),
                    None => self.failed(
                        format!(
                            "no answer within {} ms (seal.hsm_timeout_ms)",
                            self.timing.hsm_timeout.as_millis()
                        ),
                        true,
                    ),
                }
                continue;
            }
            // Sleep until the next thing to do, or a command.
            let mut next = now + Duration::from_secs(3600);
            if let Some(fresh) = self.fresh_until {
                let refresh = refresh_at(fresh);
                next = next.min(if now < refresh {
                    refresh
                } else {
                    fresh + self.timing.max_stale
                });
            }
            // Only a breaker still closed to calls sets a wake-up (an expired one, with a
            // call hung in flight, would spin).
            if let Some(open) = self.breaker_until {
                if open > now {
                    next = next.min(open);
                }
            }
            if self.worker.in_flight {
                next = next.min(now + Duration::from_millis(20));
            }
            let wait = next.saturating_duration_since(Instant::now());
            self.cache.mailbox.wait(wait.max(Duration::from_millis(1)));
        }
    }
}

/// A core's view of the cache: the key it last took and the generation it came with.
/// One atomic load per request; the mutex only when the generation moved.
pub struct CoreKey {
    cache: Arc<SeedCache>,
    reader: std::cell::RefCell<Reader<DerivationKey>>,
    /// This core's locked working memory for derivations.
    scratch: std::cell::RefCell<Scratch>,
}

impl CoreKey {
    /// Fails only if the scratch's memory cannot be locked.
    pub fn new(cache: Arc<SeedCache>) -> Result<CoreKey, crate::locked::LockError> {
        let core = CoreKey {
            reader: std::cell::RefCell::new(Reader::default()),
            scratch: std::cell::RefCell::new(Scratch::new()?),
            cache,
        };
        core.refresh();
        Ok(core)
    }

    /// Derives with the key that may serve now, in this core's locked scratch; `None`
    /// when sealed (answer SEALED).
    pub fn derive(
        &self,
        asset: &uuid::Uuid,
        counter: u64,
        path: &crate::kdf::DerivationPath,
    ) -> Option<crate::kdf::DerivedKey> {
        let mut scratch = self.scratch.borrow_mut();
        self.with(|key| key.derive_in(&mut scratch, asset, counter, path))
    }

    /// The MAC of an audit checkpoint with the key that may serve now, computed in this
    /// core's locked scratch; `None` when sealed (the batch goes without a checkpoint).
    pub fn checkpoint_mac(&self, shard: u16, seq: u64, hash: &[u8; 32]) -> Option<[u8; 32]> {
        let mut scratch = self.scratch.borrow_mut();
        self.with(|key| key.checkpoint_mac_in(&mut scratch, shard, seq, hash))
    }

    /// Takes the cache's key if it changed since the last call (and drops a sealed one).
    pub fn refresh(&self) {
        self.reader.borrow_mut().refresh(&self.cache.slot);
    }

    /// The key to derive with now, or `None` (answer SEALED).
    pub fn get(&self) -> Option<Arc<DerivationKey>> {
        self.reader.borrow_mut().get(&self.cache.slot, clock_ms())
    }

    /// Runs `f` with the key to derive with now, or gives `None` (answer SEALED). The
    /// request path uses this: it borrows the core's copy instead of cloning the `Arc`.
    pub fn with<R>(&self, f: impl FnOnce(&DerivationKey) -> R) -> Option<R> {
        self.reader
            .borrow_mut()
            .with_key(&self.cache.slot, clock_ms(), f)
    }

    /// Whether a key may serve now.
    pub fn serving(&self) -> bool {
        self.with(|_| ()).is_some()
    }

    /// Whether this core still holds a copy of a key.
    pub fn holds_key(&self) -> bool {
        self.reader.borrow().holds()
    }

    pub fn cache(&self) -> &Arc<SeedCache> {
        &self.cache
    }
}

/// A shard signs each batch's checkpoint with its core's key.
impl crate::checkpoint::Signer for std::rc::Rc<CoreKey> {
    fn sign(&self, shard: u16, seq: u64, hash: &[u8; 32]) -> Option<[u8; 32]> {
        self.checkpoint_mac(shard, seq, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kdf::{DerivationPath, SEED_LEN};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// What the scripted provider does on each call.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Seed(u8),
        Fail,
        Hang(Duration),
    }

    struct Scripted {
        steps: Arc<Mutex<Vec<Step>>>,
        calls: Arc<AtomicU32>,
        concurrent: Arc<AtomicU32>,
        max_concurrent: Arc<AtomicU32>,
    }

    impl SealProvider for Scripted {
        fn unseal(&mut self) -> Result<RootSeed, SealError> {
            let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_concurrent.fetch_max(now, Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
            let step = {
                let mut s = self.steps.lock().unwrap();
                if s.len() > 1 {
                    s.remove(0)
                } else {
                    s[0]
                }
            };
            let result = match step {
                Step::Seed(b) => Ok(RootSeed::from_bytes([b; SEED_LEN])),
                Step::Fail => Err(SealError::Hsm("scripted failure".into())),
                Step::Hang(d) => {
                    std::thread::sleep(d);
                    Ok(RootSeed::from_bytes([0xee; SEED_LEN]))
                }
            };
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            result
        }
    }

    struct Harness {
        steps: Arc<Mutex<Vec<Step>>>,
        calls: Arc<AtomicU32>,
        max_concurrent: Arc<AtomicU32>,
    }

    fn scripted(steps: Vec<Step>) -> (Box<dyn SealProvider>, Harness) {
        let steps = Arc::new(Mutex::new(steps));
        let calls = Arc::new(AtomicU32::new(0));
        let max_concurrent = Arc::new(AtomicU32::new(0));
        (
            Box::new(Scripted {
                steps: steps.clone(),
                calls: calls.clone(),
                concurrent: Arc::new(AtomicU32::new(0)),
                max_concurrent: max_concurrent.clone(),
            }),
            Harness {
                steps,
                calls,
                max_concurrent,
            },
        )
    }

    fn timing(ttl_ms: u64, max_stale_ms: u64) -> CacheTiming {
        CacheTiming {
            ttl: Duration::from_millis(ttl_ms),
            hsm_timeout: Duration::from_millis(100),
            max_stale: Duration::from_millis(max_stale_ms),
            breaker_failures: 2,
            breaker_open: Duration::from_millis(200),
        }
    }

    /// The key a cache serves, as one derived value (seeds differ by their fill byte).
    fn fill_of(key: &DerivationKey) -> u8 {
        let path = DerivationPath::parse("m/44'/0'/0'/0'/0").unwrap();
        let asset = uuid::Uuid::from_u128(1);
        let got = key.derive(&asset, 0, &path);
        (0..=255u8)
            .find(|b| {
                *DerivationKey::new(&RootSeed::from_bytes([*b; SEED_LEN]))
                    .unwrap()
                    .derive(&asset, 0, &path)
                    == *got
            })
            .expect("a scripted seed")
    }

    /// Polls `f` for up to 5 s (a deadline no healthy run gets near).
    fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn refreshes_after_the_ttl_and_cores_take_the_new_key() {
        let (p, h) = scripted(vec![Step::Seed(1), Step::Seed(2)]);
        let cache = SeedCache::start(p, timing(50, 10_000)).unwrap();
        let core = CoreKey::new(cache.clone()).unwrap();
        assert_eq!(fill_of(&core.get().unwrap()), 1);
        eventually("the refresh after the TTL", || {
            core.get().map(|k| fill_of(&k)) == Some(2)
        });
        assert!(h.calls.load(Ordering::SeqCst) >= 2);
        assert_eq!(cache.status().state, SealState::Unsealed);
    }

    #[test]
    fn a_failing_provider_serves_stale_until_max_stale_then_seals_then_recovers() {
        let (p, h) = scripted(vec![Step::Seed(3), Step::Fail]);
        let cache = SeedCache::start(p, timing(50, 400)).unwrap();
        let core = CoreKey::new(cache.clone()).unwrap();
        eventually("serving stale", || {
            matches!(cache.status().state, SealState::ServingStale { .. })
        });
        assert_eq!(
            core.get().map(|k| fill_of(&k)),
            Some(3),
            "stale key still serves"
        );
        eventually("sealed past max_stale", || {
            matches!(cache.status().state, SealState::SealedByFailure { .. })
        });
        assert!(core.get().is_none(), "fail closed");
        assert!(cache.status().calls.breaker_opened >= 1);
        // The provider comes back: service returns by itself.
        *h.steps.lock().unwrap() = vec![Step::Seed(4)];
        eventually("unsealed again", || {
            core.get().map(|k| fill_of(&k)) == Some(4)
        });
    }

    #[test]
    fn a_healthy_provider_is_called_about_once_per_ttl() {
        let (p, h) = scripted(vec![Step::Seed(9)]);
        let _cache = SeedCache::start(p, timing(100, 60_000)).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        // One call at start and one per TTL (100 ms, each at most half a TTL early):
        // about 11 to 21 in a second, never a tight loop.
        let calls = h.calls.load(Ordering::SeqCst);
        assert!((8..=25).contains(&calls), "{calls} calls");
    }

    #[test]
    fn the_breaker_limits_calls_to_a_failing_provider() {
        let (p, h) = scripted(vec![Step::Seed(5), Step::Fail]);
        let cache = SeedCache::start(p, timing(20, 60_000)).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        // 2 failures open the breaker for 200 ms, then one probe each time: about 1 +
        // 2 + 1000/200 calls in a second, never one per request or per millisecond.
        let calls = h.calls.load(Ordering::SeqCst);
        assert!((3..=12).contains(&calls), "{calls} calls");
        assert!(matches!(
            cache.status().state,
            SealState::ServingStale { .. }
        ));
    }

    #[test]
    fn a_hanging_call_times_out_and_never_overlaps_another() {
        let (p, h) = scripted(vec![
            Step::Seed(6),
            Step::Hang(Duration::from_millis(600)),
            Step::Seed(7),
        ]);
        let cache = SeedCache::start(p, timing(30, 60_000)).unwrap();
        let core = CoreKey::new(cache.clone()).unwrap();
        eventually("the hang is counted as a timeout", || {
            cache.status().calls.timed_out >= 1
        });
        assert_eq!(
            core.get().map(|k| fill_of(&k)),
            Some(6),
            "the old key serves meanwhile"
        );
        // The hung call's late answer is taken; then the next call gives seed 7.
        eventually("the next seed", || {
            core.get().map(|k| fill_of(&k)) == Some(7)
        });
        assert_eq!(
            h.max_concurrent.load(Ordering::SeqCst),
            1,
            "one call at a time"
        );
    }

    #[test]
    fn seal_drops_the_key_at_once_and_unseal_brings_it_back() {
        let (p, _h) = scripted(vec![Step::Seed(8)]);
        let cache = SeedCache::start(p, timing(60_000, 60_000)).unwrap();
        let core = CoreKey::new(cache.clone()).unwrap();
        assert!(core.get().is_some());
        cache.seal();
        assert!(core.get().is_none(), "sealed for the very next request");
        eventually("sealed by the operator", || {
            matches!(cache.status().state, SealState::SealedByOperator { .. })
        });
        core.refresh();
        assert!(!core.holds_key(), "the core dropped its copy");
        assert!(cache.status().key_unsealed_ms.is_none());
        cache.unseal();
        eventually("unsealed", || core.get().is_some());
    }

    #[test]
    fn a_first_unseal_that_fails_fails_the_start() {
        let (p, _h) = scripted(vec![Step::Fail]);
        assert!(SeedCache::start(p, timing(1000, 1000)).is_err());
        let (p, _h) = scripted(vec![Step::Hang(Duration::from_millis(300))]);
        let e = SeedCache::start(p, timing(1000, 1000)).err().unwrap();
        assert!(e.to_string().contains("did not answer"), "{e}");
    }

    #[test]
    fn shamir_cache_starts_sealed_counts_shares_and_seals_again() {
        use crate::seal::shamir::{split, ShareSet};
        let seed = RootSeed::from_bytes([0x42; SEED_LEN]);
        let id = uuid::Uuid::new_v4();
        let shares = split(&seed, id, 2, 3).unwrap();
        let set = ShareSet::new(id, 2, 3, crate::seal::blob::fingerprint(&seed));
        let cache = SeedCache::start_with_shares(set).unwrap();
        let core = CoreKey::new(cache.clone()).unwrap();
        assert!(cache.uses_shares());
        assert!(!core.serving());
        assert!(matches!(cache.status().state, SealState::Sealed { .. }));
        // An HSM-style unseal does nothing here.
        cache.unseal();
        assert!(!core.serving());

        let p = cache.submit_share(&shares[2].encode()).unwrap();
        assert_eq!((p.received, p.threshold, p.unsealed), (1, 2, false));
        assert!(matches!(
            cache.status().state,
            SealState::Unsealing {
                received: 1,
                threshold: 2,
                ..
            }
        ));
        assert!(matches!(
            cache.submit_share(&shares[2].encode()),
            Err(ShareError::Repeated { .. })
        ));
        cache.reset_shares();
        assert!(matches!(cache.status().state, SealState::Sealed { .. }));
        cache.submit_share(&shares[2].encode()).unwrap();
        let p = cache.submit_share(&shares[0].encode()).unwrap();
        assert!(p.unsealed);
        core.refresh();
        assert!(core.serving());
        assert_eq!(cache.status().state, SealState::Unsealed);
        let expected = DerivationKey::new(&seed).unwrap();
        let path = DerivationPath::parse("m/44'/0'/0'/0'/1").unwrap();
        let asset = uuid::Uuid::from_bytes([1; 16]);
        assert_eq!(
            core.derive(&asset, 0, &path).unwrap(),
            expected.derive(&asset, 0, &path)
        );
        // A share once unsealed is refused and changes nothing.
        assert_eq!(
            cache.submit_share(&shares[1].encode()).err(),
            Some(ShareError::AlreadyUnsealed)
        );
        // Sealing drops the key; k shares are needed again.
        cache.seal();
        core.refresh();
        assert!(!core.serving() && !core.holds_key());
        assert!(matches!(
            cache.status().state,
            SealState::SealedByOperator { .. }
        ));
        assert!(!cache.submit_share(&shares[1].encode()).unwrap().unsealed);
        assert!(cache.submit_share(&shares[0].encode()).unwrap().unsealed);
        core.refresh();
        assert!(core.serving());
    }

    #[test]
    fn a_provider_cache_refuses_shares() {
        let (p, _h) = scripted(vec![Step::Seed(1)]);
        let cache = SeedCache::start(p, timing(1000, 1000)).unwrap();
        assert!(!cache.uses_shares());
        assert_eq!(
            cache.submit_share("custody-share/1:x").err(),
            Some(ShareError::NotShamir)
        );
        cache.stop();
    }
}

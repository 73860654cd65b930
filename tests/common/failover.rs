//! Load against several appliances on one store, following the active as it moves: every
//! acknowledgement is logged (which endpoint, when), every request whose outcome is unknown
//! counted, and [`check_against_store`] compares the log with the store that survives.

use super::{derive_body, runtime, PgDatabase};
use custody::client::{Client, ClientConfig, ClientError};
use custody::wire::{Receipt, Status};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// One acknowledged request.
#[derive(Clone, Debug)]
pub struct Ack {
    pub asset: Uuid,
    pub counter: u64,
    pub receipt: Receipt,
    /// Index of the endpoint that acknowledged it.
    pub endpoint: usize,
    /// When the request was sent and when its answer came, since the load started.
    pub sent: Duration,
    pub at: Duration,
    /// A ROTATE (else a DERIVE).
    pub rotation: bool,
}

#[derive(Default)]
struct Tally {
    acks: Mutex<Vec<Ack>>,
    not_active: AtomicUsize,
    unknown: AtomicUsize,
    unavailable: AtomicUsize,
}

/// The load: `connections` connections × `lanes` pipelined lanes of derivations, and one
/// lane of rotations (each retried with its rotation id until acknowledged).
pub struct FailoverLoad {
    started: Instant,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// What a [`FailoverLoad`] saw.
pub struct FailoverOutcome {
    pub acks: Vec<Ack>,
    /// Requests refused NOT_ACTIVE (not run; sent again elsewhere).
    pub not_active: usize,
    /// Requests in flight when their connection closed: outcome unknown.
    pub unknown: usize,
    /// STORE_UNAVAILABLE answers (a commit that failed or whose outcome is unknown).
    pub unavailable: usize,
}

impl FailoverOutcome {
    /// The longest time between two acknowledgements (ordered by arrival).
    pub fn longest_gap(&self) -> Duration {
        let mut at: Vec<Duration> = self.acks.iter().map(|a| a.at).collect();
        at.sort();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    /// The first acknowledgement (from any endpoint) of a request sent at or after `after`.
    pub fn first_sent_after(&self, after: Duration) -> Option<&Ack> {
        self.acks
            .iter()
            .filter(|a| a.sent >= after)
            .min_by_key(|a| a.at)
    }

    /// The first acknowledgement from `endpoint` after `after`.
    pub fn first_ack_from(&self, endpoint: usize, after: Duration) -> Option<Duration> {
        self.acks
            .iter()
            .filter(|a| a.endpoint == endpoint && a.at >= after)
            .map(|a| a.at)
            .min()
    }
}

/// A connection shared by lanes: which endpoint it is on, and the client (none until
/// (re)connected). `generation` tells a lane whether the client it failed on is still
/// the one in place.
struct Slot {
    endpoint: usize,
    client: Option<Arc<Client>>,
    generation: u64,
}

impl FailoverLoad {
    pub fn start(
        endpoints: Vec<ClientConfig>,
        assets: Vec<Uuid>,
        connections: usize,
        lanes: usize,
    ) -> FailoverLoad {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tally.clone(), stop.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            runtime().block_on(drive(endpoints, assets, connections, lanes, t, s, started));
        });
        FailoverLoad {
            started,
            tally,
            stop,
            thread,
        }
    }

    /// The load's clock (what [`Ack::sent`] and [`Ack::at`] are measured on).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Acknowledgements from `endpoint` so far.
    pub fn acknowledged_by(&self, endpoint: usize) -> usize {
        let acks = self.tally.acks.lock().unwrap();
        acks.iter().filter(|a| a.endpoint == endpoint).count()
    }

    /// Waits (at most `limit`) until `n` more acknowledgements than now came from `endpoint`.
    pub fn wait_for_more_from(&self, endpoint: usize, n: usize, limit: Duration) {
        let before = self.acknowledged_by(endpoint);
        let deadline = Instant::now() + limit;
        while self.acknowledged_by(endpoint) < before + n {
            assert!(
                Instant::now() < deadline,
                "endpoint {endpoint} acknowledged {} of {n} within {limit:?}",
                self.acknowledged_by(endpoint) - before
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) until `n` more acknowledgements than now came, from any
    /// endpoint (which one takes over is not the test's to say).
    pub fn wait_for_more(&self, n: usize, limit: Duration) {
        let count = || self.tally.acks.lock().unwrap().len();
        let (before, deadline) = (count(), Instant::now() + limit);
        while count() < before + n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} acknowledged within {limit:?}",
                count() - before
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the lanes (each finishes what it has out) and reports.
    pub fn finish(self) -> FailoverOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("load thread");
        let tally = &self.tally;
        FailoverOutcome {
            acks: std::mem::take(&mut *tally.acks.lock().unwrap()),
            not_active: tally.not_active.load(Ordering::Relaxed),
            unknown: tally.unknown.load(Ordering::Relaxed),
            unavailable: tally.unavailable.load(Ordering::Relaxed),
        }
    }
}

async fn drive(
    endpoints: Vec<ClientConfig>,
    assets: Vec<Uuid>,
    connections: usize,
    lanes: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    started: Instant,
) {
    let endpoints = Arc::new(endpoints);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let slot = Arc::new(tokio::sync::Mutex::new(Slot {
            endpoint: c % endpoints.len(),
            client: None,
            generation: 0,
        }));
        for l in 0..lanes {
            let lane = Lane {
                endpoints: endpoints.clone(),
                slot: slot.clone(),
                tally: tally.clone(),
                stop: stop.clone(),
                started,
            };
            let assets = assets.clone();
            let n = c * lanes + l;
            tasks.push(tokio::spawn(async move {
                if n == 0 {
                    lane.rotations(&assets).await
                } else {
                    lane.derivations(&assets, n).await
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("load lane");
    }
}

/// How long a request waits for its answer: an appliance that is paused (or a host that
/// vanished without closing its connections) holds requests unanswered, and a client
/// must give up on them (outcome unknown) and move on.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// `call`'s answer, or [`ClientError::Closed`] (outcome unknown) past [`REQUEST_TIMEOUT`].
async fn answered<T>(
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .unwrap_or(Err(ClientError::Closed))
}

struct Lane {
    endpoints: Arc<Vec<ClientConfig>>,
    slot: Arc<tokio::sync::Mutex<Slot>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    started: Instant,
}

impl Lane {
    async fn derivations(&self, assets: &[Uuid], n: usize) {
        let mut i = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            i += 1;
            let a = assets[(n + i) % assets.len()];
            let (client, generation, endpoint) = self.client().await;
            let sent = self.started.elapsed();
            let asked = client.derive(derive_body(a, &format!("m/44'/0'/0'/0'/{i}")));
            match answered(asked).await {
                Ok(d) => self.ack(a, d.counter, d.receipt, endpoint, sent, false),
                Err(e) => self.failed(&e, generation).await,
            }
        }
    }

    /// Rotates the assets in turn; a rotation whose outcome is unknown is sent again with
    /// its rotation id until acknowledged (the first result, if it had landed).
    async fn rotations(&self, assets: &[Uuid]) {
        let mut i = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            i += 1;
            let a = assets[i % assets.len()];
            let id = Uuid::new_v4();
            loop {
                let (client, generation, endpoint) = self.client().await;
                let sent = self.started.elapsed();
                match answered(client.rotate(a, id, None)).await {
                    Ok(r) => {
                        self.ack(a, r.counter, r.receipt, endpoint, sent, true);
                        break;
                    }
                    Err(e) if e.status() == Some(Status::Busy) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => self.failed(&e, generation).await,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ack(
        &self,
        asset: Uuid,
        counter: u64,
        receipt: Receipt,
        endpoint: usize,
        sent: Duration,
        rotation: bool,
    ) {
        self.tally.acks.lock().unwrap().push(Ack {
            asset,
            counter,
            receipt,
            endpoint,
            sent,
            at: self.started.elapsed(),
            rotation,
        });
    }

    /// Counts the failure (NOT_ACTIVE: not run; closed: outcome unknown) and, when the
    /// connection is at fault, moves the slot on.
    async fn failed(&self, e: &ClientError, generation: u64) {
        let next = match e {
            ClientError::Refused(r) if r.status == Status::NotActive => {
                self.tally.not_active.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some(self.named(r.active.as_deref()))
            }
            ClientError::Refused(r) if r.status == Status::StoreUnavailable => {
                self.tally.unavailable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                None
            }
            ClientError::Closed => {
                self.tally.unknown.fetch_add(1, Ordering::Relaxed);
                Some(None)
            }
            other => panic!("unexpected error under failover load: {other}"),
        };
        if let Some(named) = next {
            let mut slot = self.slot.lock().await;
            if slot.generation == generation {
                slot.client = None;
                slot.generation += 1;
                slot.endpoint = named.unwrap_or((slot.endpoint + 1) % self.endpoints.len());
            }
        }
    }

    /// The endpoint a NOT_ACTIVE reply names, if it is one of ours.
    fn named(&self, active: Option<&str>) -> Option<usize> {
        let active = active?;
        self.endpoints
            .iter()
            .position(|e| e.addr.to_string() == active)
    }

    /// The slot's client, connecting (endpoint after endpoint, 20 ms apart) if needed.
    async fn client(&self) -> (Arc<Client>, u64, usize) {
        let mut slot = self.slot.lock().await;
        loop {
            if let Some(c) = &slot.client {
                return (c.clone(), slot.generation, slot.endpoint);
            }
            match Client::connect(&self.endpoints[slot.endpoint]).await {
                Ok(c) => slot.client = Some(Arc::new(c)),
                Err(_) => {
                    slot.endpoint = (slot.endpoint + 1) % self.endpoints.len();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Every acknowledgement against the store that survives: each acknowledged DERIVE and
/// ROTATE has the record its receipt names, with its asset and counter (nothing
/// acknowledged is lost); no asset's stored counter is below a counter acknowledged for it
/// (no regression); each shard's log has no gap; and every derivation sent after a
/// rotation was acknowledged uses the new counter or a later one (I3, across takeovers).
pub fn check_against_store(db: &PgDatabase, acks: &[Ack]) {
    let rows = db.audit_rows();
    let by_receipt: HashMap<(u16, u64), &(u16, u64, String, Uuid, u64)> =
        rows.iter().map(|r| ((r.0, r.1), r)).collect();
    for a in acks {
        let row = by_receipt
            .get(&(a.receipt.shard, a.receipt.seq))
            .unwrap_or_else(|| panic!("acknowledged {a:?} has no audit record"));
        let event = if a.rotation { "ROTATE" } else { "DERIVE" };
        assert_eq!(
            (row.3, row.4, row.2.as_str()),
            (a.asset, a.counter, event),
            "{a:?}"
        );
    }
    let stored = db.counters();
    for a in acks {
        let counter = stored.get(&a.asset).copied().unwrap_or(0);
        assert!(
            counter >= a.counter,
            "asset {} stored at {counter}, acknowledged at {}",
            a.asset,
            a.counter
        );
    }
    let mut by_shard: HashMap<u16, Vec<u64>> = HashMap::new();
    for r in &rows {
        by_shard.entry(r.0).or_default().push(r.1);
    }
    for (shard, mut seqs) in by_shard {
        seqs.sort_unstable();
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(
                *s,
                i as u64 + 1,
                "shard {shard}: the log has a gap or a repeat"
            );
        }
    }
    check_rotations_hold(acks);
}

/// The HELLO answer of `app`: Ok, or the refusal's status and the active it names.
pub fn hello(app: &super::TestAppliance) -> Result<(), (Option<Status>, Option<String>)> {
    runtime().block_on(async {
        let c = Client::connect(&app.client_config())
            .await
            .map_err(|_| (None, None))?;
        match c.hello().await {
            Ok(_) => Ok(()),
            Err(ClientError::Refused(r)) => Err((Some(r.status), r.active)),
            Err(_) => Err((None, None)),
        }
    })
}

/// Standbys hold the active's root seed (the same keys, the same audit key): `b` gets `a`'s
/// dev seed. (Without it `b` would never take the lease: the store keeps the seed's
/// fingerprint.)
pub fn same_seed(a: &super::TestAppliance, b: &super::TestAppliance) {
    let seed = |app: &super::TestAppliance| app.dir.path().join("dev-seed.bin");
    std::fs::copy(seed(a), seed(b)).expect("copy the dev seed");
}

/// A full reconciliation on `active` (the appliance serving now) finds nothing: the chain
/// of every shard verifies across the takeovers, every checkpoint's MAC, and every
/// asset's counter matches its audit records.
pub fn assert_reconciles(active: &super::TestAppliance) {
    let summary = runtime().block_on(async {
        let c = Client::connect(&active.client_config())
            .await
            .expect("connect");
        c.reconcile(true).await.expect("RECONCILE on the active")
    });
    assert!(summary.records_checked > 0, "{summary:?}");
    assert_eq!(summary.findings_total, 0, "{:?}", summary.findings);
    assert_eq!(summary.assets_drifted, 0, "{summary:?}");
    assert!(summary.macs_checked, "{summary:?}");
}

/// I3: a derivation sent after a rotation of its asset was acknowledged uses the
/// rotation's counter or a later one.
fn check_rotations_hold(acks: &[Ack]) {
    let mut rotations: Vec<&Ack> = acks.iter().filter(|a| a.rotation).collect();
    rotations.sort_by_key(|a| a.at);
    for d in acks.iter().filter(|a| !a.rotation) {
        for r in rotations
            .iter()
            .filter(|r| r.asset == d.asset && r.at < d.sent)
        {
            assert!(
                d.counter >= r.counter,
                "derivation {d:?} sent after rotation {r:?} was acknowledged uses an older counter"
            );
        }
    }
}

//! The open loop: a [`Session`] paces the schedule's requests at their own times against
//! a [`Target`], each on a connection with room, records every answer against its
//! scheduled time, waits for the last answers, and hands over the figures.

use crate::acklog::{AckLog, FailureLog};
use crate::cli::Options;
use crate::live::{spawn_reporter, Memory};
use crate::stats::{Answer, Recorder};
use crate::target::{Ack, Done, Kept, Route, SharedRecorder, Target};
use crate::workload::{AssetPicker, Op, Rng};
use anyhow::bail;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the target may answer nothing at all: with every connection full for this
/// long the run stops, and after the schedule the requests still unanswered when no
/// answer came for this long count as errors (TIMEOUT).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The pacer's tick: above one request per tick, the requests due within a tick share its
/// end as their scheduled time and go out together (on one connection, in one write), so
/// the pacer sleeps once per tick rather than once per request. Each sleep costs this
/// virtual machine about 11 µs of CPU (a timer programmed, a context switch each way),
/// which at 15,000 req/s was half the harness's cost (docs/benchmarks.md). Latency still
/// runs from each request's scheduled time, so a tick's wait is never hidden from it.
pub const PACE_TICK: Duration = Duration::from_micros(200);

/// Request `i`'s place in the open loop at `interval_ns` between requests: its scheduled
/// time (nanoseconds from the start; the end of its pacing tick when requests are closer
/// together than `tick_ns`) and the burst it belongs to (requests of one burst share a
/// connection).
pub fn pace(i: u64, interval_ns: f64, tick_ns: u64) -> (u64, u64) {
    let at = (i as f64 * interval_ns) as u64;
    if interval_ns >= tick_ns as f64 || tick_ns == 0 {
        return (at, i);
    }
    let burst = at.div_ceil(tick_ns);
    (burst * tick_ns, burst)
}

/// The mutex's value, even if a thread panicked holding it (the figures stay usable).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One measured run: its schedule's start, the window, the recorder and the live line.
pub struct Session {
    start: Instant,
    /// The schedule's start on other clocks, for a driver that acts during the run.
    pub start_clock: StartClock,
    pub measure_from: Instant,
    pub measure_until: Instant,
    seed: u64,
    rec: SharedRecorder,
    pub finished: Arc<AtomicBool>,
    memory: Arc<Mutex<Memory>>,
    /// `--ack-log`: every acknowledged DERIVE and ROTATE, written as they come.
    acks: Option<Arc<Mutex<AckLog>>>,
    /// `--failure-log`: every request not acknowledged, written as they come.
    failures: Option<Arc<Mutex<FailureLog>>>,
    /// The window's CPU time and context switches ([`crate::cost`]), once read.
    cost: Mutex<Option<crate::cost::Cost>>,
}

/// The run's start (time 0 of the ack and failure logs) on the wall clock and on
/// CLOCK_MONOTONIC, in milliseconds: a driver that kills an appliance during the run reads
/// its own CLOCK_MONOTONIC (Python's `time.monotonic()`) and places the kill on the logs'
/// clock to the microsecond, wall-clock steps aside.
#[derive(Clone, Copy, Debug)]
pub struct StartClock {
    pub unix_ms: f64,
    pub monotonic_ms: f64,
}

impl StartClock {
    /// The clocks' readings at `now` (just read), moved on by `ahead`.
    fn at(ahead: Duration) -> StartClock {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let ahead_ms = ahead.as_secs_f64() * 1000.0;
        StartClock {
            unix_ms: unix.as_secs_f64() * 1000.0 + ahead_ms,
            monotonic_ms: ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6 + ahead_ms,
        }
    }
}

/// A request as it was sent, against which its answer is recorded.
struct Sent {
    op: Op,
    route: Route,
    scheduled: Instant,
    /// Its connection's count of requests in flight.
    slot: Arc<AtomicUsize>,
    /// The reconciler load's epoch, and its value at the scheduled time.
    epoch: Option<(Arc<AtomicU64>, u64)>,
}

impl Sent {
    /// The callback that records the answer: latency from the scheduled time, and
    /// whether a reconciliation was in flight at any moment of the request's life.
    fn on_answer(
        self,
        rec: SharedRecorder,
        acks: Option<Arc<Mutex<AckLog>>>,
        failures: Option<Arc<Mutex<FailureLog>>>,
    ) -> Done {
        Box::new(move |answer: Answer, ack: Option<Ack>| {
            let done = Instant::now();
            self.slot.fetch_sub(1, Ordering::AcqRel);
            let reconciling = self
                .epoch
                .map(|(e, at)| at % 2 == 1 || e.load(Ordering::Acquire) != at);
            if let (
                Some(acks),
                Some(Ack {
                    endpoint,
                    record: Some(record),
                }),
            ) = (&acks, &ack)
            {
                lock(acks).write(done, *endpoint, record);
            }
            if let (Some(failures), Answer::Error(outcome)) = (&failures, &answer) {
                lock(failures).write(done, self.op, outcome);
            }
            let mut r = lock(&rec);
            if let Some(ack) = ack {
                r.acked(done, ack.endpoint);
                if let Some(a) = ack.record.filter(|a| a.op == Op::Derive) {
                    r.receipts.add((a.receipt, a.asset, a.counter) as Kept);
                }
            }
            r.answered(
                self.op,
                self.scheduled,
                done,
                answer,
                reconciling,
                Some(self.route as usize),
            );
        })
    }
}

impl Session {
    pub fn new(o: &Options, seed: u64) -> Session {
        let ahead = Duration::from_millis(20);
        let start = Instant::now() + ahead;
        let start_clock = StartClock::at(ahead);
        let measure_from = start + o.warmup;
        let measure_until = measure_from + o.duration;
        Session {
            start,
            start_clock,
            measure_from,
            measure_until,
            seed,
            rec: Arc::new(Mutex::new(
                Recorder::new(measure_from, measure_until, seed).started_at(start),
            )),
            finished: Arc::new(AtomicBool::new(false)),
            memory: Arc::new(Mutex::new(Memory::default())),
            acks: None,
            failures: None,
            cost: Mutex::new(None),
        }
    }

    /// The session writing every request not acknowledged to `path` (`--failure-log`).
    pub fn with_failure_log(self, path: &std::path::Path) -> anyhow::Result<Session> {
        let log = FailureLog::create(path, self.start)?;
        Ok(Session {
            failures: Some(Arc::new(Mutex::new(log))),
            ..self
        })
    }

    /// The session writing every acknowledged DERIVE and ROTATE to `path` (`--ack-log`),
    /// endpoints named as in `endpoints`.
    pub fn with_ack_log(
        self,
        path: &std::path::Path,
        endpoints: &[std::net::SocketAddr],
    ) -> anyhow::Result<Session> {
        let log = AckLog::create(path, self.start, endpoints)?;
        Ok(Session {
            acks: Some(Arc::new(Mutex::new(log))),
            ..self
        })
    }

    /// Runs the schedule against `target` with the live line, to its last answer; then
    /// `finished` is set (the switcher and the reconciler load stop on it).
    pub fn run(
        &self,
        o: &Options,
        target: &dyn Target,
        assets: usize,
        appliance_pid: Option<u32>,
        epoch: Option<&Arc<AtomicU64>>,
    ) -> anyhow::Result<()> {
        let reporter = spawn_reporter(
            self.rec.clone(),
            self.finished.clone(),
            self.memory.clone(),
            self.start,
            o.json,
            appliance_pid,
        )?;
        let sampler = crate::cost::spawn_sampler(
            self.measure_from,
            self.measure_until,
            appliance_pid,
            self.finished.clone(),
        )?;
        let outcome = self.schedule(o, target, assets, epoch);
        self.finished.store(true, Ordering::Relaxed);
        let _ = reporter.join();
        *lock(&self.cost) = sampler.join().ok().flatten();
        outcome
    }

    /// The open loop: each request at its scheduled time, on a connection with room
    /// (waiting for one counts: latency runs from the scheduled time), then the last
    /// answers. `epoch`: the reconciler load's (see [`crate::drive`]), to class each
    /// derivation.
    fn schedule(
        &self,
        o: &Options,
        target: &dyn Target,
        assets: usize,
        epoch: Option<&Arc<AtomicU64>>,
    ) -> anyhow::Result<()> {
        let picker = AssetPicker::new(assets, o.distribution);
        let total = (o.rate as f64 * (o.warmup + o.duration).as_secs_f64()).round() as u64;
        let interval_ns = 1e9 / o.rate as f64;
        let inflight: Vec<Arc<AtomicUsize>> = (0..o.connections).map(|_| Arc::default()).collect();
        // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
        let mut rng = Rng::new(self.seed);
        let tick_ns = PACE_TICK.as_nanos() as u64;
        for i in 0..total {
            let (at_ns, burst) = pace(i, interval_ns, tick_ns);
            let scheduled = self.start + Duration::from_nanos(at_ns);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            // The reconciler load's epoch at the scheduled time: latency runs from there, so
            // a wait for room below belongs to the class of that moment.
            let epoch = epoch.map(|e| (e.clone(), e.load(Ordering::Acquire)));
            let conn = self.room(o, target, &inflight, burst)?;
            let op = o.mix.pick(rng.next_u64());
            let asset = picker.pick(rng.next_f64());
            let route = o.clients.route(i);
            inflight[conn].fetch_add(1, Ordering::AcqRel);
            lock(&self.rec).sent(op);
            let sent = Sent {
                op,
                route,
                scheduled,
                slot: inflight[conn].clone(),
                epoch,
            };
            let done = sent.on_answer(self.rec.clone(), self.acks.clone(), self.failures.clone());
            target.start(conn, i, op, asset, route, done);
        }
        self.last_answers();
        Ok(())
    }

    /// The connection the requests of burst `i` go on: the first with room (and a
    /// connection: one between two endpoints has none) from its turn round.
    /// Waiting on a slow target is measured (the schedule falls behind and the latency
    /// shows it); only a target that answers nothing for REQUEST_TIMEOUT ends the run.
    fn room(
        &self,
        o: &Options,
        target: &dyn Target,
        inflight: &[Arc<AtomicUsize>],
        i: u64,
    ) -> anyhow::Result<usize> {
        let mut waiting_since = Instant::now();
        let mut answered_before = None;
        loop {
            let first = (i as usize) % o.connections;
            let found = (0..o.connections)
                .map(|k| (first + k) % o.connections)
                .find(|&c| inflight[c].load(Ordering::Acquire) < o.depth && target.ready(c));
            let answered = found.is_none().then(|| lock(&self.rec).answered);
            if answered != answered_before {
                waiting_since = Instant::now();
                answered_before = answered;
            }
            match found {
                Some(c) => return Ok(c),
                None if waiting_since.elapsed() > REQUEST_TIMEOUT => {
                    self.finished.store(true, Ordering::Relaxed);
                    bail!(
                        "every connection has had {} requests unanswered for {} s: the target stopped answering",
                        o.depth,
                        REQUEST_TIMEOUT.as_secs()
                    );
                }
                None => std::thread::sleep(Duration::from_micros(20)),
            }
        }
    }

    /// Waits for the last answers while they keep coming; what has not answered after
    /// REQUEST_TIMEOUT without any progress timed out.
    fn last_answers(&self) {
        let mut deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut answered_before = 0;
        loop {
            let (sent, answered) = {
                let r = lock(&self.rec);
                (r.sent_total(), r.answered)
            };
            if answered >= sent {
                break;
            }
            if answered != answered_before {
                answered_before = answered;
                deadline = Instant::now() + REQUEST_TIMEOUT;
            }
            if Instant::now() > deadline {
                lock(&self.rec).timed_out(sent - answered);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Flushes the ack log (`--ack-log`): its path and lines, or the error that left it
    /// incomplete. Call it once every reply callback is gone (the target dropped): a
    /// callback still holding the log keeps it from closing.
    pub fn finish_ack_log(&mut self) -> Option<anyhow::Result<(std::path::PathBuf, u64)>> {
        let acks = self.acks.take()?;
        Some(match Arc::try_unwrap(acks) {
            Ok(log) => log.into_inner().unwrap_or_else(|p| p.into_inner()).finish(),
            // A callback outlived its target: flush what the log has, through the lock.
            Err(shared) => {
                let mut log = lock(&shared);
                log.flush().map(|lines| (log.path().to_owned(), lines))
            }
        })
    }

    /// Flushes the failure log (`--failure-log`): its path and lines, or the error that
    /// left it incomplete (call it when the callbacks are gone, as for the ack log).
    pub fn finish_failure_log(&mut self) -> Option<anyhow::Result<(std::path::PathBuf, u64)>> {
        let failures = self.failures.take()?;
        let mut log = lock(&failures);
        Some(log.finish())
    }

    /// The figures (every reply callback is gone with its target, or they are taken
    /// out anyway), the memory samples, and the window on the wall clock.
    /// And the window's cost (CPU, context switches, idle share).
    pub fn take(
        self,
        appliance_pid: Option<u32>,
    ) -> (
        Recorder<Kept>,
        Memory,
        (u64, u64),
        Option<crate::cost::Cost>,
    ) {
        let cost = *lock(&self.cost);
        let rec = std::mem::replace(
            &mut *lock(&self.rec),
            Recorder::new(self.measure_from, self.measure_until, self.seed),
        );

        let mut memory = *lock(&self.memory);
        memory.sample(appliance_pid);
        let window = window_unix_ms(self.measure_from, rec.summary().elapsed);
        (rec, memory, window, cost)
    }
}

/// The measured window on the wall clock (Unix ms), to pick the appliance's log lines.
fn window_unix_ms(measure_from: Instant, elapsed: Duration) -> (u64, u64) {
    let from = custody::audit::now_ms().saturating_sub(
        Instant::now()
            .saturating_duration_since(measure_from)
            .as_millis() as u64,
    );
    (from, from + elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::pace;

    #[test]
    fn requests_further_apart_than_a_tick_keep_their_own_times() {
        // 1,000 req/s: 1 ms apart, each its own burst.
        assert_eq!(pace(0, 1e6, 200_000), (0, 0));
        assert_eq!(pace(7, 1e6, 200_000), (7_000_000, 7));
    }

    #[test]
    fn requests_closer_than_a_tick_go_out_at_its_end_together() {
        // 15,000 req/s: 66.7 µs apart, three or so per 200 µs tick.
        let interval = 1e9 / 15_000.0;
        let paced: Vec<(u64, u64)> = (0..7).map(|i| pace(i, interval, 200_000)).collect();
        assert_eq!(paced[0], (0, 0));
        assert_eq!(&paced[1..4], &[(200_000, 1); 3]);
        assert_eq!(&paced[4..7], &[(400_000, 2); 3]);
        // Never earlier than the request's own time, never a tick later.
        for i in 0..10_000u64 {
            let own = (i as f64 * interval) as u64;
            let (at, _) = pace(i, interval, 200_000);
            assert!(
                at >= own && at < own + 200_000,
                "request {i}: {own} -> {at}"
            );
        }
    }
}

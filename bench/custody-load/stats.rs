//! The figures of a run. Every latency runs from the request's scheduled time, not from
//! when it could be sent, so a stall anywhere (the appliance, the network, the harness
//! itself) shows in the figures instead of hiding (no coordinated omission). Requests
//! scheduled outside the measured window (the warm-up) are served and counted but left
//! out of the latency figures. Memory is bounded whatever the run's length: histograms,
//! counters and a fixed-size uniform sample of the receipts.

use crate::workload::{Op, Rng};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Receipts kept for the audit check at the end (a uniform sample past this many).
pub const RECEIPTS_KEPT: usize = 1_000_000;
/// Endpoint switches of the acknowledgements kept for the report; more are only counted.
pub const SWITCHES_KEPT: usize = 256;
/// Distinct error names counted; more are counted as OTHER.
const ERROR_NAMES_MAX: usize = 64;

/// The histogram every latency goes into: microseconds, 3 significant digits, from 1 µs
/// to 60 s and growing past that (a saturated target's backlog can wait longer; a
/// latency is never dropped).
pub fn latency_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    h.auto(true);
    h
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// A ROTATE refused BUSY (another rotation of the asset in flight): the documented
    /// answer, to retry; neither a success nor a failure.
    RotationBusy,
    /// Refused or failed; the status name (or a client error).
    Error(String),
}

/// A uniform sample of at most `cap` items from a stream of unknown length (algorithm R).
pub struct Reservoir<T> {
    cap: usize,
    seen: u64,
    items: Vec<T>,
    rng: Rng,
}

impl<T> Reservoir<T> {
    pub fn new(cap: usize, seed: u64) -> Reservoir<T> {
        Reservoir {
            cap,
            seen: 0,
            items: Vec::new(),
            rng: Rng::new(seed),
        }
    }

    pub fn add(&mut self, item: T) {
        self.seen += 1;
        if self.items.len() < self.cap {
            self.items.push(item);
        } else {
            let j = self.rng.next_u64() % self.seen;
            if (j as usize) < self.cap {
                self.items[j as usize] = item;
            }
        }
    }

    /// Items offered in all.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn items(&self) -> &[T] {
        &self.items
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count, "p50": self.p50, "p90": self.p90, "p99": self.p99,
            "p99_9": self.p999, "max": self.max,
        })
    }
}

/// The acknowledgements' trail across endpoints (issue 19): the longest silence between
/// two acknowledgements as the client saw it, and each change of the endpoint that
/// acknowledged. Times are microseconds since the run's start.
#[derive(Clone, Debug, Default)]
pub struct AckTrail {
    /// The last acknowledgement: when, and from which endpoint.
    last: Option<(u64, u16)>,
    /// The longest gap between two acknowledgements, and when it ended.
    pub longest_gap_us: u64,
    pub longest_gap_end_us: u64,
    /// The first [`SWITCHES_KEPT`] switches, in order.
    pub switches: Vec<Switch>,
    pub switches_total: u64,
}

/// The endpoint that acknowledges changed: the last acknowledgement from `from` and the
/// first from `to` (µs since the run's start; endpoints as indices of `--addr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    pub from: u16,
    pub last_before_us: u64,
    pub to: u16,
    pub first_after_us: u64,
}

impl AckTrail {
    /// One acknowledgement from `endpoint` at `at_us`.
    pub fn ack(&mut self, at_us: u64, endpoint: u16) {
        if let Some((last_us, last_endpoint)) = self.last {
            let gap = at_us.saturating_sub(last_us);
            if gap > self.longest_gap_us {
                self.longest_gap_us = gap;
                self.longest_gap_end_us = at_us;
            }
            if last_endpoint != endpoint {
                self.switches_total += 1;
                if self.switches.len() < SWITCHES_KEPT {
                    self.switches.push(Switch {
                        from: last_endpoint,
                        last_before_us: last_us,
                        to: endpoint,
                        first_after_us: at_us,
                    });
                }
            }
        }
        // Answers may be recorded a hair out of order: the trail keeps the latest time.
        let at_us = self.last.map_or(at_us, |(t, _)| t.max(at_us));
        self.last = Some((at_us, endpoint));
    }
}

/// What the live line shows for the last second.
pub struct Live {
    pub ok: u64,
    pub errors: u64,
    pub p99_ms: f64,
}

/// Everything a run counts.
pub struct Recorder<R> {
    /// The measured window: requests scheduled in `[from, until)`.
    from: Instant,
    until: Instant,
    pub sent: [u64; 3],
    pub answered: u64,
    pub ok: [u64; 3],
    pub rotations_busy: u64,
    pub errors: BTreeMap<String, u64>,
    pub measured_ok: u64,
    pub measured_errors: u64,
    /// Answers (of any request, ok or not) that arrived inside the measured window: the
    /// work the appliance did while its CPU was sampled (`cost`), which at overload is
    /// less than the requests scheduled in the window.
    pub answered_in_window: u64,
    last_measured_done: Option<Instant>,
    /// Measured latency per operation.
    latency: [Histogram<u64>; 3],
    /// Measured derivations with a reconciliation in flight at some moment of their life,
    /// and those without (`--reconcile-phase-s`).
    during: Histogram<u64>,
    quiet: Histogram<u64>,
    /// Measured derivations by the kind of client they went through (`--clients`).
    by_route: [Histogram<u64>; 2],
    /// The drain gave up on the rest (TIMEOUT): later answers are not counted again.
    closed: bool,
    live_ok: u64,
    live_errors: u64,
    live_latency: Histogram<u64>,
    pub receipts: Reservoir<R>,
    /// Every acknowledgement's time and endpoint, from the run's start.
    pub trail: AckTrail,
    start: Instant,
}

/// The measured figures.
pub struct Summary {
    /// The window's length, or longer when its last answers came after it.
    pub elapsed: Duration,
    pub throughput: f64,
    pub latency: [Option<Percentiles>; 3],
    pub during: Option<Percentiles>,
    pub quiet: Option<Percentiles>,
    pub by_route: [Option<Percentiles>; 2],
}

impl<R> Recorder<R> {
    pub fn new(from: Instant, until: Instant, seed: u64) -> Recorder<R> {
        Recorder {
            from,
            until,
            sent: [0; 3],
            answered: 0,
            ok: [0; 3],
            rotations_busy: 0,
            errors: BTreeMap::new(),
            measured_ok: 0,
            measured_errors: 0,
            answered_in_window: 0,
            last_measured_done: None,
            latency: [
                latency_histogram(),
                latency_histogram(),
                latency_histogram(),
            ],
            during: latency_histogram(),
            quiet: latency_histogram(),
            by_route: [latency_histogram(), latency_histogram()],
            closed: false,
            live_ok: 0,
            live_errors: 0,
            live_latency: latency_histogram(),
            receipts: Reservoir::new(RECEIPTS_KEPT, seed),
            trail: AckTrail::default(),
            start: from,
        }
    }

    /// The recorder with its acknowledgement times counted from `start` (the run's start,
    /// before the warm-up) instead of the measured window's.
    pub fn started_at(self, start: Instant) -> Recorder<R> {
        Recorder { start, ..self }
    }

    /// An acknowledgement at `at` from `endpoint`, into the trail (unless the drain gave up).
    pub fn acked(&mut self, at: Instant, endpoint: u16) {
        if !self.closed {
            let at_us = at.saturating_duration_since(self.start).as_micros() as u64;
            self.trail.ack(at_us, endpoint);
        }
    }

    pub fn sent(&mut self, op: Op) {
        self.sent[op.index()] += 1;
    }

    pub fn sent_total(&self) -> u64 {
        self.sent.iter().sum()
    }

    /// Records one answer. `reconciling`: whether a reconciliation was in flight during
    /// the request's life; `route`: the kind of client (0 plain, 1 shard-aware); `None`:
    /// not measured.
    pub fn answered(
        &mut self,
        op: Op,
        scheduled: Instant,
        done: Instant,
        answer: Answer,
        reconciling: Option<bool>,
        route: Option<usize>,
    ) {
        if self.closed {
            return;
        }
        self.answered += 1;
        if done >= self.from && done < self.until {
            self.answered_in_window += 1;
        }
        let latency_us = (done.saturating_duration_since(scheduled).as_micros() as u64).max(1);
        let measured = scheduled >= self.from && scheduled < self.until;
        match answer {
            Answer::Ok => {
                self.ok[op.index()] += 1;
                self.live_ok += 1;
                if op == Op::Derive {
                    let _ = self.live_latency.record(latency_us);
                }
                if measured {
                    self.measured_ok += 1;
                    self.last_measured_done =
                        Some(self.last_measured_done.map_or(done, |t| t.max(done)));
                    let _ = self.latency[op.index()].record(latency_us);
                    if let Some(h) = route
                        .filter(|_| op == Op::Derive)
                        .and_then(|r| self.by_route.get_mut(r))
                    {
                        let _ = h.record(latency_us);
                    }
                    if op == Op::Derive {
                        match reconciling {
                            Some(true) => {
                                let _ = self.during.record(latency_us);
                            }
                            Some(false) => {
                                let _ = self.quiet.record(latency_us);
                            }
                            None => {}
                        }
                    }
                }
            }
            Answer::RotationBusy => self.rotations_busy += 1,
            Answer::Error(name) => {
                let name = if self.errors.len() < ERROR_NAMES_MAX || self.errors.contains_key(&name)
                {
                    name
                } else {
                    "OTHER".to_owned()
                };
                *self.errors.entry(name).or_default() += 1;
                self.live_errors += 1;
                if measured {
                    self.measured_errors += 1;
                }
            }
        }
    }

    /// Requests that never answered: counted as TIMEOUT errors, measured ones too (their
    /// schedule is not known here, so all of them: the conservative side), and any
    /// answer after this is not counted.
    pub fn timed_out(&mut self, n: u64) {
        if n > 0 {
            *self.errors.entry("TIMEOUT".into()).or_default() += n;
            self.measured_errors += n;
        }
        self.closed = true;
    }

    /// The last second's figures, for the live line; starts the next second.
    pub fn take_live(&mut self) -> Live {
        let live = Live {
            ok: self.live_ok,
            errors: self.live_errors,
            p99_ms: self.live_latency.value_at_quantile(0.99) as f64 / 1000.0,
        };
        self.live_ok = 0;
        self.live_errors = 0;
        self.live_latency.reset();
        live
    }

    pub fn summary(&self) -> Summary {
        let window = self.until.saturating_duration_since(self.from);
        let elapsed = self
            .last_measured_done
            .map(|t| t.saturating_duration_since(self.from))
            .unwrap_or(window)
            .max(window);
        Summary {
            elapsed,
            throughput: self.measured_ok as f64 / elapsed.as_secs_f64().max(1e-9),
            latency: [0, 1, 2].map(|i| Percentiles::of(&self.latency[i])),
            during: Percentiles::of(&self.during),
            quiet: Percentiles::of(&self.quiet),
            by_route: [0, 1].map(|i| Percentiles::of(&self.by_route[i])),
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic schedule with known latencies: 1,000 requests a second for 11 s, the
    /// first second warm-up.
    fn schedule() -> (Instant, Vec<Instant>, Recorder<()>) {
        let t0 = Instant::now();
        let times: Vec<Instant> = (0..11_000).map(|i| t0 + Duration::from_millis(i)).collect();
        let rec = Recorder::new(t0 + Duration::from_secs(1), t0 + Duration::from_secs(11), 1);
        (t0, times, rec)
    }

    #[test]
    fn percentiles_come_from_the_window_only() {
        let (_, times, mut rec) = schedule();
        for (i, &at) in times.iter().enumerate() {
            rec.sent(Op::Derive);
            let latency = if i < 1000 {
                Duration::from_millis(500) // warm-up: served, not measured
            } else if i % 200 == 0 {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(1)
            };
            let answer = if i % 1000 == 999 {
                Answer::Error("STORE_UNAVAILABLE".into())
            } else {
                Answer::Ok
            };
            rec.answered(Op::Derive, at, at + latency, answer, None, None);
        }
        let s = rec.summary();
        let p = s.latency[Op::Derive.index()].unwrap();
        // 10,000 measured, 10 of them errors: 9,990 latencies, 50 of them 50 ms.
        assert_eq!(rec.measured_ok, 9_990);
        assert_eq!(rec.measured_errors, 10);
        assert_eq!(rec.errors.get("STORE_UNAVAILABLE"), Some(&11));
        assert_eq!(p.count, 9_990);
        // Within the histogram's precision (3 significant digits).
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001;
        assert!(close(p.p50, 1.0) && close(p.p90, 1.0), "{p:?}");
        // 0.5 % of answers are 50 ms: below the 99th percentile's 1 %, above the 99.9th's.
        assert!(close(p.p99, 1.0), "{p:?}");
        assert!(close(p.p999, 50.0) && close(p.max, 50.0), "{p:?}");
        // The warm-up's 500 ms never shows.
        assert!(p.max < 500.0);
        // 9,990 answers in the 10 s window (the last one 1 ms after it ends).
        assert!(
            (s.elapsed.as_secs_f64() - 10.0).abs() < 0.01,
            "{:?}",
            s.elapsed
        );
        assert!((s.throughput - 999.0).abs() < 1.0, "{}", s.throughput);
    }

    /// A 200 ms stall: the requests scheduled during it are all answered when it ends.
    /// Measured from the scheduled time they take 200 ms down to 1 ms, and the 99th
    /// percentile says so; measured from the send (after the stall) they would all look
    /// like 1 ms.
    #[test]
    fn a_stall_shows_in_the_tail() {
        let (t0, times, mut rec) = schedule();
        let stall = (
            t0 + Duration::from_secs(5),
            t0 + Duration::from_millis(5200),
        );
        for &at in &times {
            rec.sent(Op::Derive);
            let done = if at >= stall.0 && at < stall.1 {
                stall.1 + Duration::from_millis(1)
            } else {
                at + Duration::from_millis(1)
            };
            rec.answered(Op::Derive, at, done, Answer::Ok, None, None);
        }
        let p = rec.summary().latency[0].unwrap();
        // 200 of 10,000 are stalled, 201 ms down to 2 ms: the 9,900th smallest is 101 ms.
        assert!((p.p99 - 101.0).abs() < 0.2, "{p:?}");
        assert!((p.max - 201.0).abs() < 0.5, "{p:?}");
        assert!((p.p50 - 1.0).abs() < 0.01, "{p:?}");
    }

    #[test]
    fn operations_and_reconciliation_classes_are_kept_apart() {
        let (_, times, mut rec) = schedule();
        for (i, &at) in times.iter().enumerate().skip(1000) {
            let (op, latency) = match i % 10 {
                0 => (Op::Rotate, 20),
                1 => (Op::Status, 2),
                _ => (Op::Derive, if i % 2 == 0 { 4 } else { 1 }),
            };
            rec.sent(op);
            let reconciling = (op == Op::Derive).then_some(i % 2 == 0);
            rec.answered(
                op,
                at,
                at + Duration::from_millis(latency),
                Answer::Ok,
                reconciling,
                None,
            );
        }
        rec.answered(
            Op::Rotate,
            times[5000],
            times[5001],
            Answer::RotationBusy,
            None,
            None,
        );
        let s = rec.summary();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001;
        assert!(close(s.latency[Op::Rotate.index()].unwrap().p50, 20.0));
        assert!(close(s.latency[Op::Status.index()].unwrap().p50, 2.0));
        assert!(close(s.during.unwrap().max, 4.0));
        assert!(close(s.quiet.unwrap().max, 1.0));
        assert_eq!(rec.rotations_busy, 1);
        assert_eq!(rec.ok, [8_000, 1_000, 1_000]);
    }

    #[test]
    fn the_receipt_sample_is_bounded_and_uniform() {
        let mut r = Reservoir::new(1000, 5);
        for i in 0..100_000u32 {
            r.add(i);
        }
        assert_eq!(r.items().len(), 1000);
        assert_eq!(r.seen(), 100_000);
        // Uniform: about a tenth of the sample from each tenth of the stream.
        let mut tenths = [0u32; 10];
        for &i in r.items() {
            tenths[(i / 10_000) as usize] += 1;
        }
        for t in tenths {
            assert!((60..140).contains(&t), "{tenths:?}");
        }
    }

    #[test]
    fn a_latency_past_a_minute_is_kept() {
        let (t0, _, mut rec) = schedule();
        let at = t0 + Duration::from_secs(2);
        rec.answered(
            Op::Derive,
            at,
            at + Duration::from_secs(90),
            Answer::Ok,
            None,
            None,
        );
        let p = rec.summary().latency[0].unwrap();
        assert_eq!(p.count, 1);
        assert!((p.max - 90_000.0).abs() < 90.0, "{p:?}");
    }

    #[test]
    fn answers_after_the_drain_gave_up_are_not_counted_again() {
        let (t0, _, mut rec) = schedule();
        let at = t0 + Duration::from_secs(2);
        rec.sent(Op::Derive);
        rec.sent(Op::Derive);
        rec.answered(Op::Derive, at, at, Answer::Ok, None, Some(1));
        rec.timed_out(1);
        rec.answered(
            Op::Derive,
            at,
            at + Duration::from_secs(20),
            Answer::Ok,
            None,
            None,
        );
        assert_eq!(
            (rec.answered, rec.measured_ok, rec.measured_errors),
            (1, 1, 1)
        );
        assert_eq!(rec.summary().by_route[1].unwrap().count, 1);
        assert!(rec.summary().by_route[0].is_none());
    }

    #[test]
    fn error_names_are_bounded() {
        let (_, times, mut rec) = schedule();
        for (i, &at) in times.iter().enumerate().take(200) {
            rec.answered(
                Op::Derive,
                at,
                at,
                Answer::Error(format!("E{i}")),
                None,
                None,
            );
        }
        assert_eq!(rec.errors.len(), ERROR_NAMES_MAX + 1);
        assert_eq!(
            rec.errors.get("OTHER"),
            Some(&(200 - ERROR_NAMES_MAX as u64))
        );
        assert_eq!(rec.errors_total(), 200);
    }

    /// The longest silence and each change of endpoint, across a failover and back.
    #[test]
    fn the_trail_finds_the_gap_and_the_switches() {
        let mut t = AckTrail::default();
        for at in [1_000, 2_000, 3_000] {
            t.ack(at, 0);
        }
        // The active dies at 3 ms; the standby acknowledges from 2.5 s on.
        t.ack(2_503_000, 1);
        t.ack(2_503_100, 1);
        // One late answer recorded out of order changes nothing.
        t.ack(2_503_050, 1);
        t.ack(2_600_000, 0);
        assert_eq!(
            (t.longest_gap_us, t.longest_gap_end_us),
            (2_500_000, 2_503_000)
        );
        assert_eq!(t.switches_total, 2);
        assert_eq!(
            t.switches,
            [
                Switch {
                    from: 0,
                    last_before_us: 3_000,
                    to: 1,
                    first_after_us: 2_503_000
                },
                Switch {
                    from: 1,
                    last_before_us: 2_503_100,
                    to: 0,
                    first_after_us: 2_600_000
                },
            ]
        );
    }

    #[test]
    fn switches_kept_are_bounded() {
        let mut t = AckTrail::default();
        for i in 0..(SWITCHES_KEPT as u64 * 3) {
            t.ack(i, (i % 2) as u16);
        }
        assert_eq!(t.switches.len(), SWITCHES_KEPT);
        assert_eq!(t.switches_total, SWITCHES_KEPT as u64 * 3 - 1);
    }

    #[test]
    fn the_live_line_covers_one_second_at_a_time() {
        let (_, times, mut rec) = schedule();
        for &at in &times[..100] {
            rec.answered(
                Op::Derive,
                at,
                at + Duration::from_millis(3),
                Answer::Ok,
                None,
                None,
            );
        }
        let live = rec.take_live();
        assert_eq!((live.ok, live.errors), (100, 0));
        assert!((live.p99_ms - 3.0).abs() < 0.01);
        let live = rec.take_live();
        assert_eq!((live.ok, live.p99_ms), (0, 0.0));
    }
}

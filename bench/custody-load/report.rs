//! The end of a run: its [`Report`], printed as text or JSON, the audit check, and the
//! exit code (0; 4 an acknowledged derivation without its audit record; 5 a
//! reconciliation finding; 6 the p99 objective missed).

use crate::cli::Options;
use crate::drive::ReconcileLoad;
use crate::live::Memory;
use crate::observe::CommitFigures;
use crate::stats::{Percentiles, Recorder, Summary};
use crate::target::{Clients, Kept, NOT_SENT, OUTCOME_UNKNOWN};
use crate::verify::{verify_audit, AuditCheck, AuditSource};
use crate::workload::Op;
use hdrhistogram::Histogram;

/// What a run measured and saw, for [`finish`].
pub struct Report {
    pub shards: u16,
    pub rec: Recorder<Kept>,
    /// The measured window, milliseconds since the Unix epoch.
    pub measured_unix_ms: (u64, u64),
    /// The appliance's group-commit figures in the window (demo only).
    pub commits: Option<CommitFigures>,
    /// Refreshes of the seed cache through the seal provider in the window (demo only).
    pub seal_refreshes: Option<usize>,
    /// Answer latency of the region switches (`--toggle-region-ms`), microseconds.
    pub region_switch_us: Option<Histogram<u64>>,
    /// The appliance's full reconciliation after the run.
    pub reconciliation: Option<custody::op::ReconcileSummary>,
    /// Reconciliations run during the window (`--reconcile-phase-s`).
    pub reconcile_load: Option<ReconcileLoad>,
    pub memory: Memory,
    /// The article's design (`article`): rows in its audit log at the end.
    pub article_audit_rows: Option<u64>,
    /// Operations the appliance handed from one core to another during the run (demo).
    pub cross_core: Option<u64>,
    /// `--addr`'s endpoints (empty: the article's design).
    pub endpoints: Vec<std::net::SocketAddr>,
    /// Connections made again after a closed connection or NOT_ACTIVE.
    pub reconnects: u64,
    /// `--ack-log`: the file and the lines written to it.
    pub ack_log: Option<(std::path::PathBuf, u64)>,
    /// `--failure-log`: the file and the lines written to it.
    pub failure_log: Option<(std::path::PathBuf, u64)>,
    /// The schedule's start (time 0 of the ack and failure logs) on the wall clock and
    /// CLOCK_MONOTONIC (`run_start` in JSON; none for the article's design).
    pub start_clock: Option<crate::schedule::StartClock>,
    /// The window's CPU time and context switches, and the machine's idle share.
    pub cost: Option<crate::cost::Cost>,
}

impl Report {
    /// The report of a run's figures, with none of the optional parts yet.
    pub fn new(
        shards: u16,
        rec: Recorder<Kept>,
        memory: Memory,
        measured_unix_ms: (u64, u64),
    ) -> Report {
        Report {
            shards,
            measured_unix_ms,
            rec,
            commits: None,
            seal_refreshes: None,
            region_switch_us: None,
            reconciliation: None,
            reconcile_load: None,
            memory,
            article_audit_rows: None,
            cross_core: None,
            endpoints: Vec::new(),
            reconnects: 0,
            ack_log: None,
            failure_log: None,
            start_clock: None,
            cost: None,
        }
    }
}

/// How the requests ended, as failover sees them (issue 19).
struct Outcomes {
    acknowledged: u64,
    not_active: u64,
    /// In flight when their connection closed: they may have run.
    unknown: u64,
    /// Found their connection gone as they were started: not sent.
    not_sent: u64,
    /// Every other refusal or failure.
    other: u64,
}

impl Outcomes {
    fn of(rec: &Recorder<Kept>) -> Outcomes {
        let named = |name: &str| rec.errors.get(name).copied().unwrap_or(0);
        let (not_active, unknown, not_sent) =
            (named("NOT_ACTIVE"), named(OUTCOME_UNKNOWN), named(NOT_SENT));
        Outcomes {
            acknowledged: rec.ok.iter().sum(),
            not_active,
            unknown,
            not_sent,
            other: (rec.errors_total() + rec.rotations_busy)
                .saturating_sub(not_active + unknown + not_sent),
        }
    }
}

/// Microseconds as milliseconds with three decimals (JSON numbers).
fn us_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A run's main figures, for `compare`.
pub struct Headline {
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub errors: u64,
    /// The JSON report (`--json`).
    pub json: serde_json::Value,
}

/// Prints the report, verifies the audit log, and gives the exit code.
pub fn finish(
    o: &Options,
    report: Report,
    audit: Option<AuditSource>,
) -> anyhow::Result<(i32, Headline)> {
    let rec = &report.rec;
    let audit = match audit {
        Some(source) => Some(verify_audit(
            source,
            rec.receipts.items(),
            rec.receipts.seen(),
        )?),
        None => None,
    };
    let figures = Figures::new(o, &report, audit);
    let json = if o.json {
        let json = figures.json();
        if !o.compare {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        json
    } else {
        figures.print();
        serde_json::Value::Null
    };
    Ok((figures.exit_code(), figures.headline(json)))
}

/// A report on its way out: the run's report, its audit check, and what is worked out
/// from them once for the text, the JSON and the exit code.
struct Figures<'a> {
    o: &'a Options,
    report: &'a Report,
    audit: Option<AuditCheck>,
    summary: Summary,
    /// The derivations' latency (the one the objective is about).
    derive: Option<Percentiles>,
    errors_total: u64,
    /// `--slo-p99` given and missed.
    slo_missed: bool,
    /// The operations of the mix, in their order.
    ops: Vec<Op>,
    /// The median run of the reconciler load, ms.
    run_ms_p50: Option<f64>,
}

impl<'a> Figures<'a> {
    fn new(o: &'a Options, report: &'a Report, audit: Option<AuditCheck>) -> Figures<'a> {
        let rec = &report.rec;
        let summary = rec.summary();
        let derive = summary.latency[Op::Derive.index()];
        let slo_missed = match (o.slo_p99, derive) {
            // A failed request misses the objective whatever the others' latency.
            (Some(_), _) if rec.measured_errors > 0 => true,
            (Some(slo), Some(p)) => p.p99 > slo.as_secs_f64() * 1000.0,
            // No derivation measured: the objective cannot be said to hold.
            (Some(_), None) => true,
            (None, _) => false,
        };
        let ops: Vec<Op> = Op::ALL
            .into_iter()
            .filter(|op| o.mix.share(*op) > 0.0)
            .collect();
        let run_ms_p50 = report
            .reconcile_load
            .as_ref()
            .filter(|l| !l.run_us.is_empty())
            .map(|l| l.run_us.value_at_quantile(0.5) as f64 / 1000.0);
        Figures {
            o,
            report,
            audit,
            summary,
            derive,
            errors_total: rec.errors_total(),
            slo_missed,
            ops,
            run_ms_p50,
        }
    }

    /// The report as JSON (`--json`).
    fn json(&self) -> serde_json::Value {
        let (o, report, rec, summary) = (self.o, self.report, &self.report.rec, &self.summary);
        let (derive, ops, slo_missed, run_ms_p50) =
            (self.derive, &self.ops, self.slo_missed, self.run_ms_p50);
        let (audit, load, mem) = (&self.audit, report.reconcile_load.as_ref(), &report.memory);
        let mut report_json = serde_json::json!({
            "rate_target": o.rate,
            "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(),
            "connections": o.connections,
            "depth": o.depth,
            "assets": o.assets,
            "distribution": o.distribution.describe(),
            "mix": o.mix.describe(),
            "shards": report.shards,
            "requests_sent": rec.sent_total(),
            "requests_ok": rec.ok.iter().sum::<u64>(),
            "by_op": ops.iter().map(|op| (op.name().to_owned(), serde_json::json!({
                "sent": rec.sent[op.index()], "ok": rec.ok[op.index()],
                "latency_ms": summary.latency[op.index()].map(|p| p.json()),
            }))).collect::<serde_json::Map<_, _>>(),
            "rotations_busy": rec.rotations_busy,
            "region_switches": report.region_switch_us.as_ref().and_then(Percentiles::of).map(|p| p.json()),
            "errors": rec.errors,
            "failover": self.failover_json(),
            "run_start": report.start_clock.map(|c| serde_json::json!({
                "unix_ms": c.unix_ms, "monotonic_ms": c.monotonic_ms,
            })),
            "measured_ok": rec.measured_ok,
            "measured_errors": rec.measured_errors,
            "throughput_rps": summary.throughput,
            "latency_ms": derive.map(|p| p.json()),
            "slo_p99_ms": o.slo_p99.map(|d| d.as_secs_f64() * 1000.0),
            "slo_met": o.slo_p99.map(|_| !slo_missed),
            "clients": o.clients.name(),
            "by_client": (o.clients == Clients::Both).then(|| serde_json::json!({
                "plain": summary.by_route[0].map(|p| p.json()),
                "shard_aware": summary.by_route[1].map(|p| p.json()),
            })),
            "cross_core_requests": report.cross_core,
            "memory_mib": {
                "harness_max": mem.harness_max_kib as f64 / 1024.0,
                "appliance_first": mem.appliance_first_kib.map(|k| k as f64 / 1024.0),
                "appliance_last": mem.appliance_last_kib.map(|k| k as f64 / 1024.0),
                "appliance_max": mem.appliance_first_kib.map(|_| mem.appliance_max_kib as f64 / 1024.0),
            },
            "commits": report.commits.as_ref().map(|c| serde_json::json!({
                "shard_seconds": c.intervals, "batches": c.batches, "records": c.records,
                "failed": c.failed,
                "records_per_batch_mean": c.records as f64 / c.batches.max(1) as f64,
                "batch_records": { "p50": c.batch_p50, "p99": c.batch_p99, "max": c.batch_max },
                "commit_ms": { "p50": c.commit_p50_ms, "p99": c.commit_p99_ms, "max": c.commit_max_ms },
            })),
            "seal_refreshes": report.seal_refreshes,
            "article_audit_rows": report.article_audit_rows,
            "audit": audit.as_ref().map(|a| serde_json::json!({
                "acknowledged": a.acknowledged, "checked": a.checked, "found": a.found,
                "missing": a.missing, "mismatched": a.mismatched,
            })),
            "reconcile_load": load.map(|l| serde_json::json!({
                "phase_s": o.reconcile_phase.map(|d| d.as_secs_f64()),
                "runs": l.runs, "records_checked": l.records, "findings": l.findings,
                "busy_refusals": l.busy_refusals, "run_ms_p50": run_ms_p50,
                "during_reconciliation": summary.during.map(|p| p.json()),
                "without": summary.quiet.map(|p| p.json()),
            })),
            "reconciliation": report.reconciliation.as_ref().map(|r| serde_json::json!({
                "records_checked": r.records_checked, "checkpoints_checked": r.checkpoints_checked,
                "assets_checked": r.assets_checked, "assets_drifted": r.assets_drifted,
                "drift_ratio": r.assets_drifted as f64 / r.assets_checked.max(1) as f64,
                "macs_checked": r.macs_checked, "findings": r.findings_total,
            })),
        });
        // Added after: one more key in the macro above passes its recursion limit.
        report_json["cost"] = self.cost_json().into();
        report_json
    }

    /// The outcomes and the acknowledgements' trail across endpoints (`failover` in JSON).
    fn failover_json(&self) -> serde_json::Value {
        let (report, rec) = (self.report, &self.report.rec);
        let o = Outcomes::of(rec);
        let t = &rec.trail;
        let name = |i: u16| self.endpoint_name(i);
        serde_json::json!({
            "endpoints": report.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "acknowledged": o.acknowledged,
            "refused_not_active": o.not_active,
            "outcome_unknown": o.unknown,
            "not_sent": o.not_sent,
            "other_refusals": o.other,
            "reconnects": report.reconnects,
            "longest_ack_gap_ms": us_ms(t.longest_gap_us),
            "longest_ack_gap_end_ms": us_ms(t.longest_gap_end_us),
            "switches_total": t.switches_total,
            "switches": t.switches.iter().map(|s| serde_json::json!({
                "from": name(s.from), "last_ack_before_ms": us_ms(s.last_before_us),
                "to": name(s.to), "first_ack_after_ms": us_ms(s.first_after_us),
            })).collect::<Vec<_>>(),
            "ack_log": report.ack_log.as_ref().map(|(path, lines)| serde_json::json!({
                "path": path, "lines": lines,
            })),
            "failure_log": report.failure_log.as_ref().map(|(path, lines)| serde_json::json!({
                "path": path, "lines": lines,
            })),
        })
    }

    /// Endpoint `i` of `--addr` as text.
    fn endpoint_name(&self, i: u16) -> String {
        self.report
            .endpoints
            .get(usize::from(i))
            .map_or_else(|| format!("#{i}"), |e| e.to_string())
    }

    /// The failover figures: printed with several endpoints, or when anything failed over
    /// (a single endpoint's run prints as it always did).
    fn print_failover(&self) {
        let (report, rec) = (self.report, &self.report.rec);
        let o = Outcomes::of(rec);
        let t = &rec.trail;
        if report.endpoints.len() > 1 || report.reconnects > 0 || t.switches_total > 0 {
            println!(
                "  failover    {} acknowledged, {} refused NOT_ACTIVE, {} of unknown outcome (in flight when a connection closed), {} not sent, {} other refusals; {} reconnections",
                o.acknowledged, o.not_active, o.unknown, o.not_sent, o.other, report.reconnects
            );
            println!(
                "              longest gap between two acknowledgements {:.3} ms (ending at {:.3} ms); {} endpoint switches",
                us_ms(t.longest_gap_us),
                us_ms(t.longest_gap_end_us),
                t.switches_total
            );
            for s in &t.switches {
                println!(
                    "              last ack from {} at {:.3} ms, first from {} at {:.3} ms ({:.3} ms between)",
                    self.endpoint_name(s.from),
                    us_ms(s.last_before_us),
                    self.endpoint_name(s.to),
                    us_ms(s.first_after_us),
                    us_ms(s.first_after_us.saturating_sub(s.last_before_us))
                );
            }
        }
        if let Some((path, lines)) = &report.ack_log {
            println!(
                "  ack log     {lines} acknowledged DERIVE and ROTATE lines in {}",
                path.display()
            );
        }
        if let Some((path, lines)) = &report.failure_log {
            println!(
                "  failure log {lines} requests not acknowledged in {}",
                path.display()
            );
        }
    }

    /// The report as text, a section after another.
    fn print(&self) {
        self.print_requests();
        self.print_failover();
        self.print_latency();
        self.print_objective();
        self.print_reconcile_load();
        self.print_errors_and_memory();
        self.print_cost();
        self.print_commits();
        self.print_audit();
        self.print_reconciliation();
    }

    /// The run's settings, the requests and the throughput, the region switches.
    fn print_requests(&self) {
        let (o, report, rec, summary) = (self.o, self.report, &self.report.rec, &self.summary);
        let errors_total = self.errors_total;
        println!(
            "custody-load: {} req/s target for {:.0} s after {:.0} s warm-up; {} connections, depth {}, {} assets ({}), mix {}{}",
            o.rate,
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.connections,
            o.depth,
            o.assets,
            o.distribution.describe(),
            o.mix.describe(),
            match report.article_audit_rows {
                None => format!(", {} shards", report.shards),
                Some(_) => ", the article's design".to_owned(),
            }
        );
        println!(
            "  requests    {} sent, {} ok, {} errors ({} measured ok, {} measured errors)",
            rec.sent_total(),
            rec.ok.iter().sum::<u64>(),
            errors_total,
            rec.measured_ok,
            rec.measured_errors
        );
        println!(
            "  throughput  {:.0} req/s (measured window)",
            summary.throughput
        );
        if let Some(p) = report.region_switch_us.as_ref().and_then(Percentiles::of) {
            println!(
                "  regions     {} switches of EU-WEST answered in p50 {:.3} ms, max {:.3} ms (in force on every core from the answer)",
                p.count, p.p50, p.max
            );
        }
    }

    /// Latency per operation, and per kind of client (`--clients both`).
    fn print_latency(&self) {
        let (o, rec, summary) = (self.o, &self.report.rec, &self.summary);
        let ops = &self.ops;
        for op in ops {
            let name = if *op == Op::Derive {
                "latency"
            } else {
                op.name()
            };
            match summary.latency[op.index()] {
                Some(p) => println!(
                    "  {name:<11} p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms{}",
                    p.p50,
                    p.p90,
                    p.p99,
                    p.p999,
                    p.max,
                    if ops.len() > 1 { format!("   ({} measured)", p.count) } else { String::new() }
                ),
                None => println!("  {name:<11} none measured"),
            }
        }
        if rec.rotations_busy > 0 {
            println!(
                "  rotations   {} answered BUSY (another rotation of the asset in flight: the documented answer, to retry)",
                rec.rotations_busy
            );
        }
        if o.clients == Clients::Both {
            for (name, class) in [
                ("plain", summary.by_route[0]),
                ("shard-aware", summary.by_route[1]),
            ] {
                match class {
                    Some(p) => println!(
                        "    {name:<11} {:>8} derivations  p50 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
                        p.count, p.p50, p.p99, p.p999, p.max
                    ),
                    None => println!("    {name:<11} no derivations"),
                }
            }
        }
    }

    /// The routing between cores, and the p99 objective.
    fn print_objective(&self) {
        let (o, report, rec) = (self.o, self.report, &self.report.rec);
        let (derive, slo_missed) = (self.derive, self.slo_missed);
        if let Some(n) = report.cross_core {
            println!(
                "  routing     {} clients; {n} operations handed from one core to another",
                o.clients.name()
            );
        }
        if let (Some(slo), Some(p)) = (o.slo_p99, derive) {
            println!(
                "  objective   p99 {:.3} ms against {:.3} ms, {} measured errors: {}",
                p.p99,
                slo.as_secs_f64() * 1000.0,
                rec.measured_errors,
                if slo_missed { "MISSED" } else { "met" }
            );
        }
    }

    /// The reconciler load (`--reconcile-phase-s`), with the latency of both classes.
    fn print_reconcile_load(&self) {
        let (o, report, summary) = (self.o, self.report, &self.summary);
        let (load, run_ms_p50) = (report.reconcile_load.as_ref(), self.run_ms_p50);
        if let Some(l) = load {
            println!(
                "  reconciling {} {} runs in the {:.1} s phases ({} records checked, run p50 {}, {} findings, {} BUSY)",
                l.runs,
                if o.reconcile_incremental { "incremental" } else { "full" },
                o.reconcile_phase.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                l.records,
                run_ms_p50.map(|m| format!("{m:.0} ms")).unwrap_or_else(|| "-".into()),
                l.findings,
                l.busy_refusals
            );
            for (name, class) in [("during", summary.during), ("without", summary.quiet)] {
                match class {
                    Some(p) => println!(
                        "    {name:<8} {:>8} derivations  p50 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
                        p.count, p.p50, p.p99, p.p999, p.max
                    ),
                    None => println!("    {name:<8} no derivations"),
                }
            }
        }
    }

    /// The window's cost per request (issue 20): CPU of the appliance (when known) and of
    /// the harness, user and system, the appliance's context switches, the idle share.
    fn cost_json(&self) -> Option<serde_json::Value> {
        let rec = &self.report.rec;
        let cost = self.report.cost?;
        let p = cost.per_request(rec.answered_in_window);
        Some(serde_json::json!({
            "window_s": cost.seconds,
            // The answers that arrived in the window: what the figures are per.
            "requests": rec.answered_in_window,
            "idle_share": cost.idle_share,
            "harness_cpu_us_per_request": p.harness_us,
            "harness_user_us_per_request": p.harness_user_us,
            "harness_system_us_per_request": p.harness_system_us,
            "harness_cpu_share": (cost.harness_user_s + cost.harness_system_s) / cost.seconds.max(1e-9),
            "appliance": p.appliance.zip(cost.appliance).map(|(a, c)| serde_json::json!({
                "cpu_us_per_request": a.cpu_us,
                "user_us_per_request": a.user_us,
                "system_us_per_request": a.system_us,
                "cpu_share": (c.user_s + c.system_s) / cost.seconds.max(1e-9),
                "context_switches_per_request": a.switches,
                "voluntary_switches": c.voluntary_switches,
                "involuntary_switches": c.involuntary_switches,
            })),
        }))
    }

    /// The cost line of the text report.
    fn print_cost(&self) {
        let rec = &self.report.rec;
        let Some(cost) = self.report.cost else {
            return;
        };
        let p = cost.per_request(rec.answered_in_window);
        let appliance = p
            .appliance
            .map(|a| {
                format!(
                    "custodyd {:.1} µs/req (user {:.1}, system {:.1}), {:.2} context switches/req; ",
                    a.cpu_us, a.user_us, a.system_us, a.switches
                )
            })
            .unwrap_or_default();
        let idle = cost
            .idle_share
            .map(|i| format!("; machine {:.0} % idle", i * 100.0))
            .unwrap_or_default();
        println!(
            "  cost        {appliance}harness {:.1} µs/req (user {:.1}, system {:.1}){idle}",
            p.harness_us, p.harness_user_us, p.harness_system_us
        );
    }

    /// The errors by name, and the resident memory.
    fn print_errors_and_memory(&self) {
        let (report, rec) = (self.report, &self.report.rec);
        let mem = &report.memory;
        if rec.errors.is_empty() {
            println!("  errors      none");
        } else {
            let list: Vec<String> = rec.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  errors      {}", list.join(", "));
        }
        let appliance = match (mem.appliance_first_kib, mem.appliance_last_kib) {
            (Some(first), Some(last)) => format!(
                "; custodyd {} MiB at the start, {} MiB at the end, {} MiB at most",
                first / 1024,
                last / 1024,
                mem.appliance_max_kib / 1024
            ),
            _ => String::new(),
        };
        println!(
            "  memory      harness {} MiB at most{appliance}",
            mem.harness_max_kib / 1024
        );
    }

    /// The appliance's group commit and seed-cache refreshes in the window (demo).
    fn print_commits(&self) {
        let (report, summary) = (self.report, &self.summary);
        if let Some(c) = &report.commits {
            println!(
                "  commits     {} batches ({:.0}/s), {:.1} records per batch, {} failed; per shard-second (median of {}): batch p50 {} p99 {} (max {}), commit p50 {:.3} ms p99 {:.3} ms (max {:.3} ms)",
                c.batches,
                c.batches as f64 / summary.elapsed.as_secs_f64(),
                c.records as f64 / c.batches.max(1) as f64,
                c.failed,
                c.intervals,
                c.batch_p50,
                c.batch_p99,
                c.batch_max,
                c.commit_p50_ms,
                c.commit_p99_ms,
                c.commit_max_ms
            );
        }
        if let Some(n) = report.seal_refreshes {
            println!(
                "  seal        {n} refreshes of the seed cache through the provider in the window"
            );
        }
    }

    /// The audit check (or the article's audit rows).
    fn print_audit(&self) {
        let (report, rec) = (self.report, &self.report.rec);
        let audit = &self.audit;
        match (&audit, report.article_audit_rows) {
            (_, Some(rows)) => println!(
                "  audit       {rows} rows in the article's audit log for {} acknowledged derivations",
                rec.ok[Op::Derive.index()]
            ),
            (Some(a), None) if a.checked == a.acknowledged => println!(
                "  audit       {} of {} acknowledged derivations have their durable audit record ({} missing, {} mismatched)",
                a.found, a.acknowledged, a.missing, a.mismatched
            ),
            (Some(a), None) => println!(
                "  audit       {} of a uniform sample of {} (of {} acknowledged derivations) have their durable audit record ({} missing, {} mismatched)",
                a.found, a.checked, a.acknowledged, a.missing, a.mismatched
            ),
            (None, None) => println!("  audit       not checked (give --verify-db FILE)"),
        }
    }

    /// The appliance's closing reconciliation.
    fn print_reconciliation(&self) {
        let report = self.report;
        match &report.reconciliation {
            Some(r) => {
                println!(
                    "  reconcile   {} records, {} checkpoints (MACs {}), {} assets: drift ratio {:.6}, {} findings",
                    r.records_checked,
                    r.checkpoints_checked,
                    if r.macs_checked { "checked" } else { "not checked" },
                    r.assets_checked,
                    r.assets_drifted as f64 / r.assets_checked.max(1) as f64,
                    r.findings_total
                );
                for f in &r.findings {
                    println!("              {f}");
                }
            }
            None if report.article_audit_rows.is_some() => {
                println!(
                    "  reconcile   none (the article's design has no reconciliation of its own)"
                )
            }
            None => println!("  reconcile   not asked for (--no-reconcile)"),
        }
    }

    /// 4 when an acknowledged derivation has no audit record, 5 on any finding of a
    /// reconciliation, 6 when the objective is missed, else 0.
    fn exit_code(&self) -> i32 {
        let (report, rec) = (self.report, &self.report.rec);
        let (audit, load, slo_missed) =
            (&self.audit, report.reconcile_load.as_ref(), self.slo_missed);
        let audit_ok = audit
            .as_ref()
            .map(|a| a.missing == 0 && a.mismatched == 0)
            .unwrap_or(true)
            && report
                .article_audit_rows
                .is_none_or(|rows| rows >= rec.ok[Op::Derive.index()]);
        // Any drift or other finding of a reconciliation fails the run.
        let reconciled = report
            .reconciliation
            .as_ref()
            .is_none_or(|r| r.findings_total == 0)
            && load.is_none_or(|l| l.findings == 0);
        if !audit_ok {
            4
        } else if !reconciled {
            5
        } else if slo_missed {
            6
        } else {
            0
        }
    }

    /// The main figures, for `compare`.
    fn headline(&self, json: serde_json::Value) -> Headline {
        let derive = self.derive;
        Headline {
            throughput: self.summary.throughput,
            p50: derive.map_or(f64::NAN, |p| p.p50),
            p99: derive.map_or(f64::NAN, |p| p.p99),
            p999: derive.map_or(f64::NAN, |p| p.p999),
            errors: self.errors_total,
            json,
        }
    }
}

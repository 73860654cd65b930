//! custody-load: the load harness.
//!
//! ```text
//! custody-load demo [OPTIONS]                   start custodyd on the embedded store, drive it, verify
//! custody-load run --addr A[,B…] --certs DIR [OPTIONS] [--verify-db FILE] [--ack-log FILE]
//!                                                drive a running appliance (or a group)
//! custody-load article --postgres URL [OPTIONS]   the same schedule against the article's design
//! custody-load compare --postgres URL [OPTIONS]   custody on PostgreSQL, then the article's design
//! ```
//!
//! Open loop at a constant rate: a pacing thread schedules each request at its own time,
//! and latency is measured from that scheduled time, not from when the request could be
//! sent, so a stall shows up in the figures instead of hiding (no coordinated omission).
//! Requests scheduled during the warm-up are served but left out of the figures. The
//! assets are picked uniformly or by a Zipf law, the operations by a mix of DERIVE,
//! ROTATE and STATUS. At the end a sample of the acknowledged derivations' receipts
//! (all of them up to a million) is looked up in the audit log, and the appliance
//! reconciles its whole audit log. Memory stays bounded for a run of any length (a 24 h
//! soak): histograms, counters and a fixed-size sample of the receipts; the live line
//! shows the harness's and (demo) the appliance's resident memory. Exit status: 0; 4 when
//! an acknowledged derivation has no audit record; 5 when a reconciliation finds anything
//! (drift above 0 among it); 6 when the derivations' p99 misses `--slo-p99`.

//!
//! The rooms: [`cli`] (usage, options, parsing), [`demo`] (an appliance of its own),
//! [`drive`] (a measured run against custody, with the region switcher and the
//! reconciler load beside it), [`schedule`] (the open loop), [`target`] (where requests
//! go), [`live`] (the live line and memory), [`observe`] (what the appliance's metrics
//! and log say), [`verify`] (the audit check), [`report`] (the report and the exit code),
//! [`compare`] (`article` and `compare`), [`article`] (the article's design as a target),
//! [`failover`] (connections that follow the active among `--addr`'s endpoints),
//! [`acklog`] (`--ack-log`: every acknowledged DERIVE and ROTATE), [`floods`], [`stats`]
//! and [`workload`].

mod acklog;
mod article;
mod cli;
mod compare;
mod cost;
mod demo;
mod drive;
mod failover;
mod floods;
mod live;
mod observe;
/// The throwaway PostgreSQL database, shared with the tests (`tests/common/pg.rs`).
#[path = "../../tests/common/pg.rs"]
mod pg;
mod report;
mod schedule;
mod stats;
mod target;
mod verify;
mod workload;

use anyhow::Context;
use cli::{FloodArgs, Options, USAGE};
use std::time::Duration;

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("custody-load: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Reads the command line and runs its command: the process's exit code.
fn real_main() -> anyhow::Result<i32> {
    let Some(args) = cli::parse()? else {
        return Ok(0);
    };
    let o = args.options;
    o.check()?;
    match args.command.as_deref() {
        Some("demo") => Ok(demo::demo(o)?.0),
        Some("run") => run(&o),
        Some("article") => Ok(compare::article(&o)?.0),
        Some("compare") => compare::compare(Options { compare: true, ..o }),
        Some("floods") => run_floods(&o, args.floods),
        _ => {
            eprintln!("{USAGE}");
            Ok(2)
        }
    }
}

/// `run`: drives a running appliance, has it reconcile its audit log (unless
/// --no-reconcile), and checks the receipts against --verify-db if given.
fn run(o: &Options) -> anyhow::Result<i32> {
    if o.endpoints.is_empty() {
        anyhow::bail!("run needs --addr");
    }
    let certs = o.certs.clone().context("run needs --certs DIR")?;
    let mut report = drive::drive(o, &o.endpoints, &certs, 0, o.server_pid)?;
    if o.reconcile_at_end {
        report.reconciliation = Some(observe::closing_reconciliation(&o.endpoints, &certs)?);
    }
    let audit = o.verify_db.clone().map(verify::AuditSource::Sqlite);
    Ok(report::finish(o, report, audit)?.0)
}

/// `floods`: connection-level abuse against a running appliance (floods.rs); exits 1 if
/// the steady deriver was refused or failed at any moment.
fn run_floods(o: &Options, a: FloodArgs) -> anyhow::Result<i32> {
    let addr = *o.endpoints.first().context("floods needs --addr")?;
    let certs = o.certs.clone().context("floods needs --certs DIR")?;
    let options = floods::FloodOptions {
        addr,
        certs,
        admin: a.admin,
        pid: a.pid,
        kinds: floods::Kind::parse_list(
            a.kinds
                .as_deref()
                .unwrap_or("tcp,roleless,identity,slow-header,slow-body,idle"),
        )?,
        connections: a.connections.unwrap_or(1000),
        hold: Duration::from_secs_f64(a.hold_s.unwrap_or(5.0)),
        settle: Duration::from_secs_f64(a.settle_s.unwrap_or(3.0)),
        deriver_rate: a.deriver_rate.unwrap_or(20),
        source: a.source.unwrap_or(std::net::IpAddr::from([127, 0, 0, 2])),
        rounds: a.rounds.unwrap_or(3),
        asset: a.asset.context("floods needs --asset UUID (registered)")?,
        json: o.json,
    };
    let reports = floods::run(&options)?;
    floods::print(&reports, o.json)?;
    let failed = reports.iter().any(|r| {
        r.before.failures + r.during.failures + r.after.failures > 0
            || r.before.probe_failures + r.during.probe_failures + r.after.probe_failures > 0
    });
    Ok(i32::from(failed))
}

/// A fresh PostgreSQL database for one run on the server at `url` (`--postgres`),
/// dropped afterwards.
fn temp_database(url: &str) -> anyhow::Result<pg::TempDatabase> {
    let admin = custody::store::postgres::PgConfig::from_url(url).context("--postgres URL")?;
    let name = format!("custody_load_{}", std::process::id());
    Ok(pg::TempDatabase::new(admin, &name)?)
}

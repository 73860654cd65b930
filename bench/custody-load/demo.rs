//! `demo`: an appliance of the harness's own (custodyd on the embedded store, or on a
//! fresh PostgreSQL database with `--postgres`; dev seal, dev certificates in a fresh
//! directory) started, driven, read and verified, then stopped.

use crate::cli::Options;
use crate::drive::drive;
use crate::observe::{closing_reconciliation, commit_figures, metric_sum, seal_refreshes};
use crate::pg::TempDatabase;
use crate::report::{finish, Headline, Report};
use crate::target::client_config;
use crate::verify::AuditSource;
use anyhow::{bail, Context};
use custody::client::Client;
use custody::net::free_loopback_ports;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The harness's client registers, derives and reads status; its rate limit is set out of
/// the way of the measurement (the limiter still runs on every request).
const POLICY_SECTION: &str = "\n[policy]\nderivers = [{ identity = \"custody-load\", purposes = [\"TRADING\", \"SETTLEMENT\", \"AUDIT\", \"BACKUP\"], regions = [\"US-EAST\", \"EU-WEST\", \"APAC\"] }]\noperators = [\"custody-load\"]\nauditors = [\"custody-load\"]\nadmins = [\"custody-load\"]\nrate_limits = { deriver = \"1000000000/1s\", operator = \"1000000000/1s\", auditor = \"1000000000/1s\" }\n";

/// The appliance started by `demo`; killed when dropped.
struct Appliance {
    child: Child,
    log: PathBuf,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the demo's appliance listens.
struct Ports {
    addr: SocketAddr,
    admin: SocketAddr,
    /// The first of the per-shard ports for shard-aware clients (server.shard_listen).
    shard_base: u16,
}

impl Ports {
    /// Free loopback ports: the shared port, the admin listener's, one per shard.
    fn pick(o: &Options) -> anyhow::Result<Ports> {
        let port = free_loopback_ports(1)?;
        let admin_port = free_loopback_ports(1)?;
        // As many ports as the appliance could run shards (its default runs one fewer).
        let shards = o
            .cores
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let shard_base = free_loopback_ports(u16::try_from(shards)?)?;
        Ok(Ports {
            addr: ([127, 0, 0, 1], port).into(),
            admin: ([127, 0, 0, 1], admin_port).into(),
            shard_base,
        })
    }
}

/// `demo`: starts the appliance, drives it, reads what it saw, verifies its audit log
/// and reports; the appliance (and the database) go when it returns.
pub fn demo(o: Options) -> anyhow::Result<(i32, Headline)> {
    let (dir, _temp) = match &o.state_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new().prefix("custody-demo-").tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let certs = dir.join("certs");
    custody::tls::write_dev_certs(&certs, "custody-load")?;
    let seed = dir.join("dev-seed.bin");
    if !seed.exists() {
        custody::seal::write_dev_seed(&seed)?;
    }
    let ports = Ports::pick(&o)?;
    let database = match &o.postgres {
        Some(url) => Some(crate::temp_database(url)?),
        None => None,
    };
    let config = dir.join("custody.toml");
    std::fs::write(&config, config_text(&o, &ports, database.as_ref(), &dir))?;
    let mut appliance = start(&config, &dir, database.as_ref())?;
    if !o.json {
        let store = match &database {
            Some(db) => format!("PostgreSQL database {}", db.config.dbname),
            None => "embedded SQLite store".to_owned(),
        };
        eprintln!(
            "custody-load: started custodyd on {} (state in {}, {store}, dev seal)",
            ports.addr,
            dir.display()
        );
    }
    wait_ready(&mut appliance, ports.addr, &certs, &dir)?;
    let report = measure(&o, &appliance, &ports, &certs, &dir)?;
    let audit = match &database {
        Some(db) => AuditSource::Postgres(db.config.clone()),
        None => AuditSource::Sqlite(dir.join("custody.db")),
    };
    let outcome = finish(&o, report, Some(audit))?;
    drop(appliance);
    drop(database);
    Ok(outcome)
}

/// The appliance's config: its listeners and state directory, the store, the seal's
/// cache, the reconciler's settings and the harness's roles.
fn config_text(o: &Options, ports: &Ports, database: Option<&TempDatabase>, dir: &Path) -> String {
    let store_section = match database {
        Some(db) => format!(
            "[store]\nbackend = \"postgres\"\npostgres_host = \"{}\"\npostgres_port = {}\npostgres_user = \"{}\"\npostgres_dbname = \"{}\"\n",
            db.config.hosts_text(),
            db.config.hosts.first().map_or(5432, |h| h.addr.port()),
            db.config.user,
            db.config.dbname
        ),
        None => String::new(),
    };
    let seal_section = match o.seal_ttl {
        Some(ttl) => format!("\n[seal]\ncache_ttl_s = {ttl}\n"),
        None => String::new(),
    };
    // With --reconcile-phase-s the harness's runs are the only ones: the appliance's own
    // periodic runs would fall in the quiet phases unseen.
    let mut audit_section = String::new();
    if let Some(n) = o.reconcile_rate {
        audit_section += &format!("reconcile_records_per_s = {n}\n");
    }
    if o.reconcile_phase.is_some() {
        audit_section += "reconcile_interval_s = 0\n";
    }
    if !audit_section.is_empty() {
        audit_section = format!("\n[audit]\n{audit_section}");
    }
    format!(
        "# written by custody-load demo\n[server]\nlisten = \"{}\"\nadmin_listen = \"127.0.0.1:{}\"\nshard_listen = \"127.0.0.1:{}\"\ncores = {}\nstate_dir = \"{}\"\nlog_level = \"info\"\nstats_log_interval_s = 1\n\n[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n\n{store_section}{seal_section}{audit_section}{POLICY_SECTION}",
        ports.addr,
        ports.admin.port(),
        ports.shard_base,
        o.cores.unwrap_or(0),
        dir.display()
    )
}

/// Finds custodyd beside the harness, migrates the PostgreSQL database if there is one,
/// and starts the appliance on `config` (its log and stderr in `dir`).
fn start(config: &Path, dir: &Path, database: Option<&TempDatabase>) -> anyhow::Result<Appliance> {
    let custodyd = std::env::current_exe()?.with_file_name("custodyd");
    if !custodyd.exists() {
        bail!(
            "{} not found: build the workspace first (cargo build --release)",
            custodyd.display()
        );
    }
    if database.is_some() {
        let out = Command::new(&custodyd)
            .arg("migrate")
            .arg("--config")
            .arg(config)
            .output()?;
        if !out.status.success() {
            bail!(
                "custodyd migrate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let log = dir.join("custodyd.log");
    let mut command = Command::new(&custodyd);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("custodyd.stderr"))?);
    // The appliance goes with the harness even if the harness dies without unwinding
    // (release builds abort on panic, e.g. when its output pipe closes).
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", custodyd.display()))?;
    Ok(Appliance { child, log })
}

/// Waits (at most 30 s) until the appliance answers HELLO over TLS.
fn wait_ready(
    app: &mut Appliance,
    addr: SocketAddr,
    certs: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = app.child.try_wait()? {
            let stderr = std::fs::read_to_string(dir.join("custodyd.stderr")).unwrap_or_default();
            bail!("custodyd exited with {status} before it served:\n{stderr}");
        }
        let ok = rt.block_on(async {
            match Client::connect(&client_config(addr, certs)).await {
                Ok(c) => c.hello().await.is_ok(),
                Err(_) => false,
            }
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "custodyd did not serve within 30 s (log: {})",
                app.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run against the appliance, then what the appliance itself saw: the operations
/// handed between cores (/metrics), its group commit and seed-cache refreshes in the
/// window (its log), and its full reconciliation of its audit log.
fn measure(
    o: &Options,
    appliance: &Appliance,
    ports: &Ports,
    certs: &Path,
    dir: &Path,
) -> anyhow::Result<Report> {
    let cross_before = metric_sum(ports.admin, "custody_cross_core_requests_total");
    let mut report = drive(o, &[ports.addr], certs, 1, Some(appliance.child.id()))?;
    // The cores publish their figures every second.
    std::thread::sleep(Duration::from_millis(1100));
    report.cross_core = cross_before
        .zip(metric_sum(ports.admin, "custody_cross_core_requests_total"))
        .map(|(a, b)| (b - a).max(0.0) as u64);
    // The last second's figures are logged a moment after the run ends.
    std::thread::sleep(Duration::from_millis(1100));
    report.commits = commit_figures(&dir.join("custodyd.stderr"), report.measured_unix_ms);
    report.seal_refreshes = seal_refreshes(&dir.join("custodyd.stderr"), report.measured_unix_ms);
    // The run ends with the appliance's full reconciliation of its audit log.
    report.reconciliation = Some(closing_reconciliation(&[ports.addr], certs)?);
    Ok(report)
}

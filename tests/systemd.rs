//! custodyd under systemd's protocols, against a real appliance: the notify socket
//! (READY once it serves, WATCHDOG pings, STOPPING on SIGTERM) and the graceful stop under
//! load (every answered request committed, every other one refused or its connection
//! closed, exit 0 within `server.shutdown_timeout_s`).

mod common;

use common::{asset, runtime, BackgroundLoad, TestAppliance};
use custody::client::Client;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn sigterm(app: &TestAppliance) {
    let pid = app.pid().expect("running") as i32;
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// A test NOTIFY_SOCKET: the datagrams custodyd sends, with when they came.
struct NotifyListener {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl NotifyListener {
    fn new() -> NotifyListener {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifyListener {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next message, waiting at most `limit`.
    fn next(&self, limit: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one has a line containing `what` (that line), failing after `limit`.
    fn until_containing(&self, what: &str, limit: Duration, seen: &mut Vec<String>) -> String {
        let message = self.until_line(|l| l.contains(what), what, limit, seen);
        message
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_default()
            .to_owned()
    }

    /// Messages until one contains the line `what` (the message), failing after `limit`.
    fn until(&self, what: &str, limit: Duration, seen: &mut Vec<String>) -> String {
        self.until_line(|l| l == what, what, limit, seen)
    }

    fn until_line(
        &self,
        matches: impl Fn(&str) -> bool,
        what: &str,
        limit: Duration,
        seen: &mut Vec<String>,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what:?} within {limit:?}; saw {seen:?}"
            );
            if let Some(m) = self.next(left) {
                seen.push(m.clone());
                if m.lines().any(&matches) {
                    return m;
                }
            }
        }
    }
}

#[test]
fn ready_once_serving_watchdog_while_healthy_stopping_on_sigterm() {
    let notify = NotifyListener::new();
    let mut app = TestAppliance::prepare_with("");
    app.set_log("info", "text");
    app.set_env("NOTIFY_SOCKET", notify.path.to_str().unwrap());
    app.set_env("WATCHDOG_USEC", "1000000");
    // The moment READY arrives, the appliance must already answer: a HELLO sent then
    // succeeds at the first try.
    let client_config = app.client_config();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let ready = notify.until("READY=1", Duration::from_secs(30), &mut seen);
        let hello = runtime().block_on(async {
            let c = Client::connect(&client_config).await?;
            c.hello().await
        });
        (notify, ready, hello.is_ok(), seen)
    });
    app.launch();
    let (notify, ready, served_at_ready, seen) = watcher.join().unwrap();
    assert!(
        served_at_ready,
        "READY came before the appliance served; saw {seen:?}"
    );
    assert!(
        ready.contains("STATUS=serving on ") && ready.contains("2 shards"),
        "{ready}"
    );
    // Everything before READY was a status line.
    for m in &seen[..seen.len() - 1] {
        assert!(m.starts_with("STATUS="), "{m:?} before READY");
    }
    // Pings every quarter of WATCHDOG_USEC (at least every 500 ms) while every core is healthy.
    let mut seen = Vec::new();
    let started = Instant::now();
    for _ in 0..3 {
        notify.until("WATCHDOG=1", Duration::from_secs(3), &mut seen);
    }
    assert!(started.elapsed() < Duration::from_secs(3), "{seen:?}");
    // An idle connection (HELLO answered, nothing in flight): its blocked read wakes on
    // the drain, so it does not hold the stop.
    let rt = runtime();
    let _idle = rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.hello().await.unwrap();
        c
    });
    // SIGTERM: STOPPING, then exit 0 at once.
    let signalled = Instant::now();
    sigterm(&app);
    let stopping = notify.until("STOPPING=1", Duration::from_secs(5), &mut seen);
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    let status = app.wait_exit(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0), "{}", app.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "{:?}",
        signalled.elapsed()
    );
    assert!(
        app.log().contains("stopped: every connection answered"),
        "{}",
        app.log()
    );
}

#[test]
fn sigterm_under_load_answers_what_it_read_commits_it_and_exits_within_the_bound() {
    let mut app = TestAppliance::prepare_with("");
    app.set_log("info", "text");
    app.set_server("shutdown_timeout_s = 10\n");
    app.launch();
    let assets: Vec<uuid::Uuid> = (300..332).map(asset).collect();
    common::register_all(&app, &assets);
    // 4 connections × 16 pipelined lanes; each lane stops at its first closed connection,
    // and any error other than STORE_UNAVAILABLE or a closed connection fails the test.
    let load = BackgroundLoad::start(app.client_config(), assets.clone(), 4, 16);
    load.wait_for(2000, "load before SIGTERM");
    let signalled = Instant::now();
    sigterm(&app);
    let status = app.wait_exit(Duration::from_secs(15)).expect("exited");
    let took = signalled.elapsed();
    let outcome = load.finish();
    assert_eq!(status.code(), Some(0), "{}", app.log());
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    assert_eq!(outcome.unavailable, 0);
    assert_eq!(
        outcome.closed,
        4 * 16,
        "every lane saw its connection close"
    );
    let log = app.log();
    assert!(log.contains("stopped: every connection answered"), "{log}");
    // Every answered derivation is in the audit log with its counter, and every
    // derivation committed was answered: the replies written before the close reached
    // the client (no reset dropped them).
    let rows = common::assert_acknowledged_are_audited(&app.db_path(), &outcome.acknowledged);
    let derived = rows
        .iter()
        .filter(|r| r.event == custody::audit::AuditEvent::Derive)
        .count();
    assert_eq!(derived, outcome.acknowledged.len());
    // The appliance starts again on the same store.
    app.launch();
    runtime().block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        client.hello().await.unwrap();
    });
}

/// A connection still in its TLS handshake holds the drain (up to
/// `tls.handshake_timeout_ms`, 5 s by default): a raw TCP connection that never sends a
/// ClientHello is one, so the stop cannot finish on its own in time.
fn appliance_with_a_stalled_handshake(
    shutdown_timeout_s: u32,
) -> (TestAppliance, std::net::TcpStream) {
    let mut app = TestAppliance::prepare_with("");
    app.set_server(&format!("shutdown_timeout_s = {shutdown_timeout_s}\n"));
    app.launch();
    let idle = std::net::TcpStream::connect(app.addr).unwrap();
    // Let the core accept it.
    std::thread::sleep(Duration::from_millis(200));
    (app, idle)
}

#[test]
fn past_the_bound_the_stop_is_forced_with_status_1() {
    let (mut app, _idle) = appliance_with_a_stalled_handshake(1);
    let signalled = Instant::now();
    sigterm(&app);
    let status = app.wait_exit(Duration::from_secs(10)).expect("exited");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(1), "{}", app.log());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "forced after {took:?}"
    );
    let log = app.log();
    assert!(
        log.contains("forced stop") && log.contains("shutdown_timeout_s"),
        "{log}"
    );
}

#[test]
fn a_second_sigterm_forces_the_stop_at_once() {
    let (mut app, _idle) = appliance_with_a_stalled_handshake(60);
    sigterm(&app);
    std::thread::sleep(Duration::from_millis(300));
    assert!(app.is_running(), "the drain waits for the handshake");
    let second = Instant::now();
    sigterm(&app);
    let status = app.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{}", app.log());
    assert!(app.log().contains("a second SIGTERM"), "{}", app.log());
}

/// `systemd-analyze verify` on the unit as shipped (with this build's binary in place of
/// /usr/local/bin/custodyd, which verify requires to exist): no warning at all.
#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        common::missing("systemd-analyze", &"it is not installed (package systemd)");
        return;
    };
    assert!(version.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/custodyd.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    // With the credentials drop-in's [Service] lines added, as `systemctl edit` merges them.
    let dropin = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/credentials.conf"
    ))
    .unwrap();
    let credentials: String = dropin
        .lines()
        .filter(|l| l.starts_with("LoadCredential="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(credentials.lines().count(), 2, "{dropin}");
    let unit = unit.replace("[Install]", &format!("{credentials}\n[Install]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custodyd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/custodyd", env!("CARGO_BIN_EXE_custodyd")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about other units (the host's own) are not ours to fix.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("custodyd.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{text}");
}

/// `appliance/install.sh --root STAGE --no-system` lays out the binaries, the unit, the
/// configuration and the state directory with their modes; a second run keeps an edited
/// configuration; the installed reference configuration passes `custodyd check-config`
/// once TLS files are in place. As root with the services required (CI), it also runs
/// with the system steps (the user `custody`, ownership) into a staging root.
#[test]
fn install_sh_lays_out_the_appliance_and_keeps_an_edited_config() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/appliance/install.sh");
    let bins = std::path::Path::new(env!("CARGO_BIN_EXE_custodyd"))
        .parent()
        .unwrap()
        .to_owned();
    let custody_bin = bins.join("custody");
    if !custody_bin.exists() {
        // `cargo test` builds every binary of the package; this only guards a partial build.
        panic!("{} was not built", custody_bin.display());
    }
    let install = |stage: &std::path::Path, system: bool| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(script)
            .arg("--root")
            .arg(stage)
            .arg("--bin-from")
            .arg(&bins);
        if !system {
            cmd.arg("--no-system");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;

    let stage = tempfile::tempdir().unwrap();
    let s = stage.path();
    let said = install(s, false);
    assert!(said.contains("init ceremony"), "{said}");
    assert_eq!(mode(&s.join("usr/local/bin/custodyd")), 0o755);
    assert_eq!(mode(&s.join("usr/local/bin/custody")), 0o755);
    assert_eq!(mode(&s.join("etc/custody")), 0o750);
    assert_eq!(mode(&s.join("etc/custody/custody.toml")), 0o640);
    assert_eq!(mode(&s.join("var/lib/custody")), 0o700);
    assert_eq!(
        std::fs::read_to_string(s.join("etc/systemd/system/custodyd.service")).unwrap(),
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/custodyd.service"
        ))
        .unwrap()
    );
    for f in [
        "usr/share/custody/prometheus/alerts.yml",
        "usr/share/custody/grafana/custody.json",
        "usr/share/custody/audit_verify.py",
        "usr/share/custody/sql/postgres/0001_init.sql",
        "usr/share/doc/custody/operations.md",
    ] {
        assert!(s.join(f).is_file(), "{f} not installed");
    }

    // An operator's edit survives a reinstall; the reference goes beside it.
    let config = s.join("etc/custody/custody.toml");
    let edited = std::fs::read_to_string(&config).unwrap() + "\n# edited by the operator\n";
    std::fs::write(&config, &edited).unwrap();
    install(s, false);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(s.join("etc/custody/custody.toml.new").is_file());

    // The reference configuration, with TLS files where it names them, checks clean.
    let certs = custody::tls::write_dev_certs(&s.join("etc/custody"), "unused").unwrap();
    assert_eq!(certs.server_cert, s.join("etc/custody/server.pem"));
    let out = std::process::Command::new(s.join("usr/local/bin/custodyd"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && common::services_required() {
        let stage = tempfile::tempdir().unwrap();
        install(stage.path(), true);
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let user = passwd
            .lines()
            .find(|l| l.starts_with("custody:"))
            .expect("the user custody was made");
        assert!(user.ends_with(":/usr/sbin/nologin"), "{user}");
        let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
        let state = std::fs::metadata(stage.path().join("var/lib/custody")).unwrap();
        assert_eq!((state.uid(), state.mode() & 0o7777), (uid, 0o700));
        let etc = std::fs::metadata(stage.path().join("etc/custody")).unwrap();
        assert_eq!((etc.uid(), etc.mode() & 0o7777), (0, 0o750));
    } else {
        eprintln!("the system steps (user, ownership) run only as root in CI");
    }
}

/// A SIGTERM while the start waits on a store that does not answer (here: a server that
/// accepts the connection and says nothing) stops the process at once with status 0,
/// instead of after the start gives up: nothing was served, nothing acknowledged.
#[test]
fn sigterm_during_a_stuck_start_up_exits_at_once() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Accept and hold the connections, never answering.
        let mut open = Vec::new();
        for stream in silent.incoming().take(4) {
            match stream {
                Ok(s) => open.push(s),
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_secs(30));
        drop(open);
    });
    let mut app = TestAppliance::prepare_with(&format!(
        "[store]\nbackend = \"postgres\"\npostgres_host = \"127.0.0.1\"\npostgres_port = {port}\npostgres_user = \"nobody\"\npostgres_dbname = \"nothing\"\n"
    ));
    app.set_log("info", "text");
    app.spawn_only();
    // The start is stuck on the store: still running well after a start takes.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        app.is_running(),
        "the start did not wait on the store:\n{}",
        app.log()
    );
    let sent = Instant::now();
    sigterm(&app);
    let status = app
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM:\n{}", app.log()));
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", app.log());
    assert!(
        app.log().contains("stopped during start-up"),
        "{}",
        app.log()
    );
    drop(held);
}

/// The status line follows the seal state while serving: an operator's seal shows in
/// `systemctl status` within a few seconds.
#[test]
fn the_status_line_follows_the_seal_state() {
    let notify = NotifyListener::new();
    let mut app = TestAppliance::prepare_with(&format!(
        "[policy]\n{}admins = [\"test-client\"]\n",
        common::TEST_ROLES
    ));
    app.set_env("NOTIFY_SOCKET", notify.path.to_str().unwrap());
    app.launch();
    let mut seen = Vec::new();
    let ready = notify.until("READY=1", Duration::from_secs(30), &mut seen);
    assert!(!ready.contains("sealed"), "{ready}");
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    rt.block_on(c.seal()).unwrap();
    let status =
        notify.until_containing("sealed by an operator", Duration::from_secs(10), &mut seen);
    assert!(status.starts_with("STATUS=serving on "), "{status}");
}

/// A clean stop on PostgreSQL gives the store up: the next start (a restart, an upgrade)
/// takes it at once, not after the lease (30 s here) lapses.
#[test]
fn a_clean_stop_releases_the_postgres_store_for_an_immediate_restart() {
    let Some(db) = common::PgDatabase::create("release") else {
        return;
    };
    let store = db.store_section().replace(
        "postgres_owner_lease_ms = 1000",
        "postgres_owner_lease_ms = 30000",
    );
    assert!(store.contains("30000"), "{store}");
    let mut app = TestAppliance::prepare_with(&store);
    app.set_log("info", "text");
    assert!(app.custodyd(&["migrate"]).status.success());
    app.launch();
    sigterm(&app);
    let status = app.wait_exit(Duration::from_secs(10)).expect("stopped");
    assert_eq!(status.code(), Some(0), "{}", app.log());
    assert!(app.log().contains("released the store"), "{}", app.log());
    let started = Instant::now();
    app.launch();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the restart waited {:?} (the lease is 30 s)",
        started.elapsed()
    );
}

/// A SIGTERM at any moment of the start (before the unseal, while the cores start, just
/// after they serve) ends the process cleanly (status 0, or the signal's default action
/// in the first moments after exec) within the bound: the start-up exit and the drain
/// never race into a hang or a failure status.
#[test]
fn sigterm_at_any_moment_of_the_start_exits_0() {
    for delay_ms in [0u64, 5, 10, 20, 30, 45, 60, 80, 120, 200] {
        let mut app = TestAppliance::prepare_with("");
        app.set_log("info", "text");
        app.spawn_only();
        std::thread::sleep(Duration::from_millis(delay_ms));
        sigterm(&app);
        let status = app.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "still running 10 s after a SIGTERM at {delay_ms} ms:\n{}",
                app.log()
            )
        });
        // Before custodyd blocks the signal (the first moments after exec) the default
        // action ends it, which systemd also counts as a clean stop.
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
            "SIGTERM at {delay_ms} ms: {status}\n{}",
            app.log()
        );
    }
}

//! Start-up checks: a host or TLS files the appliance cannot run with stop the start at
//! once with exit status 2 (systemd does not restart into it) and a message that names
//! what is wrong and the fix: an expired certificate, a key that is not the certificate's,
//! RLIMIT_MEMLOCK too low (with the LimitMEMLOCK= line), fewer CPUs than server.cores.

mod common;

use common::TestAppliance;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `custodyd run` on `app`'s config, with `before_exec` applied in the child, and
/// expects it to exit by itself within 30 s: its exit code and stderr.
fn start_expecting_exit(
    app: &TestAppliance,
    before_exec: fn() -> std::io::Result<()>,
) -> (i32, String) {
    let log = app.dir.path().join("startup.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_custodyd"));
    cmd.arg("run")
        .arg("--config")
        .arg(app.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: the closures only make async-signal-safe system calls (setrlimit,
    // sched_setaffinity).
    unsafe { cmd.pre_exec(before_exec) };
    let mut child = common::KillOnDrop(cmd.spawn().expect("spawn custodyd"));
    let status = common::eventually(Duration::from_secs(30), || {
        child.0.try_wait().unwrap().ok_or_else(|| {
            format!(
                "custodyd kept running:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    });
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

fn nothing() -> std::io::Result<()> {
    Ok(())
}

/// Writes a self-signed certificate valid only from `from` to `until` (years, January
/// 1st) as the appliance's server certificate, with its key.
fn install_server_cert(app: &TestAppliance, from: i32, until: i32) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(app.certs().join("server.pem"), cert.pem()).unwrap();
    std::fs::write(app.certs().join("server.key"), key.serialize_pem()).unwrap();
}

#[test]
fn an_expired_or_not_yet_valid_certificate_stops_the_start_with_the_file_and_dates() {
    let app = TestAppliance::prepare_with("");
    install_server_cert(&app, 2020, 2021);
    let (code, log) = start_expecting_exit(&app, nothing);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("server.pem") && log.contains("has expired"),
        "{log}"
    );
    assert!(log.contains("2021"), "the expiry date is named: {log}");

    install_server_cert(&app, 2098, 2099);
    let (code, log) = start_expecting_exit(&app, nothing);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("is not valid yet"), "{log}");
}

#[test]
fn a_key_that_is_not_the_certificates_stops_the_start() {
    let app = TestAppliance::prepare_with("");
    std::fs::copy(
        app.certs().join("client.key"),
        app.certs().join("server.key"),
    )
    .unwrap();
    let (code, log) = start_expecting_exit(&app, nothing);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("is not the private key of the certificate"),
        "{log}"
    );
    // check-config (systemd's ExecStartPre) finds it too, before the start.
    let out = app.custodyd(&["check-config"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("is not the private key"), "{said}");
}

fn memlock_64k() -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: 64 * 1024,
        rlim_max: 64 * 1024,
    };
    // SAFETY: setrlimit on this (child) process with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_low_memlock_limit_stops_the_start_with_the_value_needed_and_the_systemd_line() {
    let app = TestAppliance::prepare_with("");
    let (code, log) = start_expecting_exit(&app, memlock_64k);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("RLIMIT_MEMLOCK is 65536 bytes"), "{log}");
    assert!(log.contains("LimitMEMLOCK="), "{log}");
    assert!(log.contains("ulimit -l"), "{log}");
}

fn one_cpu() -> std::io::Result<()> {
    // SAFETY: the mask is read, reduced to its first CPU and set on this (child) process
    // before it execs custodyd; zeroed cpu_set_t values are empty sets.
    unsafe {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let mut now: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut now) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &now))
            .ok_or_else(|| std::io::Error::other("no CPU in the mask"))?;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(first, &mut set);
        if libc::sched_setaffinity(0, size, &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn fewer_cpus_than_configured_cores_stops_the_start_with_the_fix() {
    // The test config asks for 2 cores; the process may use only one CPU.
    let app = TestAppliance::prepare_with("");
    let (code, log) = start_expecting_exit(&app, one_cpu);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("server.cores is 2 but this process may run on only 1 CPU(s) ("),
        "{log}"
    );
    assert!(log.contains("CPUAffinity="), "{log}");
}

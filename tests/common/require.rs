//! Tests that need something outside the build: PostgreSQL, OpenSSL 3, SoftHSM2 and
//! pkcs11-tool, promtool, python3 with pytest, sqlite3, systemd-analyze, pg_ctlcluster.
//! One rule for all of them, in one place:
//!
//! - `CUSTODY_REQUIRE_SERVICES=1` (what `.ci/run` sets): every such thing is required, and a
//!   test that cannot have it fails, naming what is missing;
//! - unset, or any other value: a test that cannot have it passes without running, after a
//!   notice on the process's stderr, which cargo's output capture does not hide.

use std::io::Write;

/// The variable, and the one value of it that makes every service required.
pub const REQUIRE_SERVICES_VAR: &str = "CUSTODY_REQUIRE_SERVICES";

/// Whether every external service is required (`CUSTODY_REQUIRE_SERVICES=1`).
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES_VAR).as_deref() == Ok("1")
}

/// `service` cannot be had, because `why`: a panic when services are required, otherwise
/// the notice.
pub fn missing(service: &str, why: &dyn std::fmt::Display) {
    if services_required() {
        panic!("{service} is required ({REQUIRE_SERVICES_VAR}=1) but {why}");
    }
    // Written to the process's stderr directly: the test harness captures `eprintln!` of
    // a passing test, and a skip that nobody sees is how a check silently stops running.
    let _ = writeln!(
        std::io::stderr().lock(),
        "notice: skipping a test that needs {service}: {why} (set {REQUIRE_SERVICES_VAR}=1 to make this fail)"
    );
}

/// Whether `program` runs (`program ARGS` exits, whatever its status): `Err` says why not.
pub fn runs(program: &str, args: &[&str]) -> Result<(), String> {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|_| ())
        .map_err(|e| format!("`{program}` cannot run: {e}"))
}

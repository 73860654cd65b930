//! The binaries as an operator runs them: `custodyd check-config` and the `custody` CLI
//! against a running appliance, in text and JSON.

mod common;

use common::{asset, TestAppliance};
use std::process::Command;

fn custody(app: &TestAppliance, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_custody"))
        .arg("--addr")
        .arg(app.addr.to_string())
        .arg("--certs")
        .arg(app.certs())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reports_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"nowhere\"\ncores = 99999\n[tls]\ncert = \"a.pem\"\n[limits]\nmax_inflight_per_connection = 0\nmax_frames = 3\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_custodyd"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "server.listen",
        "server.cores",
        "tls.key",
        "tls.client_ca",
        "limits.max_inflight_per_connection",
        "limits.max_frames",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    // The reference config checks clean once the TLS files it names are beside it (it
    // checks the files too: they are read as the start would read them).
    let etc = tempfile::tempdir().unwrap();
    let reference = etc.path().join("custody.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/appliance/custody.toml"),
        &reference,
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_custodyd"))
            .arg("check-config")
            .arg(&reference)
            .output()
            .unwrap()
    };
    let missing = check();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("server.pem"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    custody::tls::write_dev_certs(etc.path(), "unused").unwrap();
    let good = check();
    let said = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success() && said.contains("certificate \"CN=custody\" until"),
        "{said}{}",
        String::from_utf8_lossy(&good.stderr)
    );
}

#[test]
fn cli_register_derive_status_in_text_and_json() {
    let app = TestAppliance::start();
    let a = asset(77).to_string();
    let (code, out, err) = custody(&app, &["register", &a]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state ACTIVE counter 0"), "{out}");

    let (code, out, err) = custody(
        &app,
        &["derive", &a, "--path", "m/44'/0'/0'/0'/7", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["counter"], 0);
    assert_eq!(v["key_hex"].as_str().unwrap().len(), 64);
    assert!(v["receipt"]["seq"].as_u64().unwrap() >= 1);

    let (code, out, _) = custody(&app, &["status", &a, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "ACTIVE");

    // A refusal: exit code 3, typed status in JSON.
    let (code, out, _) = custody(
        &app,
        &["derive", &a, "--path", "m/44'/0'/0'/0'/7'", "--json"],
    );
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "INVALID_PATH");
    assert_eq!(v["status"], 11);

    let (code, out, _) = custody(&app, &["hello", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shard_count"], 2);
}

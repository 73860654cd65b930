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

#[test]
fn register_from_a_file_reports_each_line_and_changes_nothing_for_an_invalid_one() {
    let app = TestAppliance::start();
    let existing = asset(9_001);
    assert_eq!(custody(&app, &["register", &existing.to_string()]).0, 0);
    let fresh: Vec<uuid::Uuid> = (0..300).map(|n| asset(9_100 + n)).collect();
    let mut text =
        format!("# an import\n{existing}\n\nnot-a-uuid\n00000000-0000-0000-0000-000000000000\n");
    for a in &fresh {
        text.push_str(&format!("{a}\n"));
    }
    text.push_str(&format!("{}\n", fresh[0]));
    let file = app.dir.path().join("assets.txt");
    std::fs::write(&file, &text).unwrap();

    let (code, out, err) = custody(
        &app,
        &["register", "--file", file.to_str().unwrap(), "--json"],
    );
    assert_eq!(code, 1, "invalid lines make the exit status 1: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["summary"];
    assert_eq!(
        (
            s["registered"].as_u64(),
            s["exists"].as_u64(),
            s["invalid"].as_u64(),
            s["repeated"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(300), Some(1), Some(2), Some(1), Some(0)),
        "{out}"
    );
    let lines = v["lines"].as_array().unwrap();
    assert_eq!(lines[0]["line"], 2);
    assert_eq!(lines[0]["outcome"], "exists");
    assert_eq!(lines[1]["outcome"], "invalid");
    assert_eq!(lines[2]["status"], "INVALID_ASSET_ID");
    // Every valid new line is registered, at counter 0.
    for a in &fresh {
        let (code, st, _) = custody(&app, &["status", &a.to_string(), "--json"]);
        let st: serde_json::Value = serde_json::from_str(&st).unwrap();
        assert_eq!(
            (code, &st["counter"]),
            (0, &serde_json::json!(0)),
            "{a}: {st}"
        );
    }
    // The invalid ones changed nothing: the same file again registers nothing new.
    let (code, out, _) = custody(&app, &["register", "--file", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.ends_with("0 registered, 301 existed, 2 invalid, 1 repeated, 0 failed\n"),
        "{out}"
    );
}

#[test]
fn assets_are_listed_page_by_page_and_by_the_cli() {
    let app = TestAppliance::start();
    common::check_asset_listing(&app, 9_500, 40);
    let (code, out, err) = custody(&app, &["assets", "--page-size", "9", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 40);
    let (code, out, _) = custody(&app, &["assets", "--state", "suspended"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(" SUSPENDED ") && out.ends_with("1 assets\n"),
        "{out}"
    );
    let (code, _, err) = custody(&app, &["assets", "--state", "sleeping"]);
    assert_ne!(code, 0);
    assert!(err.contains("--state"), "{err}");
}

//! The `pkcs11` seal provider against a real SoftHSM2 token: provisioning with the stock
//! tools (`appliance/softhsm2-provision.sh`), `custody init`, start, derive, restart and
//! derive the same key; an imported seed derives what OpenSSL's KBKDF derives; a wrong
//! PIN, a wrong token or key label, a wrong module and a tampered sealed file each stop
//! the start with a clear message.
//!
//! Every PKCS#11 call happens in a custodyd or custody process (initialisation is
//! process-global), each test with its own `SOFTHSM2_CONF` and token directory. Without
//! SoftHSM2 the tests print a notice and pass, unless `CUSTODY_REQUIRE_SERVICES=1`.

mod common;

use common::openssl::{hex, openssl_kbkdf, openssl_or_skip, spec_context};
use common::{asset, derive_body, runtime, TestAppliance};
use custody::client::Client;
use custody::kdf::{DerivationPath, PATH_DEPTH};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token of the test's own, provisioned by the shipped script.
struct SoftHsm {
    dir: tempfile::TempDir,
}

impl SoftHsm {
    fn new() -> Option<SoftHsm> {
        let have = Path::new(MODULE).exists()
            && Command::new("softhsm2-util")
                .arg("--version")
                .output()
                .is_ok()
            && Command::new("pkcs11-tool")
                .arg("--version")
                .output()
                .is_ok();
        if !have {
            common::missing(
                "SoftHSM2 and pkcs11-tool",
                &format!("{MODULE}, softhsm2-util or pkcs11-tool is missing"),
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("custody-hsm-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm { dir };
        let out = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/appliance/softhsm2-provision.sh"
            ))
            .arg("--pin-file")
            .arg(hsm.pin_file())
            .env("SOFTHSM2_CONF", hsm.conf())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "provisioning: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(hsm)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    /// An appliance whose `[seal]` section is the pkcs11 provider on this token, with
    /// `overrides` (whole `key = value` lines) replacing the defaults.
    fn appliance(&self, overrides: &str) -> TestAppliance {
        let mut app = TestAppliance::prepare_with(&self.seal_section(overrides));
        app.set_env("SOFTHSM2_CONF", &self.conf().display().to_string());
        app
    }

    fn seal_section(&self, overrides: &str) -> String {
        let mut lines = vec![
            ("provider", "\"pkcs11\"".to_owned()),
            ("pkcs11_module", format!("\"{MODULE}\"")),
            ("pkcs11_token_label", "\"custody\"".to_owned()),
            ("pkcs11_key_label", "\"custody-seed-wrap\"".to_owned()),
            (
                "pkcs11_pin_file",
                format!("\"{}\"", self.pin_file().display()),
            ),
        ];
        let mut extra = Vec::new();
        for line in overrides.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').expect("key = value");
            let k = k.trim();
            match lines.iter_mut().find(|(name, _)| *name == k) {
                Some(entry) => entry.1 = v.trim().to_owned(),
                None => extra.push(format!("{k} = {}\n", v.trim())),
            }
        }
        let mut text = "[seal]\n".to_owned();
        for (k, v) in lines {
            text.push_str(&format!("{k} = {v}\n"));
        }
        text.extend(extra);
        text
    }
}

/// `custody init` with the shares written one per file to `<state>/shares` (made new for
/// each init, so a second init of the same appliance is refused by the sealed file alone).
fn init(app: &TestAppliance, extra: &[&str]) -> std::process::Output {
    let config = app.config_path().display().to_string();
    let shares = app.dir.path().join("shares");
    let _ = std::fs::remove_dir_all(&shares);
    std::fs::create_dir(&shares).unwrap();
    let shares = shares.display().to_string();
    let mut args = vec![
        "init",
        "--config",
        config.as_str(),
        "--share-dir",
        shares.as_str(),
    ];
    args.extend_from_slice(extra);
    app.custody(&args)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Registers `a` (if new) and derives at `path`: (counter, key).
fn derive(app: &TestAppliance, a: uuid::Uuid, path: &str) -> (u64, [u8; 32]) {
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let _ = c.register(a).await;
        let d = c.derive(derive_body(a, path)).await.unwrap();
        (d.counter, *d.key)
    })
}

#[test]
fn init_start_derive_restart_derives_the_same_key() {
    let Some(hsm) = SoftHsm::new() else { return };
    let mut app = hsm.appliance("");
    let out = init(&app, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("fingerprint"), "{said}");
    let sealed = app.dir.path().join("sealed-seed.json");
    let mode = std::fs::metadata(&sealed).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let blob: serde_json::Value = serde_json::from_slice(&std::fs::read(&sealed).unwrap()).unwrap();
    assert!(said.contains(blob["fingerprint"].as_str().unwrap()));
    // A second init never replaces the sealed seed.
    let again = init(&app, &[]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );

    app.launch();
    let a = asset(4242);
    let first = derive(&app, a, "m/44'/0'/0'/0'/9");
    app.kill9();
    app.launch();
    let second = derive(&app, a, "m/44'/0'/0'/0'/9");
    assert_eq!(first, second, "the same seed after a restart");
    // Nothing of the seed reaches the log or the sealed file in the clear.
    assert!(!app.log().contains(&hex(&first.1)));
}

#[test]
fn an_imported_seed_derives_what_openssl_derives() {
    let Some(hsm) = SoftHsm::new() else { return };
    let Some(openssl) = openssl_or_skip("imported seed against OpenSSL") else {
        return;
    };
    let mut app = hsm.appliance("");
    let seed: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let seed_file = app.dir.path().join("import.hex");
    std::fs::write(&seed_file, format!("{}\n", hex(&seed))).unwrap();
    // A seed file others can read is refused.
    std::fs::set_permissions(&seed_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = init(&app, &["--import-seed", seed_file.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("chmod 600"), "{}", text(&refused));
    std::fs::set_permissions(&seed_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = init(&app, &["--import-seed", seed_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("imported"));

    app.launch();
    let a = asset(777);
    let path = "m/44'/60'/1'/2'/3";
    let (counter, key) = derive(&app, a, path);
    let parsed = DerivationPath::parse(path).unwrap();
    let indices: [u32; PATH_DEPTH] = *parsed.indices();
    let expected = openssl_kbkdf(
        &openssl,
        &seed,
        &spec_context(a.as_bytes(), counter, &indices),
    );
    assert_eq!(hex(&key), hex(&expected), "custody and OpenSSL agree");
}

#[test]
fn bad_pin_labels_module_and_tampering_each_stop_the_start_with_a_clear_message() {
    let Some(hsm) = SoftHsm::new() else { return };
    let mut app = hsm.appliance("");
    let out = init(&app, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let sealed = app.dir.path().join("sealed-seed.json");
    let original = std::fs::read_to_string(&sealed).unwrap();

    let wrong_pin = app.dir.path().join("wrong.pin");
    std::fs::write(&wrong_pin, "000000\n").unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("pkcs11_pin_file = \"{}\"", wrong_pin.display()),
            "refused the PIN",
        ),
        (
            "pkcs11_token_label = \"no-such-token\"".into(),
            "no token labelled \"no-such-token\"",
        ),
        (
            "pkcs11_key_label = \"no-such-key\"".into(),
            "no secret key labelled \"no-such-key\"",
        ),
        (
            "pkcs11_module = \"/nonexistent/libpkcs11.so\"".into(),
            "cannot load the PKCS#11 module /nonexistent/libpkcs11.so",
        ),
    ];
    for (override_line, expected) in &cases {
        app.reconfigure(&hsm.seal_section(override_line));
        let out = app.custodyd(&["run"]);
        assert!(!out.status.success(), "{override_line}: started");
        let said = text(&out);
        assert!(said.contains(expected), "{override_line}: {said}");
        assert!(
            !said.contains("custodyd serving"),
            "{override_line}: {said}"
        );
    }

    // The right settings again, but the sealed file altered.
    app.reconfigure(&hsm.seal_section(""));
    let blob: serde_json::Value = serde_json::from_str(&original).unwrap();
    let tamper = |field: &str| {
        let mut b = blob.clone();
        let v = b[field].as_str().unwrap().to_owned();
        let flipped = if v.starts_with('0') { "1" } else { "0" };
        b[field] = serde_json::Value::String(format!("{flipped}{}", &v[1..]));
        b
    };
    for (altered, expected) in [
        (tamper("ciphertext"), "does not open"),
        (tamper("iv"), "does not open"),
        (tamper("fingerprint"), "fingerprint"),
        (
            {
                let mut b = blob.clone();
                b["version"] = serde_json::json!(2);
                b
            },
            "does not open",
        ),
    ] {
        std::fs::write(&sealed, serde_json::to_string(&altered).unwrap()).unwrap();
        let out = app.custodyd(&["run"]);
        assert!(!out.status.success(), "started with {altered}");
        assert!(text(&out).contains(expected), "{}", text(&out));
    }
    std::fs::write(&sealed, &original).unwrap();
    app.launch();
    derive(&app, asset(1), "m/44'/0'/0'/0'/0");
}

/// Derives once; `Err(status)` on a refusal.
fn try_derive(
    app: &TestAppliance,
    a: uuid::Uuid,
    path: &str,
) -> Result<[u8; 32], custody::wire::Status> {
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.derive(derive_body(a, path))
            .await
            .map(|d| *d.key)
            .map_err(|e| e.status().expect("a refusal, not a transport error"))
    })
}

#[test]
fn an_unreachable_hsm_serves_stale_then_seals_then_recovers_by_itself() {
    let Some(hsm) = SoftHsm::new() else { return };
    let timing = "cache_ttl_s = 1\nmax_stale_s = 1\nhsm_timeout_ms = 2000\nbreaker_failures = 1\nbreaker_open_ms = 100\n";
    let mut app = hsm.appliance(timing);
    assert!(init(&app, &[]).status.success());
    app.launch();
    let a = asset(31337);
    let (_, key) = derive(&app, a, "m/44'/0'/0'/0'/1");

    // The HSM becomes unusable to the appliance: its PIN is gone.
    let hidden = hsm.pin_file().with_extension("away");
    std::fs::rename(hsm.pin_file(), &hidden).unwrap();
    let started = std::time::Instant::now();
    let mut served_after_outage = 0;
    let sealed_at = loop {
        match try_derive(&app, a, "m/44'/0'/0'/0'/1") {
            Ok(k) => {
                assert_eq!(k, key, "the cached key keeps serving");
                served_after_outage += 1;
            }
            Err(status) => {
                assert_eq!(status, custody::wire::Status::Sealed);
                break started.elapsed();
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "never sealed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        served_after_outage > 0,
        "served while within TTL + max_stale"
    );
    // Sealed after the TTL (1 s) and max_stale (1 s), not before the TTL.
    assert!(
        sealed_at >= std::time::Duration::from_millis(900),
        "sealed after {sealed_at:?}"
    );

    // The HSM comes back: service returns by itself, with the same key.
    std::fs::rename(&hidden, hsm.pin_file()).unwrap();
    let back = std::time::Instant::now();
    loop {
        if let Ok(k) = try_derive(&app, a, "m/44'/0'/0'/0'/1") {
            assert_eq!(k, key);
            break;
        }
        assert!(
            back.elapsed() < std::time::Duration::from_secs(20),
            "never recovered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(app.is_running());
}

#[test]
fn a_sealed_file_swapped_while_running_is_refused_not_served() {
    let Some(hsm) = SoftHsm::new() else { return };
    let timing = "cache_ttl_s = 1\nmax_stale_s = 1\nbreaker_failures = 1\nbreaker_open_ms = 100\n";
    let mut app = hsm.appliance(timing);
    assert!(init(&app, &[]).status.success());
    // Another seed, sealed by the same key on the same token, beside it.
    app.reconfigure(&hsm.seal_section(&format!("{timing}sealed_seed_file = \"other.json\"\n")));
    assert!(init(&app, &[]).status.success());
    app.reconfigure(&hsm.seal_section(timing));
    app.launch();
    let a = asset(2024);
    let (_, key) = derive(&app, a, "m/44'/0'/0'/0'/5");

    let dir = app.dir.path().to_owned();
    std::fs::rename(dir.join("other.json"), dir.join("sealed-seed.json")).unwrap();
    let started = std::time::Instant::now();
    loop {
        match try_derive(&app, a, "m/44'/0'/0'/0'/5") {
            Ok(k) => assert_eq!(k, key, "never the swapped-in seed's key"),
            Err(status) => {
                assert_eq!(status, custody::wire::Status::Sealed);
                break;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "never sealed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        app.log().contains("refusing to switch seeds"),
        "{}",
        app.log()
    );
}

#[test]
fn operators_seal_and_unseal_over_the_wire_and_the_init_shares_recover_the_seed() {
    let Some(hsm) = SoftHsm::new() else { return };
    let mut app = TestAppliance::prepare_with(&format!(
        "{}\n[policy]\n{}admins = [\"test-client\"]\n",
        hsm.seal_section(""),
        common::TEST_ROLES
    ));
    app.set_env("SOFTHSM2_CONF", &hsm.conf().display().to_string());
    let out = init(&app, &["--threshold", "2", "--shares", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("split into 3 shares, any 2 of which"),
        "{}",
        text(&out)
    );
    app.launch();
    let a = asset(2718);
    let path = "m/44'/0'/0'/0'/4";
    let (counter, key) = derive(&app, a, path);
    let (certs, addr) = (app.certs().display().to_string(), app.addr.to_string());
    let cli = |args: &[&str]| {
        let mut all = vec!["--addr", addr.as_str(), "--certs", certs.as_str()];
        all.extend_from_slice(args);
        app.custody(&all)
    };
    let out = cli(&["seal-status"]);
    assert!(
        text(&out).contains("seal state UNSEALED (provider pkcs11)"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("provider calls ok 1"), "{}", text(&out));

    let out = cli(&["seal"]);
    assert!(text(&out).contains("SEALED_BY_OPERATOR"), "{}", text(&out));
    // Every core drops its key: eight derivations in a row answer SEALED.
    common::eventually_in_a_row(std::time::Duration::from_secs(2), 8, || {
        match try_derive(&app, a, path) {
            Err(custody::wire::Status::Sealed) => Ok(()),
            other => Err(format!("{other:?} after SEAL")),
        }
    });
    // A share is refused by an HSM appliance; a plain unseal asks the HSM again.
    let share = app.dir.path().join("shares").join("share-1.txt");
    let out = cli(&["unseal", "--share-file", share.to_str().unwrap()]);
    assert!(text(&out).contains("SHARE_INVALID"), "{}", text(&out));
    let out = cli(&["unseal"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("seal state UNSEALED"), "{}", text(&out));
    assert_eq!(try_derive(&app, a, path), Ok(key));

    // With the HSM gone, two of the shares rebuild the seed and derive the same key.
    app.kill9();
    let config = app.config_path().display().to_string();
    let shares = app.dir.path().join("shares");
    let (c, a_text) = (counter.to_string(), a.to_string());
    let out = app.custody(&[
        "recover",
        "--share",
        shares.join("share-3.txt").to_str().unwrap(),
        "--share",
        shares.join("share-2.txt").to_str().unwrap(),
        "--config",
        &config,
        "--asset",
        &a_text,
        "--path",
        path,
        "--counter",
        &c,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("matches the appliance's seed"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("key          {}", hex(&key))),
        "{}",
        text(&out)
    );
}

/// No seed, derived key, unseal share or PIN reaches a log line at any level: the
/// appliance runs at trace, in text and in JSON, through init with an imported seed,
/// start (the HSM unwraps the seed with the PIN), registrations, derivations, a refused
/// request and a shutdown; the log is searched for every secret in hex (either case),
/// base64 and as a list of byte values. The log must hold the request lines (a line per
/// answer, with the connection and request ids), or the search would prove nothing.
#[test]
fn no_secret_reaches_a_log_line_at_any_level() {
    let Some(hsm) = SoftHsm::new() else { return };
    let pin = std::fs::read_to_string(hsm.pin_file()).unwrap();
    let pin = pin.trim().to_owned();
    assert!(pin.len() >= 8, "a PIN this short could match by chance");
    for (i, format) in ["text", "json"].into_iter().enumerate() {
        let mut app = hsm.appliance("");
        app.set_log("trace", format);
        let seed: [u8; 32] =
            std::array::from_fn(|k| (k as u8).wrapping_mul(73).wrapping_add(29 + i as u8));
        let seed_file = app.dir.path().join("import.hex");
        std::fs::write(&seed_file, format!("{}\n", hex(&seed))).unwrap();
        std::fs::set_permissions(&seed_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = init(&app, &["--import-seed", seed_file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        app.launch();
        let mut keys = Vec::new();
        for n in 0..6u64 {
            let (_, key) = derive(&app, asset(900 + n), &format!("m/44'/0'/0'/0'/{n}"));
            keys.push(key);
        }
        // A refused request (a region not configured) logs its own lines.
        let refused = runtime().block_on(async {
            let c = Client::connect(&app.client_config()).await.unwrap();
            let mut body = derive_body(asset(900), "m/44'/0'/0'/0'/1");
            body.region = "MARS-1".into();
            c.derive(body).await
        });
        assert!(refused.is_err());
        // SIGTERM: the shutdown path logs too.
        // SAFETY: kill only sends a signal to the appliance's own child process.
        unsafe { libc::kill(app.pid().unwrap() as libc::pid_t, libc::SIGTERM) };
        app.wait_exit(std::time::Duration::from_secs(10));
        let log = app.log();

        // The log is the one asked for: request lines with their ids.
        assert!(
            log.contains("answered"),
            "{format}: no answer lines:\n{log}"
        );
        assert!(
            log.contains("request_id"),
            "{format}: no request ids:\n{log}"
        );
        assert!(log.contains("conn"), "{format}: no connection ids:\n{log}");
        if format == "json" {
            let line = log.lines().find(|l| l.contains("answered")).unwrap();
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
            assert_eq!(v["fields"]["message"], "answered", "{line}");
            assert!(v["fields"]["request_id"].is_u64(), "{line}");
        }

        let mut secrets: Vec<(String, Vec<u8>)> = vec![("seed".into(), seed.to_vec())];
        for (k, key) in keys.iter().enumerate() {
            secrets.push((format!("derived key {k}"), key.to_vec()));
        }
        let mut needles: Vec<(String, String)> = vec![("PIN".into(), pin.clone())];
        for (what, bytes) in &secrets {
            needles.push((format!("{what} (hex)"), hex(bytes)));
            needles.push((format!("{what} (HEX)"), hex(bytes).to_uppercase()));
            needles.push((format!("{what} (base64)"), base64(bytes)));
            // Debug of a byte array: the first eight values are enough to find it.
            let list: Vec<String> = bytes[..8].iter().map(|b| b.to_string()).collect();
            needles.push((format!("{what} (bytes)"), list.join(", ")));
            // Half the key in hex still gives most of it away.
            needles.push((format!("{what} (half, hex)"), hex(&bytes[..16])));
        }
        for share in std::fs::read_dir(app.dir.path().join("shares")).unwrap() {
            let text = std::fs::read_to_string(share.unwrap().path()).unwrap();
            for line in text.lines().filter(|l| l.len() >= 16) {
                needles.push(("an unseal share".into(), line.trim().to_owned()));
                // custody-share/1:<seed id>:<k>:<n>:<64 hex>:<check>: the value alone.
                if let Some(value) = line.split(':').find(|p| p.len() == 64) {
                    needles.push(("an unseal share's value".into(), value.to_owned()));
                }
            }
        }
        assert!(
            needles.iter().any(|(w, _)| w == "an unseal share's value"),
            "the share files hold no share value to search for"
        );
        for (what, needle) in &needles {
            assert!(
                !log.contains(needle.as_str()),
                "{format}: the {what} is in the log"
            );
        }
    }
}

/// Standard base64 with padding (RFC 4648), for the log search.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_rfc_vectors() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes()), want);
    }
}

//! The `shamir` seal provider over real TLS sockets: `custody init` writes k-of-n shares,
//! the appliance starts sealed, operators submit shares with `custody unseal` (progress
//! reported, bad / repeated / forged shares refused with their own statuses), it derives
//! once k are in, `custody seal` seals it again, and `custody recover` rebuilds the seed
//! offline and derives the key the appliance derived, which OpenSSL's KBKDF confirms.

mod common;

use common::openssl::{hex, openssl_kbkdf, openssl_or_skip, spec_context};
use common::{asset, derive_body, runtime, TestAppliance};
use custody::client::{Client, ClientError};
use custody::kdf::{DerivationPath, PATH_DEPTH};
use custody::seal::shamir::{read_share_file, Share};
use custody::wire::{SealStateCode, Status};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn shamir_appliance(admins: &str) -> TestAppliance {
    TestAppliance::prepare_with(&format!(
        "[seal]\nprovider = \"shamir\"\n\n[policy]\n{}admins = {admins}\n",
        common::TEST_ROLES
    ))
}

/// `custody init` 3-of-5 into `<state>/shares`; the share files.
fn init(app: &TestAppliance, k: &str, n: &str) -> Vec<PathBuf> {
    let dir = app.dir.path().join("shares");
    std::fs::create_dir(&dir).unwrap();
    let config = app.config_path().display().to_string();
    let out = app.custody(&[
        "init",
        "--config",
        &config,
        "--share-dir",
        dir.to_str().unwrap(),
        "--threshold",
        k,
        "--shares",
        n,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn cli(app: &TestAppliance, args: &[&str]) -> Output {
    let certs = app.certs().display().to_string();
    let addr = app.addr.to_string();
    let mut all = vec!["--addr", addr.as_str(), "--certs", certs.as_str()];
    all.extend_from_slice(args);
    app.custody(&all)
}

fn refused_status(e: ClientError) -> Status {
    match e {
        ClientError::Refused(r) => r.status,
        other => panic!("expected a refusal, got {other}"),
    }
}

/// Derives at `path` (registering `a` first if new): the result's status or (counter, key).
fn try_derive(app: &TestAppliance, a: uuid::Uuid, path: &str) -> Result<(u64, [u8; 32]), Status> {
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let _ = c.register(a).await;
        c.derive(derive_body(a, path))
            .await
            .map(|d| (d.counter, *d.key))
            .map_err(refused_status)
    })
}

#[test]
fn starts_sealed_unseals_with_k_shares_refuses_bad_ones_and_seals_again() {
    let mut app = shamir_appliance("[\"test-client\"]");
    let files = init(&app, "3", "5");
    assert_eq!(files.len(), 5);
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let set_file = app.dir.path().join("share-set.json");
    let set: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&set_file).unwrap()).unwrap();
    assert_eq!(
        (set["threshold"].as_u64(), set["shares"].as_u64()),
        (Some(3), Some(5))
    );
    let shares: Vec<Share> = files.iter().map(|f| read_share_file(f).unwrap()).collect();

    app.launch();
    let a = asset(31337);
    let path = "m/44'/0'/0'/0'/5";
    assert_eq!(try_derive(&app, a, path), Err(Status::Sealed));
    let out = cli(&app, &["seal-status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("seal state SEALED (provider shamir)"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("unseal progress 0/3 (of 5 shares)"),
        "{}",
        text(&out)
    );

    // The metrics and the readiness probe say the same (the seal state is read live).
    let (code, body) = common::http_get(app.admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("sealed: sealed"), "{body}");
    let (_, m) = common::http_get(app.admin, "/metrics");
    assert!(
        m.contains("custody_seal_state{state=\"sealed\"} 1\n"),
        "{m}"
    );

    // One share in: progress 1/3, still sealed.
    let f1 = files[0].to_str().unwrap();
    let out = cli(&app, &["unseal", "--share-file", f1]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("UNSEALING"), "{}", text(&out));
    assert!(text(&out).contains("unseal progress 1/3"), "{}", text(&out));
    let (_, m) = common::http_get(app.admin, "/metrics");
    for line in [
        "custody_seal_state{state=\"unsealing\"} 1\n",
        "custody_seal_state{state=\"sealed\"} 0\n",
        "custody_unseal_shares_received 1\n",
        "custody_unseal_shares_threshold 3\n",
    ] {
        assert!(m.contains(line), "{line}{m}");
    }
    // The same share again: SHARE_REPEATED, and the CLI exits 3.
    let out = cli(&app, &["unseal", "--share-file", f1]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("SHARE_REPEATED"), "{}", text(&out));
    assert!(
        text(&out).contains("share number 1 was already submitted"),
        "{}",
        text(&out)
    );

    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        // Garbage, a damaged share, a share of another seed: SHARE_INVALID.
        let mut damaged = shares[1].encode().to_string();
        damaged.replace_range(40..41, if &damaged[40..41] == "0" { "1" } else { "0" });
        let other = custody::seal::shamir::split(
            &custody::kdf::RootSeed::from_bytes([7; 32]),
            uuid::Uuid::new_v4(),
            3,
            5,
        )
        .unwrap();
        for bad in ["nonsense", damaged.as_str(), other[1].encode().as_str()] {
            let e = c.unseal(bad, false).await.unwrap_err();
            assert_eq!(refused_status(e), Status::ShareInvalid, "{bad}");
        }
        assert_eq!(c.seal_status().await.unwrap().shares_received, 1);
        // A forged share (valid check digits, wrong value) completes the threshold with a
        // second genuine one: SEED_MISMATCH, and every submitted share is discarded.
        let forged = Share::from_parts(shares[2].seed_id, 3, 3, [0x55; 32]).encode();
        c.unseal(shares[1].encode().as_str(), false).await.unwrap();
        let e = c.unseal(forged.as_str(), false).await.unwrap_err();
        match e {
            ClientError::Refused(r) => {
                assert_eq!(r.status, Status::SeedMismatch);
                assert!(r.message.contains("fingerprint"), "{}", r.message);
            }
            other => panic!("{other}"),
        }
        let s = c.seal_status().await.unwrap();
        assert_eq!((s.state, s.shares_received), (SealStateCode::Sealed, 0));
        // --reset discards progress.
        c.unseal(shares[0].encode().as_str(), false).await.unwrap();
        let s = c.unseal("", true).await.unwrap();
        assert_eq!((s.state, s.shares_received), (SealStateCode::Sealed, 0));
    });
    assert_eq!(try_derive(&app, a, path), Err(Status::Sealed));

    // Shares 5, 2 and 4 (any three) unseal it.
    for (i, f) in [4usize, 1, 3].iter().enumerate() {
        let out = cli(
            &app,
            &["unseal", "--share-file", files[*f].to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", text(&out));
        if i < 2 {
            assert!(
                text(&out).contains(&format!("unseal progress {}/3", i + 1)),
                "{}",
                text(&out)
            );
        } else {
            assert!(text(&out).contains("seal state UNSEALED"), "{}", text(&out));
        }
    }
    let (counter, key) = try_derive(&app, a, path).expect("serves once unsealed");
    // A share after unsealing changes nothing.
    let out = cli(
        &app,
        &["unseal", "--share-file", files[0].to_str().unwrap()],
    );
    assert!(text(&out).contains("ALREADY_UNSEALED"), "{}", text(&out));

    // `custody recover` with three other shares derives the same key offline, and the seed
    // it writes derives, under OpenSSL's KBKDF, the same key again.
    let seed_out = app.dir.path().join("recovered.hex");
    let config = app.config_path().display().to_string();
    let counter_text = counter.to_string();
    let asset_text = a.to_string();
    let out = app.custody(&[
        "recover",
        "--share",
        files[0].to_str().unwrap(),
        "--share",
        files[2].to_str().unwrap(),
        "--share",
        files[4].to_str().unwrap(),
        "--config",
        &config,
        "--asset",
        &asset_text,
        "--path",
        path,
        "--counter",
        &counter_text,
        "--write-seed",
        seed_out.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["matches"], serde_json::json!(true));
    assert_eq!(report["derived"]["key_hex"].as_str().unwrap(), hex(&key));
    if let Some(openssl) = openssl_or_skip("recovered seed against OpenSSL") {
        let seed_hex = std::fs::read_to_string(&seed_out).unwrap();
        let seed: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let indices: [u32; PATH_DEPTH] = *DerivationPath::parse(path).unwrap().indices();
        let expected = openssl_kbkdf(
            &openssl,
            &seed,
            &spec_context(a.as_bytes(), counter, &indices),
        );
        assert_eq!(hex(&expected), hex(&key), "custody and OpenSSL agree");
    }

    // `custody seal`: every core stops serving within CORE_KEY_REFRESH.
    let out = cli(&app, &["seal"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SEALED_BY_OPERATOR"), "{}", text(&out));
    // New connections land on either core: eight in a row answer SEALED.
    common::eventually_in_a_row(Duration::from_secs(2), 8, || {
        match try_derive(&app, a, path) {
            Err(Status::Sealed) => Ok(()),
            other => Err(format!("still serving after seal: {other:?}")),
        }
    });
    // k shares again, the same key again.
    for f in [&files[1], &files[2], &files[3]] {
        assert!(cli(&app, &["unseal", "--share-file", f.to_str().unwrap()])
            .status
            .success());
    }
    let again = try_derive(&app, a, path).unwrap();
    assert_eq!(again.1, key);

    // Neither a share nor a key ever reaches the log.
    let log = app.log();
    for s in &shares {
        let line = s.encode();
        assert!(!log.contains(&line.as_str()[60..100]), "a share in the log");
    }
    assert!(!log.contains(&hex(&key)));
    assert!(
        log.contains("waiting for 3 of the 5 unseal shares"),
        "{log}"
    );
}

#[test]
fn only_admins_seal_and_unseal_and_anyone_reads_the_state() {
    let mut app = shamir_appliance("[\"ops-admin\"]");
    let files = init(&app, "2", "3");
    app.launch();
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let share = read_share_file(&files[0]).unwrap().encode();
        let e = c.unseal(share.as_str(), false).await.unwrap_err();
        assert_eq!(refused_status(e), Status::Forbidden);
        assert_eq!(
            refused_status(c.seal().await.unwrap_err()),
            Status::Forbidden
        );
        let s = c.seal_status().await.unwrap();
        assert_eq!(
            (s.state, s.shares_received, s.threshold),
            (SealStateCode::Sealed, 0, 2)
        );
    });
    let out = cli(&app, &["seal"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out).contains("FORBIDDEN") && text(&out).contains("policy.admins"),
        "{}",
        text(&out)
    );
}

#[test]
fn init_and_recover_refuse_what_they_cannot_stand_behind() {
    let app = shamir_appliance("[]");
    let config = app.config_path().display().to_string();
    let dir = app.dir.path().join("shares");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--share-dir", d, "--threshold", "4", "--shares", "3"],
            "4-of-3 split is not allowed",
        ),
        (
            vec!["--share-dir", d, "--threshold", "1"],
            "1-of-5 split is not allowed",
        ),
        (
            vec!["--share-dir", d, "--print-shares"],
            "exactly one of --share-dir",
        ),
        (vec![], "exactly one of --share-dir"),
        (
            vec!["--share-dir", "/nonexistent/shares"],
            "not a directory",
        ),
    ] {
        let mut all = vec!["init", "--config", config.as_str()];
        all.extend_from_slice(&args);
        let out = app.custody(&all);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    }
    // Nothing was written by the refused attempts.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert!(!app.dir.path().join("share-set.json").exists());

    // Printed shares: shown once, each a valid share line.
    let out = app.custody(&[
        "init",
        "--config",
        &config,
        "--print-shares",
        "--threshold",
        "2",
        "--shares",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("custody-share/1:"))
        .map(str::to_owned)
        .collect();
    assert_eq!(printed.len(), 3, "{}", text(&out));
    // A second init never replaces the share set.
    let again = app.custody(&["init", "--config", &config, "--print-shares"]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );

    // recover: one share is too few; shares from stdin work; a wrong fingerprint is refused.
    let share_file = app.dir.path().join("one.txt");
    std::fs::write(&share_file, format!("{}\n", printed[0])).unwrap();
    std::fs::set_permissions(&share_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = app.custody(&["recover", "--share", share_file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("1 shares given, this seed needs 2"),
        "{}",
        text(&out)
    );
    let recover_stdin = |extra: &[&str]| {
        use std::io::Write;
        let mut args = vec!["recover", "--share", "-"];
        args.extend_from_slice(extra);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_custody"))
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let input = format!("{}\n\n{}\n", printed[2], printed[0]);
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = recover_stdin(&["--config", &config]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("matches the appliance's seed"),
        "{}",
        text(&out)
    );
    let out = recover_stdin(&["--fingerprint", "00112233445566778899aabbccddeeff"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not the expected 00112233445566778899aabbccddeeff"),
        "{}",
        text(&out)
    );
    // A share file others can read is refused.
    std::fs::set_permissions(&share_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = app.custody(&["recover", "--share", share_file.to_str().unwrap()]);
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
}

//! The admin listener over real sockets: /metrics in the Prometheus text format with the
//! figures of real requests (merged over the cores), /healthz and /readyz, and the seal
//! state as it changes.

mod common;

use common::{asset, derive_body, http_get, runtime, TestAppliance};
use custody::client::Client;
use custody::wire::Status;
use std::collections::HashMap;
use std::time::Duration;

const POLICY: &str = "[policy]\nderivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\noperators = [\"test-client\"]\nauditors = [\"test-client\"]\nadmins = [\"test-client\"]\nrate_limits = { deriver = \"2/3600s\", operator = \"1000000/1s\", admin = \"1000000/1s\", auditor = \"1000000/1s\" }\n";

/// Every sample of a scrape by its name and labels, after checking the text format:
/// `# HELP` and `# TYPE` once per family, before its samples; every sample line
/// `name{labels} value` with a family declared; a number for every value.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: Vec<String> = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            assert!(!helps.contains(&name), "HELP twice for {name}");
            helps.push(name);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice for {name}"
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (key, value) = line.rsplit_once(' ').expect("sample value");
        let name = key.split('{').next().unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "metric name {name:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE before {line}");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "labels of {line}"
                );
            }
        }
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        assert!(samples.insert(key.to_owned(), v).is_none(), "{key} twice");
    }
    samples
}

/// Scrapes until `done` holds for the samples (5 s at most): cores publish every 100 ms.
fn scrape_until(
    app: &TestAppliance,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    common::eventually(Duration::from_secs(5), || {
        let (code, body) = http_get(app.admin, "/metrics");
        assert_eq!(code, 200, "{body}");
        let samples = parse_exposition(&body);
        if done(&samples) {
            Ok(samples)
        } else {
            Err(format!("{what}:\n{body}"))
        }
    })
}

/// `promtool check metrics` (Prometheus's own linter) on a real scrape. Without promtool
/// the check is skipped with a notice, unless `CUSTODY_REQUIRE_SERVICES=1`.
fn promtool_check(scrape: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            common::missing("promtool (apt-get install prometheus)", &e);
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 0 when clean; lint findings (and format errors) are printed.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
}

fn get(samples: &HashMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(f64::NAN)
}

#[test]
fn metrics_count_real_requests_and_health_follows_the_seal() {
    let mut app = TestAppliance::start_with(POLICY);
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let a = asset(7001);
    rt.block_on(c.register(a)).unwrap();
    for _ in 0..2 {
        rt.block_on(c.derive(derive_body(a, "m/44'/0'/0'/0'/1")))
            .unwrap();
    }
    let limited = rt
        .block_on(c.derive(derive_body(a, "m/44'/0'/0'/0'/1")))
        .unwrap_err();
    assert_eq!(limited.status(), Some(Status::RateLimited));
    let mut body = derive_body(a, "m/44'/0'/0'/0'/1");
    body.region = "EU-WEST".into();
    let denied = rt.block_on(c.derive(body)).unwrap_err();
    assert_eq!(denied.status(), Some(Status::Forbidden));
    rt.block_on(c.suspend(a)).unwrap();
    rt.block_on(c.resume(a)).unwrap();
    rt.block_on(c.rotate(a, uuid::Uuid::new_v4(), None))
        .unwrap();

    let expected = [
        ("custody_requests_total{op=\"DERIVE\",status=\"OK\"}", 2.0),
        (
            "custody_requests_total{op=\"DERIVE\",status=\"RATE_LIMITED\"}",
            1.0,
        ),
        (
            "custody_requests_total{op=\"DERIVE\",status=\"FORBIDDEN\"}",
            1.0,
        ),
        ("custody_requests_total{op=\"REGISTER\",status=\"OK\"}", 1.0),
        // The two derivations and the rate-limited one reached the shard.
        ("custody_derivation_latency_seconds_count", 3.0),
        (
            "custody_derivation_latency_seconds_bucket{le=\"+Inf\"}",
            3.0,
        ),
        ("custody_denied_requests_total{reason=\"region\"}", 1.0),
        ("custody_denied_requests_total{reason=\"no_role\"}", 0.0),
        ("custody_rate_limited_requests_total", 1.0),
        (
            "custody_key_lifecycle_transitions_total{from=\"NONE\",to=\"ACTIVE\"}",
            1.0,
        ),
        (
            "custody_key_lifecycle_transitions_total{from=\"ACTIVE\",to=\"SUSPENDED\"}",
            1.0,
        ),
        (
            "custody_key_lifecycle_transitions_total{from=\"SUSPENDED\",to=\"ACTIVE\"}",
            1.0,
        ),
        (
            "custody_key_lifecycle_transitions_total{from=\"ACTIVE\",to=\"ROTATING\"}",
            1.0,
        ),
        (
            "custody_key_lifecycle_transitions_total{from=\"ROTATING\",to=\"ACTIVE\"}",
            1.0,
        ),
        ("custody_seal_state{state=\"unsealed\"}", 1.0),
        ("custody_seal_state{state=\"sealed_by_operator\"}", 0.0),
        ("custody_policy_generation", 1.0),
    ];
    // Each core publishes its figures on its own clock (the connection's core counts the
    // statuses, the owning shard's core the rate limit and the commits): wait for all.
    let m = scrape_until(&app, "every figure of the requests published", |m| {
        get(m, "custody_requests_total{op=\"ROTATE\",status=\"OK\"}") == 1.0
            && expected.iter().all(|(key, want)| get(m, key) == *want)
            && get(m, "custody_commit_batch_records_sum") == 6.0
            && get(m, "custody_shard_queue_wait_seconds_count") == 6.0
    });
    for (key, want) in expected {
        assert_eq!(get(&m, key), want, "{key}");
    }
    // Commits: register, 2 derivations, suspend, resume, rotate: 6 records in all.
    assert_eq!(get(&m, "custody_commit_batch_records_sum"), 6.0);
    assert!(get(&m, "custody_commit_latency_seconds_count") >= 1.0);
    assert!(get(&m, "custody_shard_queue_wait_seconds_count") == 6.0);
    assert!(get(&m, "custody_hsm_calls_total{result=\"ok\"}") >= 1.0);
    assert!(get(&m, "custody_seed_cache_age_seconds") >= 0.0);
    let assets: f64 = (0..2)
        .map(|s| get(&m, &format!("custody_assets{{shard=\"{s}\"}}")))
        .sum();
    assert_eq!(assets, 1.0);
    // Each shard numbers its records from 1: the heads add up to the 6 records.
    let heads: f64 = (0..2)
        .map(|s| get(&m, &format!("custody_audit_head_seq{{shard=\"{s}\"}}")))
        .sum();
    assert_eq!(heads, 6.0);
    let accepted: f64 = (0..2)
        .map(|s| {
            get(
                &m,
                &format!("custody_connections_accepted_total{{core=\"{s}\"}}"),
            )
        })
        .sum();
    assert!(accepted >= 1.0);

    promtool_check(&http_get(app.admin, "/metrics").1);

    assert_eq!(http_get(app.admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(app.admin, "/readyz"), (200, "ok\n".into()));
    assert_eq!(http_get(app.admin, "/nowhere").0, 404);

    // Sealed by an admin: not ready, and the state says so at once (read live).
    rt.block_on(c.seal()).unwrap();
    let (code, body) = http_get(app.admin, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("sealed: sealed_by_operator"), "{body}");
    assert_eq!(http_get(app.admin, "/healthz").0, 200, "alive while sealed");
    let m = scrape_until(&app, "sealed", |_| true);
    assert_eq!(
        get(&m, "custody_seal_state{state=\"sealed_by_operator\"}"),
        1.0
    );
    assert_eq!(get(&m, "custody_seal_state{state=\"unsealed\"}"), 0.0);
    assert!(!m.contains_key("custody_seed_cache_age_seconds"));
    // Unsealed again (the provider is called off the executors): ready once it is.
    rt.block_on(c.unseal("", false)).unwrap();
    common::eventually(Duration::from_secs(5), || {
        match http_get(app.admin, "/readyz") {
            (200, _) => Ok(()),
            (code, body) => Err(format!("not ready after UNSEAL: {code} {body}")),
        }
    });
    assert!(app.is_running());
}

#[test]
fn the_admin_listener_refuses_what_it_does_not_serve() {
    use std::io::{Read, Write};
    let app = TestAppliance::start();
    for (request, code) in [
        ("POST /metrics HTTP/1.1\r\n\r\n", "405"),
        ("GET metrics\r\n\r\n", "400"),
        ("HEAD /healthz HTTP/1.1\r\n\r\n", "200"),
    ] {
        let mut s = std::net::TcpStream::connect(app.admin).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert_eq!(reply.split(' ').nth(1), Some(code), "{request:?}: {reply}");
        if request.starts_with("HEAD") {
            assert!(reply.ends_with("\r\n\r\n"), "HEAD has no body: {reply:?}");
        }
    }
    // A head that never ends is cut off at its bound.
    let mut s = std::net::TcpStream::connect(app.admin).unwrap();
    let _ = s.write_all(&vec![b'a'; 9000]);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert_eq!(reply.split(' ').nth(1), Some("431"), "{reply}");
}

/// The metric families of a scrape (`# TYPE` lines), with each histogram's series names.
fn exported_names(scrape: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in scrape.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Every `custody_…` name in `text`.
fn custody_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("custody_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `custody_` inside a longer identifier is not a metric name.
        let before = rest[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(word.clone());
        }
        rest = &rest[at + word.len()..];
    }
    names
}

/// Runs promtool with `args` in `dir`: `None` when promtool is missing (not allowed with
/// CUSTODY_REQUIRE_SERVICES=1).
fn promtool(dir: &std::path::Path, args: &[&str]) -> Option<(bool, String)> {
    match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(out) => Some((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )),
        Err(e) => {
            common::missing("promtool (apt-get install prometheus)", &e);
            None
        }
    }
}

/// The alert rules and the Grafana dashboard refer only to series a running appliance
/// exports; promtool accepts the rules and their unit tests pass (each alert fires on its
/// series, at its time, and a healthy appliance raises none).
#[test]
fn alerts_and_dashboard_use_only_exported_metrics() {
    let app = TestAppliance::start();
    let (code, scrape) = http_get(app.admin, "/metrics");
    assert_eq!(code, 200);
    let exported = exported_names(&scrape);
    assert!(exported.contains("custody_derivation_latency_seconds_bucket"));
    assert!(exported.contains("custody_audit_reconciliation_drift_ratio"));

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance");
    let alerts = std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap();
    // Names in the rules' expressions (annotations and comments name no series).
    let exprs: String = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| !l.contains("summary:") && !l.contains("description:"))
        .collect::<Vec<_>>()
        .join("\n");
    let used = custody_names(&exprs);
    assert!(used.len() >= 10, "{used:?}");
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml uses {unknown:?}, not exported"
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("grafana/custody.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    let mut titles = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        titles += 1;
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let used = custody_names(&exprs.join("\n"));
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "custody.json uses {unknown:?}, not exported"
    );
    // Every exported family is on the dashboard somewhere.
    let families: Vec<_> = exported
        .iter()
        .filter(|n| !["_bucket", "_sum", "_count"].iter().any(|s| n.ends_with(s)))
        .filter(|n| {
            !used.contains(*n)
                && !used.contains(&format!("{n}_bucket"))
                && !used.contains(&format!("{n}_sum"))
        })
        .collect();
    assert!(families.is_empty(), "not on the dashboard: {families:?}");
    assert!(titles >= 20);

    let dir = root.join("prometheus");
    if let Some((ok, said)) = promtool(&dir, &["check", "rules", "alerts.yml"]) {
        assert!(ok, "promtool check rules:\n{said}");
    }
    if let Some((ok, said)) = promtool(&dir, &["test", "rules", "alerts_test.yml"]) {
        assert!(ok, "promtool test rules:\n{said}");
    }
}

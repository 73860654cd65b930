//! `custody register --file`: the registration of many assets at once, pipelined, each
//! line of the file with its own outcome.

use anyhow::{bail, Context};
use custody::client::{ClientError, FailoverClient};
use uuid::Uuid;

/// The most lines `custody register --file` reads: a larger file is refused whole.
const REGISTER_FILE_LINES_MAX: usize = 1_000_000;

/// Registrations `custody register --file` keeps in flight.
const REGISTER_FILE_WINDOW: usize = 512;

/// What became of one line of a `register --file`.
#[derive(serde::Serialize)]
struct LineOutcome {
    line: usize,
    text: String,
    /// registered, exists, invalid, repeated or failed.
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
}

/// `custody register --file F`: one asset id per line (blank lines and `#` comments
/// skipped), registered pipelined; each line reported as registered, exists (left as it
/// was), invalid (not a UUID, or refused INVALID_ASSET_ID: nothing changed), repeated (an
/// id an earlier line has) or failed (BUSY, STORE_UNAVAILABLE, …: run the file again,
/// since what was registered then reports `exists`). Exits 1 unless every line was
/// registered or existed.
pub(crate) async fn register_file(
    client: std::sync::Arc<FailoverClient>,
    file: &std::path::Path,
    json: bool,
) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("--file {}", file.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > REGISTER_FILE_LINES_MAX {
        bail!(
            "--file {}: {} lines, more than {REGISTER_FILE_LINES_MAX}; split it (nothing was registered)",
            file.display(),
            lines.len()
        );
    }
    let (mut outcomes, to_send) = parse_register_lines(&lines);
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = to_send.into_iter();
    loop {
        while tasks.len() < REGISTER_FILE_WINDOW {
            let Some((slot, id)) = queue.next() else {
                break;
            };
            let c = client.clone();
            tasks.spawn(async move { (slot, c.register(id).await) });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (slot, result) = done.context("a registration task")?;
        let o = &mut outcomes[slot];
        match result {
            Ok(info) => {
                o.outcome = "registered";
                o.shard = Some(info.shard);
            }
            Err(ClientError::Refused(r)) => {
                o.outcome = match r.status {
                    custody::wire::Status::AssetExists => "exists",
                    custody::wire::Status::InvalidAssetId => "invalid",
                    _ => "failed",
                };
                o.status = Some(r.status.name());
                o.message = r.message;
            }
            Err(e) => o.message = e.to_string(),
        }
    }
    print_register_outcomes(&outcomes, json)?;
    let ok = outcomes
        .iter()
        .all(|o| o.outcome == "registered" || o.outcome == "exists");
    Ok(if ok { 0 } else { 1 })
}

/// Each line's outcome so far (invalid and repeated lines are final) and the ids to send,
/// with the index of their outcome.
fn parse_register_lines(lines: &[&str]) -> (Vec<LineOutcome>, Vec<(usize, Uuid)>) {
    let mut outcomes: Vec<LineOutcome> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    let mut to_send = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut o = LineOutcome {
            line: i + 1,
            text: t.chars().take(80).collect(),
            outcome: "invalid",
            shard: None,
            status: None,
            message: String::new(),
        };
        match Uuid::parse_str(t) {
            Err(e) => o.message = format!("not a UUID: {e}"),
            Ok(id) => match seen.get(&id) {
                Some(first) => {
                    o.outcome = "repeated";
                    o.message = format!("the asset of line {first}");
                }
                None => {
                    seen.insert(id, i + 1);
                    to_send.push((outcomes.len(), id));
                    o.outcome = "failed";
                    o.message = "no answer".into();
                }
            },
        }
        outcomes.push(o);
    }
    (outcomes, to_send)
}

/// Prints each line's outcome and the counts (or all of it as one JSON document).
fn print_register_outcomes(outcomes: &[LineOutcome], json: bool) -> anyhow::Result<()> {
    let count = |k: &str| outcomes.iter().filter(|o| o.outcome == k).count();
    let summary = serde_json::json!({
        "registered": count("registered"),
        "exists": count("exists"),
        "invalid": count("invalid"),
        "repeated": count("repeated"),
        "failed": count("failed"),
    });
    if json {
        let all = serde_json::json!({ "lines": outcomes, "summary": summary });
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for o in outcomes {
        let detail = match (o.shard, o.status) {
            (Some(shard), _) => format!(" (shard {shard})"),
            (None, Some(status)) => format!(": {status}: {}", o.message),
            (None, None) if !o.message.is_empty() => format!(": {}", o.message),
            _ => String::new(),
        };
        println!("line {}: {} {}{detail}", o.line, o.text, o.outcome);
    }
    println!(
        "{} registered, {} existed, {} invalid, {} repeated, {} failed",
        summary["registered"],
        summary["exists"],
        summary["invalid"],
        summary["repeated"],
        summary["failed"]
    );
    Ok(())
}

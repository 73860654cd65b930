//! How the answers of an appliance are printed: the text (or JSON) for an asset, the seal
//! state, the regions and a reconciliation summary, and a time for a person to read.

use custody::hex::encode as hex;
use custody::op::SealInfo;
use custody::wire::{AssetInfo, SealStateCode};

/// One asset as a command that changed (or read) it prints it: `what` names the command.
pub(crate) fn asset_text(a: &AssetInfo, json: bool, what: &str) -> String {
    if json {
        serde_json::json!({
            "asset": a.asset,
            "state": a.state,
            "counter": a.counter,
            "shard": a.shard,
        })
        .to_string()
    } else {
        format!(
            "{what}: asset {} state {} counter {} shard {}",
            a.asset, a.state, a.counter, a.shard
        )
    }
}

/// The seal state (`seal-status`, `seal`, `unseal`), with the unseal progress, the seed's
/// fingerprint and the provider's figures where they apply.
pub(crate) fn seal_text(s: &SealInfo, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(s).unwrap_or_default();
    }
    let mut out = format!(
        "seal state {} (provider {})",
        s.state.name(),
        s.provider.name()
    );
    if s.threshold > 0 {
        out.push_str(&format!(
            "\n  unseal progress {}/{} (of {} shares)",
            s.shares_received, s.threshold, s.shares
        ));
    }
    if s.fingerprint != [0; 16] {
        out.push_str(&format!("\n  seed fingerprint {}", hex(&s.fingerprint)));
    }
    if s.since_unix_ms > 0 {
        out.push_str(&format!("\n  since {} (Unix ms)", s.since_unix_ms));
    }
    if s.key_unsealed_unix_ms > 0 {
        out.push_str(&format!(
            "\n  key unsealed at {} (Unix ms)",
            s.key_unsealed_unix_ms
        ));
    }
    if s.state == SealStateCode::SealedByFailure && !s.reason.is_empty() {
        out.push_str(&format!("\n  reason {}", s.reason));
    }
    if s.provider != custody::wire::ProviderCode::Shamir {
        out.push_str(&format!(
            "\n  provider calls ok {} failed {} timed out {}; breaker opened {} times",
            s.calls_ok, s.calls_failed, s.calls_timed_out, s.breaker_opened
        ));
    }
    out
}

/// The configured regions, each enabled or DISABLED.
pub(crate) fn regions_text(list: &[(String, bool)], json: bool) -> String {
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|(r, e)| serde_json::json!({ "region": r, "enabled": e }))
            .collect();
        return serde_json::to_string_pretty(&v).unwrap_or_default();
    }
    list.iter()
        .map(|(r, e)| format!("{r} {}", if *e { "enabled" } else { "DISABLED" }))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The appliance's reconciliation summary: its figures, then its first findings.
pub(crate) fn reconcile_text(s: &custody::op::ReconcileSummary) -> String {
    let ratio = if s.assets_checked == 0 {
        0.0
    } else {
        s.assets_drifted as f64 / s.assets_checked as f64
    };
    let mut out = format!(
        "reconciliation: {} records, {} checkpoints (MACs {}), {} assets, {} drifted (drift ratio {ratio:.6}), {} findings",
        s.records_checked,
        s.checkpoints_checked,
        if s.macs_checked { "checked" } else { "not checked: sealed" },
        s.assets_checked,
        s.assets_drifted,
        s.findings_total
    );
    for f in &s.findings {
        out.push('\n');
        out.push_str(f);
    }
    if s.findings_total as usize > s.findings.len() {
        out.push_str(&format!(
            "\n… and {} more (the appliance's log has them all)",
            s.findings_total as usize - s.findings.len()
        ));
    }
    out
}

/// A Unix time in milliseconds as RFC 3339 UTC (seconds).
pub(crate) fn unix_ms_text(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

//! `custody reconcile --offline`: the auditor's full reconciliation run without the
//! appliance, straight against the store its configuration names (SQLite or PostgreSQL),
//! the checkpoints' MACs checked when the seed is given.

use crate::args::Args;
use crate::ceremony::read_shares;
use anyhow::{bail, Context};
use custody::kdf::DerivationKey;
use custody::reconcile::{reconcile, MacCheck, Pace, Reconciler, Report};
use custody::seal::shamir;
use custody::store::Checkpoint;

/// `custody reconcile --offline`: a full run straight against the store.
pub(crate) fn reconcile_offline(args: &Args) -> anyhow::Result<i32> {
    let file = args
        .config
        .as_ref()
        .context("reconcile --offline needs --config FILE (the appliance's)")?;
    let Some(config) = crate::load_config(file) else {
        return Ok(2);
    };
    let key = checkpoint_key(args)?;
    let report = match &config.store.backend {
        custody::config::StoreBackend::Sqlite { path } => {
            let reader = std::rc::Rc::new(custody::store::sqlite::SqliteReader::open(path)?);
            let mut r = Reconciler::new();
            let check = |c: &Checkpoint| mac_matches(key.as_ref(), c);
            let mac: Option<MacCheck<'_>> = key.as_ref().map(|_| &check as _);
            futures_lite::future::block_on(reconcile(&mut r, &reader, mac, &Pace::FULL_SPEED))?
        }
        custody::config::StoreBackend::Postgres(pg) => {
            let pg = pg.clone();
            custody::store::postgres::on_own_executor("custody-reconcile", move || async move {
                let client = custody::store::postgres::connect(&pg).await?;
                let source = custody::store::postgres::PgAuditSource {
                    client: std::rc::Rc::new(client),
                };
                let mut r = Reconciler::new();
                let check = |c: &Checkpoint| mac_matches(key.as_ref(), c);
                let mac: Option<MacCheck<'_>> = key.as_ref().map(|_| &check as _);
                reconcile(&mut r, &source, mac, &Pace::FULL_SPEED).await
            })??
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.findings.is_empty() { 0 } else { 1 })
}

/// The key that checks the checkpoints' MACs, from `--seed-file` or k `--share`s; `None`
/// when neither is given (the MACs are then not checked). The seed itself is dropped here.
fn checkpoint_key(args: &Args) -> anyhow::Result<Option<DerivationKey>> {
    let seed = match (&args.seed_file, args.share_inputs.is_empty()) {
        (Some(_), false) => bail!("give --seed-file or --share, not both"),
        (Some(path), true) => Some(custody::seal::read_import_seed(path)?),
        (None, false) => {
            let shares = read_shares(&args.share_inputs)?;
            let refs: Vec<&shamir::Share> = shares.iter().collect();
            Some(shamir::combine(&refs)?)
        }
        (None, true) => None,
    };
    let key = seed.as_ref().map(DerivationKey::new).transpose()?;
    drop(seed);
    Ok(key)
}

/// Whether the checkpoint's MAC is the one `key` makes (false without a key).
fn mac_matches(key: Option<&DerivationKey>, c: &Checkpoint) -> bool {
    key.is_some_and(|k| {
        custody::reconcile::mac_eq(&k.checkpoint_mac(c.shard, c.seq, &c.hash), &c.mac)
    })
}

/// The run's figures, each shard's progress, then every finding.
fn print_report(report: &Report) {
    println!(
        "reconciliation: {} records, {} checkpoints (MACs {}), {} assets, {} drifted (drift ratio {:.6})",
        report.records_checked,
        report.checkpoints_checked,
        if report.macs_checked { "checked" } else { "not checked: no seed" },
        report.assets_checked,
        report.assets_drifted,
        report.drift_ratio
    );
    for (shard, m) in &report.shards {
        println!(
            "  shard {shard}: checked to seq {}, last good checkpoint {}{}",
            m.next_seq.saturating_sub(1),
            m.checkpointed,
            if m.broken { ", chain BROKEN" } else { "" }
        );
    }
    for f in &report.findings {
        println!("{f}");
    }
    println!(
        "{}",
        if report.findings.is_empty() {
            "no findings".to_owned()
        } else {
            format!("{} findings", report.findings.len())
        }
    );
}

//! The offline ceremony commands, without the appliance: `custody init` (make or import
//! the root seed, split it into shares, seal it) and `custody recover` (rebuild the seed
//! from k shares, check it, derive a key with it or write it out), and the reading of
//! share lines they and `reconcile --offline` take.

use crate::args::Args;
use anyhow::{bail, Context};
use custody::hex::encode as hex;
use custody::kdf::{DerivedKey, RootSeed};
use custody::seal::{shamir, InitReport};
use uuid::Uuid;

/// The init ceremony's sealing step (`custody init`).
pub(crate) fn init(args: &Args) -> anyhow::Result<i32> {
    let file = args
        .config
        .as_ref()
        .context("init needs --config FILE (the appliance's)")?;
    let Some(config) = crate::load_config(file) else {
        return Ok(2);
    };
    let import = match &args.import_seed {
        Some(path) => Some(custody::seal::read_import_seed(path)?),
        None => None,
    };
    if let Some(dir) = config.seal_dir() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let output = match (&args.share_dir, args.print_shares) {
        (Some(dir), false) => custody::seal::ShareOutput::Dir(dir.clone()),
        (None, true) => custody::seal::ShareOutput::Print,
        _ => bail!(
            "init needs exactly one of --share-dir DIR (one file per share, mode 0600) or --print-shares (shown once, here)"
        ),
    };
    let split = custody::seal::SplitSpec {
        threshold: args.threshold.unwrap_or(3),
        shares: args.shares.unwrap_or(5),
        output,
    };
    let (report, printed) = custody::seal::init(&config.seal, import, args.create_key, &split)?;
    let what = match &config.seal {
        custody::config::SealConfig::Shamir { .. } => "wrote the share set of",
        _ => "sealed",
    };
    if args.json {
        print_init_json(&report, &printed);
    } else {
        print_init_text(&report, &printed, what);
    }
    Ok(0)
}

/// What `init` made, as one JSON object (the printed shares in it).
fn print_init_json(report: &InitReport, printed: &[shamir::Share]) {
    let printed: Vec<String> = printed.iter().map(|s| s.encode().to_string()).collect();
    println!(
        "{}",
        serde_json::json!({
            "seed_id": report.seed_id,
            "fingerprint": report.fingerprint,
            "seed_file": report.seed_file,
            "imported": report.imported,
            "created_key": report.created_key,
            "threshold": report.threshold,
            "shares": report.shares,
            "share_files": report.share_files,
            "printed_shares": printed,
        })
    );
}

/// What `init` made, for the ceremony's officers: `what` says what was written ("sealed",
/// or "wrote the share set of").
fn print_init_text(report: &InitReport, printed: &[shamir::Share], what: &str) {
    println!(
        "{what} a {} root seed: {} (mode 0600)",
        if report.imported { "imported" } else { "new" },
        report.seed_file.display()
    );
    println!("  seed id      {}", report.seed_id);
    println!("  fingerprint  {}", report.fingerprint);
    if report.created_key {
        println!("  made the wrapping key on the token");
    }
    println!(
        "  split into {} shares, any {} of which rebuild the seed (checked)",
        report.shares, report.threshold
    );
    for path in &report.share_files {
        println!("  share        {}", path.display());
    }
    if !printed.is_empty() {
        println!("\nThe shares, shown this once: give each to a different custodian.");
        for share in printed {
            println!("  {}", share.encode().as_str());
        }
        println!();
    }
    println!("The seed itself was never written or shown.");
}

/// Reads share lines: each `--share` is a file (mode 0600), or `-` for lines on stdin.
pub(crate) fn read_shares(inputs: &[String]) -> anyhow::Result<Vec<shamir::Share>> {
    let mut shares = Vec::new();
    for input in inputs {
        if input == "-" {
            for line in std::io::stdin().lines() {
                let line = zeroize::Zeroizing::new(line.context("reading shares from stdin")?);
                if line.trim().is_empty() {
                    continue;
                }
                shares.push(
                    shamir::Share::parse(&line)
                        .with_context(|| format!("share {} on stdin", shares.len() + 1))?,
                );
            }
        } else {
            shares.push(shamir::read_share_file(std::path::Path::new(input))?);
        }
    }
    Ok(shares)
}

/// A key `recover` derived with the rebuilt seed, and what it was derived for.
struct Derived {
    asset: Uuid,
    path: String,
    counter: u64,
    key: DerivedKey,
}

/// What `recover` did, as it prints it (never the seed).
struct Recovery<'a> {
    seed_id: Uuid,
    threshold: u8,
    shares_used: usize,
    fingerprint: String,
    /// Whether the rebuilt seed is the appliance's; `None` when nothing was compared.
    matches: Option<bool>,
    derived: Option<Derived>,
    seed_file: Option<&'a std::path::Path>,
}

/// `custody recover`: the seed rebuilt offline from k shares, checked, and used.
pub(crate) fn recover(args: &Args) -> anyhow::Result<i32> {
    if args.share_inputs.is_empty() {
        bail!("recover needs the shares: --share FILE (repeat it), or --share - to read them from stdin");
    }
    let shares = read_shares(&args.share_inputs)?;
    let refs: Vec<&shamir::Share> = shares.iter().collect();
    let seed = shamir::combine(&refs)?;
    let fingerprint = custody::seal::blob::fingerprint(&seed);
    // What the appliance's seed is, to compare with.
    let expected = match (&args.config, &args.fingerprint) {
        (Some(_), Some(_)) => bail!("give --config or --fingerprint, not both"),
        (Some(file), None) => {
            let Some(config) = crate::load_config(file) else {
                return Ok(2);
            };
            Some(sealed_fingerprint(&config.seal)?)
        }
        (None, Some(f)) => Some(f.to_ascii_lowercase()),
        (None, None) => None,
    };
    if let Some(expected) = &expected {
        if *expected != fingerprint {
            bail!(
                "the {} shares rebuild a seed with fingerprint {fingerprint}, not the expected {expected}: wrong shares, or a forged one",
                shares.len()
            );
        }
    }
    let derived = derive_with_seed(args, &seed)?;
    if let Some(path) = &args.write_seed {
        write_seed(path, &seed)?;
    }
    drop(seed);
    let recovery = Recovery {
        seed_id: shares[0].seed_id,
        threshold: shares[0].threshold,
        shares_used: shares.len(),
        matches: expected.as_ref().map(|e| *e == fingerprint),
        fingerprint,
        derived,
        seed_file: args.write_seed.as_deref(),
    };
    if args.json {
        print_recovery_json(&recovery);
    } else {
        print_recovery_text(&recovery);
    }
    Ok(0)
}

/// The fingerprint of the seed the appliance's seal holds (its sealed seed or share set).
fn sealed_fingerprint(seal: &custody::config::SealConfig) -> anyhow::Result<String> {
    match seal {
        custody::config::SealConfig::Pkcs11 {
            sealed_seed_file, ..
        } => Ok(custody::seal::blob::SealedSeed::read(sealed_seed_file)?.fingerprint),
        custody::config::SealConfig::Shamir { share_set_file } => {
            Ok(shamir::ShareSet::read(share_set_file)?.fingerprint)
        }
        custody::config::SealConfig::Dev { .. } => {
            bail!("the dev provider's seed is not split into shares")
        }
    }
}

/// The key of `--asset` at `--path` and `--counter`, when all three are given.
fn derive_with_seed(args: &Args, seed: &RootSeed) -> anyhow::Result<Option<Derived>> {
    match (&args.asset, &args.path, args.counter) {
        (None, None, None) => Ok(None),
        (Some(asset), Some(path), Some(counter)) => {
            let asset = Uuid::parse_str(asset)
                .with_context(|| format!("--asset {asset:?} is not a UUID"))?;
            let parsed = custody::kdf::DerivationPath::parse(path)
                .map_err(|e| anyhow::anyhow!("--path {path:?}: {e}"))?;
            let key = custody::kdf::DerivationKey::new(seed)?;
            Ok(Some(Derived {
                asset,
                path: path.clone(),
                counter,
                key: key.derive(&asset, counter, &parsed),
            }))
        }
        _ => bail!("to derive a key give all three of --asset, --path and --counter"),
    }
}

/// Writes the seed as hex (mode 0600) for `init --import-seed`, never over a file.
fn write_seed(path: &std::path::Path, seed: &RootSeed) -> anyhow::Result<()> {
    let mut text = zeroize::Zeroizing::new(hex(seed.expose()));
    text.push('\n');
    custody::seal::write_private_new(path, text.as_bytes())
        .with_context(|| format!("writing {} (never over an existing file)", path.display()))
}

fn print_recovery_json(r: &Recovery<'_>) {
    println!(
        "{}",
        serde_json::json!({
            "seed_id": r.seed_id,
            "fingerprint": r.fingerprint,
            "matches": r.matches,
            "shares_used": r.shares_used,
            "derived": r.derived.as_ref().map(|d| serde_json::json!({
                "asset": d.asset, "path": d.path, "counter": d.counter, "key_hex": hex(&d.key[..]),
            })),
            "seed_file": r.seed_file,
        })
    );
}

fn print_recovery_text(r: &Recovery<'_>) {
    println!(
        "rebuilt seed {} from {} shares (threshold {})",
        r.seed_id, r.shares_used, r.threshold
    );
    let fingerprint = &r.fingerprint;
    match r.matches {
        Some(_) => println!("  fingerprint  {fingerprint} (matches the appliance's seed)"),
        None => {
            println!("  fingerprint  {fingerprint} (not compared: give --config or --fingerprint)")
        }
    }
    if let Some(d) = &r.derived {
        println!("  key          {}", hex(&d.key[..]));
        println!(
            "  for asset {} path {} counter {}",
            d.asset, d.path, d.counter
        );
    }
    if let Some(path) = r.seed_file {
        println!(
            "  wrote the seed to {} (mode 0600): import it with `custody init --import-seed`, then destroy it",
            path.display()
        );
    }
}

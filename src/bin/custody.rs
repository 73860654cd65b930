//! custody: the operator and client CLI.
//!
//! ```text
//! custody [CONNECTION] hello
//! custody [CONNECTION] register ASSET_ID | register --file FILE
//! custody [CONNECTION] status ASSET_ID
//! custody [CONNECTION] assets [--state S] [--page-size N]
//! custody [CONNECTION] derive ASSET_ID --path PATH --region REGION --purpose PURPOSE --ttl SECONDS
//! custody [CONNECTION] rotate ASSET_ID [--rotation-id UUID] [--expect-counter N]
//! custody [CONNECTION] suspend | resume | retire ASSET_ID
//! custody [CONNECTION] regions | region enable|disable REGION
//! custody [CONNECTION] policy reload
//! custody [CONNECTION] seal | unseal [--share-file FILE] [--reset] | seal-status
//! custody dev-certs DIR [--client-cn NAME] [--more-clients A,B,…]
//! custody dev-seed FILE
//! custody init --config FILE (--share-dir DIR | --print-shares) [--shares N] [--threshold K]
//!              [--import-seed FILE] [--create-key]
//! custody [CONNECTION] reconcile [--full]
//! custody [CONNECTION] prove SHARD SEQ HASH
//! custody reconcile --offline --config FILE [--seed-file FILE | --share FILE...]
//! custody recover --share FILE... [--config FILE | --fingerprint HEX]
//!                 [--asset ID --path PATH --counter N] [--write-seed FILE]
//! ```
//!
//! CONNECTION: `--addr HOST:PORT` (default 127.0.0.1:7443), `--certs DIR` (a dev-certs
//! directory: ca.pem, client.pem, client.key) or `--ca`, `--cert`, `--key` one by one,
//! `--server-name NAME` (default localhost). Every command takes `--json`.

use anyhow::{bail, Context};
use custody::client::{Client, ClientConfig, ClientError};
use custody::op::{DeriveBody, SealInfo};
use custody::policy::Purpose;
use custody::seal::shamir;
use custody::wire::{AssetInfo, SealStateCode};
use std::net::SocketAddr;
use std::path::PathBuf;
use uuid::Uuid;

const USAGE: &str = "usage:
  custody [CONNECTION] hello
  custody [CONNECTION] register ASSET_ID
  custody [CONNECTION] register --file FILE  operator: register the asset id on each line
                         (# comments and blank lines skipped), pipelined; reports each line
                         registered, exists, invalid (nothing changed), repeated or failed;
                         exit 1 unless every line was registered or existed
  custody [CONNECTION] status ASSET_ID
  custody [CONNECTION] assets [--state ACTIVE|ROTATING|SUSPENDED|RETIRED] [--page-size N]
                         auditor or operator: every registered asset as the store holds it,
                         in asset id order, with its state, counter, shard and the time of
                         its last change (LIST_ASSETS, page by page)
  custody [CONNECTION] derive ASSET_ID --path \"m/44'/0'/0'/0'/7\" --region US-EAST --purpose TRADING --ttl 300
  custody dev-certs DIR [--client-cn NAME] [--more-clients A,B]   write a development CA, server and client certificate
                                             (and DIR/clients/A.pem, A.key, … from the same CA)
  custody dev-seed FILE                      write a random development seed (NOT for production)
  custody [CONNECTION] rotate ASSET_ID [--rotation-id UUID] [--expect-counter N]
                         operator: move the asset's counter forward by one (a new key);
                         the rotation id (printed; a new one unless given) makes a retry
                         safe: the same id again answers the first result; with
                         --expect-counter it rotates only from that counter
  custody [CONNECTION] suspend ASSET_ID      operator: stop derivations of the asset
  custody [CONNECTION] resume ASSET_ID       operator: serve a suspended asset again
  custody [CONNECTION] retire ASSET_ID       admin: retire the asset for good (STATUS only)
  custody [CONNECTION] regions               the configured regions and which are enabled
  custody [CONNECTION] region disable|enable REGION
                         admin: switch a compliance region off (derivations in it are
                         refused REGION_DISABLED on every core once this answers) or on;
                         durable and audited
  custody [CONNECTION] policy reload         admin: the appliance re-reads its configuration
                         file and puts its [policy] (roles, rate limits, asset groups,
                         regions) in force, whole or not at all (as SIGHUP does); a bad
                         file is refused with every problem listed
  custody [CONNECTION] seal-status           the appliance's seal state (and unseal progress)
  custody [CONNECTION] seal                  admin: drop the unsealed seed at once
  custody [CONNECTION] unseal [--share-file FILE] [--reset]
                         admin: submit one unseal share (read from FILE, or typed at a
                         prompt that does not echo); on an HSM appliance, ask it to unseal
                         now; --reset discards the shares submitted so far
  custody init --config FILE (--share-dir DIR | --print-shares) [--shares N] [--threshold K]
               [--import-seed FILE] [--create-key]
                         the init ceremony: make a root seed (in the HSM for pkcs11) or
                         import one (32 raw bytes or 64 hex characters), split it into N
                         shares any K of which rebuild it (default 3 of 5; checked before
                         anything is written), write them one per file or print them once,
                         and write the sealed seed (pkcs11) or the share set (shamir);
                         --create-key first makes the wrapping key on the token
  custody [CONNECTION] prove SHARD SEQ HASH
                         auditor: prove a receipt (as DERIVE and ROTATE print it) is in
                         the audit log: its record has that hash and a checkpoint after
                         it verifies (exit 1 unless PROVEN)
  custody [CONNECTION] reconcile [--full]
                         auditor: the appliance reconciles its audit log now (the records
                         since its last run, or with --full every one) and reports the
                         figures and its first findings; exits 1 on any finding
  custody reconcile --offline --config FILE [--seed-file FILE | --share FILE...]
                         auditor, without the appliance: check the audit log straight in
                         the store the config names (SQLite file or PostgreSQL): every
                         shard's hash chain, the checkpoints (their MACs too, given the seed
                         as a file of 32 bytes or 64 hex digits, or k shares), counter
                         regressions, and every asset's stored counter against its newest
                         audited one; exits 1 on any finding (docs/audit.md)
  custody recover --share FILE [--share FILE]... [--config FILE | --fingerprint HEX]
                  [--asset ID --path PATH --counter N] [--write-seed FILE]
                         offline, without the appliance: rebuild the seed from K shares
                         (--share - reads share lines from stdin), check it against the
                         appliance's seed, derive the key of an asset at a path and
                         counter, or write the seed (mode 0600) for `init --import-seed`

CONNECTION:
  --addr HOST:PORT       appliance address (default 127.0.0.1:7443, env CUSTODY_ADDR)
  --certs DIR            use DIR/ca.pem, DIR/client.pem, DIR/client.key (env CUSTODY_CERTS)
  --ca FILE --cert FILE --key FILE
  --server-name NAME     name on the server certificate (default localhost)
  --json                 print the answer as JSON";

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("custody: {e:#}");
            std::process::exit(1);
        }
    }
}

#[derive(Default)]
struct Args {
    command: Option<String>,
    positional: Vec<String>,
    addr: Option<String>,
    certs: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    json: bool,
    path: Option<String>,
    region: Option<String>,
    purpose: Option<String>,
    ttl: Option<u32>,
    client_cn: Option<String>,
    more_clients: Vec<String>,
    config: Option<PathBuf>,
    import_seed: Option<PathBuf>,
    create_key: bool,
    share_dir: Option<PathBuf>,
    print_shares: bool,
    shares: Option<u8>,
    threshold: Option<u8>,
    share_inputs: Vec<String>,
    share_file: Option<PathBuf>,
    reset: bool,
    fingerprint: Option<String>,
    asset: Option<String>,
    counter: Option<u64>,
    write_seed: Option<PathBuf>,
    offline: bool,
    full: bool,
    seed_file: Option<PathBuf>,
    rotation_id: Option<String>,
    expect_counter: Option<u64>,
    file: Option<PathBuf>,
    state: Option<String>,
    page_size: Option<u16>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    use lexopt::prelude::*;
    let mut a = Args::default();
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Long("addr") => a.addr = Some(p.value()?.string()?),
            Long("certs") => a.certs = Some(p.value()?.into()),
            Long("ca") => a.ca = Some(p.value()?.into()),
            Long("cert") => a.cert = Some(p.value()?.into()),
            Long("key") => a.key = Some(p.value()?.into()),
            Long("server-name") => a.server_name = Some(p.value()?.string()?),
            Long("json") => a.json = true,
            Long("path") => a.path = Some(p.value()?.string()?),
            Long("region") => a.region = Some(p.value()?.string()?),
            Long("purpose") => a.purpose = Some(p.value()?.string()?),
            Long("ttl") => a.ttl = Some(p.value()?.parse()?),
            Long("client-cn") => a.client_cn = Some(p.value()?.string()?),
            Long("more-clients") => {
                a.more_clients = p.value()?.string()?.split(',').map(str::to_owned).collect()
            }
            Long("config") | Short('c') => a.config = Some(p.value()?.into()),
            Long("import-seed") => a.import_seed = Some(p.value()?.into()),
            Long("create-key") => a.create_key = true,
            Long("share-dir") => a.share_dir = Some(p.value()?.into()),
            Long("print-shares") => a.print_shares = true,
            Long("shares") => a.shares = Some(p.value()?.parse()?),
            Long("threshold") => a.threshold = Some(p.value()?.parse()?),
            Long("share") => a.share_inputs.push(p.value()?.string()?),
            Long("share-file") => a.share_file = Some(p.value()?.into()),
            Long("reset") => a.reset = true,
            Long("fingerprint") => a.fingerprint = Some(p.value()?.string()?),
            Long("asset") => a.asset = Some(p.value()?.string()?),
            Long("counter") => a.counter = Some(p.value()?.parse()?),
            Long("write-seed") => a.write_seed = Some(p.value()?.into()),
            Long("rotation-id") => a.rotation_id = Some(p.value()?.string()?),
            Long("expect-counter") => a.expect_counter = Some(p.value()?.parse()?),
            Long("offline") => a.offline = true,
            Long("full") => a.full = true,
            Long("seed-file") => a.seed_file = Some(p.value()?.into()),
            Long("file") => a.file = Some(p.value()?.into()),
            Long("state") => a.state = Some(p.value()?.string()?),
            Long("page-size") => a.page_size = Some(p.value()?.parse()?),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(None);
            }
            Value(v) if a.command.is_none() => a.command = Some(v.string()?),
            Value(v) => a.positional.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Some(a))
}

fn real_main() -> anyhow::Result<i32> {
    let Some(args) = parse_args()? else {
        return Ok(0);
    };
    let Some(command) = args.command.clone() else {
        eprintln!("{USAGE}");
        return Ok(2);
    };
    match command.as_str() {
        "dev-certs" => {
            let dir = PathBuf::from(args.positional.first().context("dev-certs needs DIR")?);
            let cn = args.client_cn.as_deref().unwrap_or("custody-dev-client");
            let more: Vec<&str> = args.more_clients.iter().map(String::as_str).collect();
            let certs = custody::tls::write_dev_certs_with(&dir, cn, &more)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&certs)?);
            } else {
                println!(
                    "wrote development certificates (NOT for production) to {}",
                    dir.display()
                );
                println!("  CA      {}", certs.ca_cert.display());
                println!(
                    "  server  {} (localhost, 127.0.0.1, ::1)",
                    certs.server_cert.display()
                );
                println!("  client  {} (CN={cn})", certs.client_cert.display());
                for name in &more {
                    println!("  client  {}/clients/{name}.pem (CN={name})", dir.display());
                }
            }
            Ok(0)
        }
        "dev-seed" => {
            let file = PathBuf::from(args.positional.first().context("dev-seed needs FILE")?);
            custody::seal::write_dev_seed(&file)?;
            if args.json {
                println!("{}", serde_json::json!({ "seed_file": file }));
            } else {
                println!(
                    "wrote a random 32-byte development seed to {} (mode 0600; NOT for production)",
                    file.display()
                );
            }
            Ok(0)
        }
        "init" => init(&args),
        "recover" => recover(&args),
        "reconcile" if args.offline => reconcile_offline(&args),
        "hello" | "register" | "status" | "derive" | "seal" | "unseal" | "seal-status"
        | "rotate" | "suspend" | "resume" | "retire" | "regions" | "region" | "policy"
        | "reconcile" | "prove" | "assets" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(client_command(&command, &args))
        }
        other => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            Ok(2)
        }
    }
}

fn reconcile_text(s: &custody::op::ReconcileSummary) -> String {
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

/// `custody reconcile --offline`: a full run straight against the store.
fn reconcile_offline(args: &Args) -> anyhow::Result<i32> {
    use custody::reconcile::{reconcile, Pace, Reconciler};
    let file = args
        .config
        .as_ref()
        .context("reconcile --offline needs --config FILE (the appliance's)")?;
    let config = match custody::config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(2);
        }
    };
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
    let key = seed
        .as_ref()
        .map(custody::kdf::DerivationKey::new)
        .transpose()?;
    drop(seed);
    let report = match &config.store.backend {
        custody::config::StoreBackend::Sqlite { path } => {
            let reader = std::rc::Rc::new(custody::store::sqlite::SqliteReader::open(path)?);
            let mut r = Reconciler::new();
            let check = |c: &custody::store::Checkpoint| {
                key.as_ref().is_some_and(|k| {
                    custody::reconcile::mac_eq(&k.checkpoint_mac(c.shard, c.seq, &c.hash), &c.mac)
                })
            };
            let mac: Option<custody::reconcile::MacCheck<'_>> = key.as_ref().map(|_| &check as _);
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
                let check = |c: &custody::store::Checkpoint| {
                    key.as_ref().is_some_and(|k| {
                        custody::reconcile::mac_eq(
                            &k.checkpoint_mac(c.shard, c.seq, &c.hash),
                            &c.mac,
                        )
                    })
                };
                let mac: Option<custody::reconcile::MacCheck<'_>> =
                    key.as_ref().map(|_| &check as _);
                reconcile(&mut r, &source, mac, &Pace::FULL_SPEED).await
            })??
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
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
                m.next_seq - 1,
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
    Ok(if report.findings.is_empty() { 0 } else { 1 })
}

/// The init ceremony's sealing step (`custody init`).
fn init(args: &Args) -> anyhow::Result<i32> {
    let file = args
        .config
        .as_ref()
        .context("init needs --config FILE (the appliance's)")?;
    let config = match custody::config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(2);
        }
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
    } else {
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
            for share in &printed {
                println!("  {}", share.encode().as_str());
            }
            println!();
        }
        println!("The seed itself was never written or shown.");
    }
    Ok(0)
}

/// Reads share lines: each `--share` is a file (mode 0600), or `-` for lines on stdin.
fn read_shares(inputs: &[String]) -> anyhow::Result<Vec<shamir::Share>> {
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

/// `custody recover`: the seed rebuilt offline from k shares, checked, and used.
fn recover(args: &Args) -> anyhow::Result<i32> {
    if args.share_inputs.is_empty() {
        bail!("recover needs the shares: --share FILE (repeat it), or --share - to read them from stdin");
    }
    let shares = read_shares(&args.share_inputs)?;
    let refs: Vec<&shamir::Share> = shares.iter().collect();
    let seed = shamir::combine(&refs)?;
    let fingerprint = custody::seal::blob::fingerprint(&seed);
    let seed_id = shares[0].seed_id;
    // What the appliance's seed is, to compare with.
    let expected = match (&args.config, &args.fingerprint) {
        (Some(_), Some(_)) => bail!("give --config or --fingerprint, not both"),
        (Some(file), None) => {
            let config = match custody::config::load(file) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return Ok(2);
                }
            };
            match &config.seal {
                custody::config::SealConfig::Pkcs11 {
                    sealed_seed_file, ..
                } => Some(custody::seal::blob::SealedSeed::read(sealed_seed_file)?.fingerprint),
                custody::config::SealConfig::Shamir { share_set_file } => {
                    Some(shamir::ShareSet::read(share_set_file)?.fingerprint)
                }
                custody::config::SealConfig::Dev { .. } => {
                    bail!("the dev provider's seed is not split into shares")
                }
            }
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
    let derived = match (&args.asset, &args.path, args.counter) {
        (None, None, None) => None,
        (Some(asset), Some(path), Some(counter)) => {
            let asset = Uuid::parse_str(asset)
                .with_context(|| format!("--asset {asset:?} is not a UUID"))?;
            let parsed = custody::kdf::DerivationPath::parse(path)
                .map_err(|e| anyhow::anyhow!("--path {path:?}: {e}"))?;
            let key = custody::kdf::DerivationKey::new(&seed)?;
            Some((
                asset,
                path.clone(),
                counter,
                key.derive(&asset, counter, &parsed),
            ))
        }
        _ => bail!("to derive a key give all three of --asset, --path and --counter"),
    };
    if let Some(path) = &args.write_seed {
        let mut text = zeroize::Zeroizing::new(hex(seed.expose()));
        text.push('\n');
        custody::seal::write_private_new(path, text.as_bytes())
            .with_context(|| format!("writing {} (never over an existing file)", path.display()))?;
    }
    drop(seed);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "seed_id": seed_id,
                "fingerprint": fingerprint,
                "matches": expected.as_ref().map(|e| *e == fingerprint),
                "shares_used": shares.len(),
                "derived": derived.as_ref().map(|(asset, path, counter, key)| serde_json::json!({
                    "asset": asset, "path": path, "counter": counter, "key_hex": hex(&key[..]),
                })),
                "seed_file": args.write_seed,
            })
        );
    } else {
        println!(
            "rebuilt seed {seed_id} from {} shares (threshold {})",
            shares.len(),
            shares[0].threshold
        );
        match &expected {
            Some(_) => println!("  fingerprint  {fingerprint} (matches the appliance's seed)"),
            None => println!(
                "  fingerprint  {fingerprint} (not compared: give --config or --fingerprint)"
            ),
        }
        if let Some((asset, path, counter, key)) = &derived {
            println!("  key          {}", hex(&key[..]));
            println!("  for asset {asset} path {path} counter {counter}");
        }
        if let Some(path) = &args.write_seed {
            println!(
                "  wrote the seed to {} (mode 0600): import it with `custody init --import-seed`, then destroy it",
                path.display()
            );
        }
    }
    Ok(0)
}

fn client_config(args: &Args) -> anyhow::Result<ClientConfig> {
    let addr_text = args
        .addr
        .clone()
        .or_else(|| std::env::var("CUSTODY_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:7443".into());
    let addr: SocketAddr = addr_text
        .parse()
        .with_context(|| format!("--addr {addr_text:?} is not HOST:PORT"))?;
    let certs = args
        .certs
        .clone()
        .or_else(|| std::env::var_os("CUSTODY_CERTS").map(PathBuf::from));
    let pick = |one: &Option<PathBuf>, name: &str, flag: &str| -> anyhow::Result<PathBuf> {
        match (one, &certs) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(dir)) => Ok(dir.join(name)),
            (None, None) => bail!("no client credentials: give --certs DIR or {flag} FILE"),
        }
    };
    Ok(ClientConfig {
        addr,
        server_name: args
            .server_name
            .clone()
            .unwrap_or_else(|| "localhost".into()),
        ca: pick(&args.ca, "ca.pem", "--ca")?,
        cert: pick(&args.cert, "client.pem", "--cert")?,
        key: pick(&args.key, "client.key", "--key")?,
    })
}

/// `custody assets [--state S] [--page-size N] [--json]`: every registered asset, page by
/// page (LIST_ASSETS), as the store holds it.
async fn list_assets(client: &Client, args: &Args) -> anyhow::Result<i32> {
    let state = match args.state.as_deref() {
        None => None,
        Some(name) => Some(
            custody::lifecycle::AssetState::from_name(&name.to_ascii_uppercase()).with_context(
                || format!("--state {name:?} is not ACTIVE, ROTATING, SUSPENDED or RETIRED"),
            )?,
        ),
    };
    let page_size = args
        .page_size
        .unwrap_or(custody::bounds::LIST_ASSETS_PAGE_MAX);
    if page_size == 0 || page_size > custody::bounds::LIST_ASSETS_PAGE_MAX {
        bail!(
            "--page-size must be 1 to {}",
            custody::bounds::LIST_ASSETS_PAGE_MAX
        );
    }
    let mut after = Uuid::nil();
    let mut all = Vec::new();
    loop {
        let page = match client.list_assets(state, after, page_size).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("custody: {e}");
                return Ok(1);
            }
        };
        if !args.json {
            for a in &page.assets {
                println!(
                    "{} {:<9} counter {:>4} shard {} changed {}",
                    a.asset,
                    a.state.name(),
                    a.counter,
                    a.shard,
                    unix_ms_text(a.changed_unix_ms)
                );
            }
        }
        let last = page.assets.last().map(|a| a.asset);
        all.extend(page.assets);
        match (page.more, last) {
            (true, Some(id)) => after = id,
            _ => break,
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        println!("{} assets", all.len());
    }
    Ok(0)
}

/// A Unix time in milliseconds as RFC 3339 UTC (seconds).
fn unix_ms_text(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

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
async fn register_file(
    client: std::sync::Arc<Client>,
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

fn asset_arg(args: &Args) -> anyhow::Result<Uuid> {
    let text = args.positional.first().context("needs ASSET_ID")?;
    Uuid::parse_str(text).with_context(|| format!("ASSET_ID {text:?} is not a UUID"))
}

async fn client_command(command: &str, args: &Args) -> anyhow::Result<i32> {
    let config = client_config(args)?;
    let client = Client::connect(&config).await?;
    if command == "register" {
        if let Some(file) = &args.file {
            return register_file(std::sync::Arc::new(client), file, args.json).await;
        }
    }
    if command == "assets" {
        return list_assets(&client, args).await;
    }
    let outcome = match command {
        "hello" => client.hello().await.map(|h| {
            if args.json {
                serde_json::to_string_pretty(&h).unwrap_or_default()
            } else {
                format!(
                    "protocol v{}, {} shards (hash {}), max frame body {} bytes, {} in flight per connection",
                    h.version, h.shard_count, h.shard_hash, h.max_frame_body_bytes, h.max_inflight_per_connection
                )
            }
        }),
        "register" => client
            .register(asset_arg(args)?)
            .await
            .map(|a| asset_text(&a, args.json, "registered")),
        "status" => client
            .status(asset_arg(args)?)
            .await
            .map(|a| asset_text(&a, args.json, "status")),
        "derive" => {
            let asset = asset_arg(args)?;
            let purpose_text = args.purpose.as_deref().unwrap_or("TRADING");
            let purpose = Purpose::from_name(purpose_text)
                .with_context(|| format!("--purpose {purpose_text:?} is not TRADING, SETTLEMENT, AUDIT or BACKUP"))?;
            let body = DeriveBody {
                asset,
                path: args.path.clone().context("derive needs --path")?,
                region: args.region.clone().unwrap_or_else(|| "US-EAST".into()),
                purpose: purpose as u8,
                ttl_s: args.ttl.unwrap_or(300),
            };
            client.derive(body).await.map(|d| {
                let key_hex = hex(&d.key[..]);
                if args.json {
                    serde_json::to_string_pretty(&serde_json::json!({
                        "asset": asset,
                        "counter": d.counter,
                        "scheme_version": d.scheme_version,
                        "key_hex": key_hex,
                        "receipt": d.receipt,
                    }))
                    .unwrap_or_default()
                } else {
                    format!(
                        "key {key_hex}\nasset {asset} counter {} scheme v{} receipt shard {} seq {}",
                        d.counter, d.scheme_version, d.receipt.shard, d.receipt.seq
                    )
                }
            })
        }
        "seal-status" => client
            .seal_status()
            .await
            .map(|s| seal_text(&s, args.json)),
        "seal" => client.seal().await.map(|s| seal_text(&s, args.json)),
        "regions" => client.regions().await.map(|l| regions_text(&l, args.json)),
        "region" => {
            let (what, name) = match args.positional.as_slice() {
                [w, n] => (w.as_str(), n.as_str()),
                _ => bail!("usage: custody region enable|disable REGION"),
            };
            let enabled = match what {
                "enable" => true,
                "disable" => false,
                other => bail!("custody region {other:?}: enable or disable"),
            };
            client
                .set_region(name, enabled)
                .await
                .map(|l| regions_text(&l, args.json))
        }
        "prove" => {
            let (shard, seq, hash) = match args.positional.as_slice() {
                [s, q, h] => (s, q, h),
                _ => bail!("usage: custody prove SHARD SEQ HASH (the receipt's three parts)"),
            };
            let shard: u16 = shard.parse().with_context(|| format!("SHARD {shard:?}"))?;
            let seq: u64 = seq.parse().with_context(|| format!("SEQ {seq:?}"))?;
            let bytes = (0..hash.len())
                .step_by(2)
                .map(|i| hash.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .with_context(|| format!("HASH {hash:?} is not 64 hex digits"))?;
            let p = client
                .prove_receipt(custody::wire::Receipt {
                    shard,
                    seq,
                    hash: bytes,
                })
                .await;
            match p {
                Ok(p) => {
                    let verdict = custody::reconcile::Verdict::from_u8(p.verdict);
                    let name = verdict
                        .map(|v| format!("{v:?}").to_uppercase())
                        .unwrap_or_else(|| format!("UNKNOWN({})", p.verdict));
                    if args.json {
                        println!(
                            "{}",
                            serde_json::json!({ "verdict": name, "checkpoint_seq": p.checkpoint_seq, "detail": p.detail })
                        );
                    } else {
                        println!("{name}: {}", p.detail);
                    }
                    return Ok(if verdict == Some(custody::reconcile::Verdict::Proven) { 0 } else { 1 });
                }
                Err(e) => Err(e),
            }
        }
        "reconcile" => {
            let r = client.reconcile(args.full).await;
            if let Ok(summary) = &r {
                if summary.findings_total > 0 {
                    let text = if args.json {
                        serde_json::to_string_pretty(summary).unwrap_or_default()
                    } else {
                        reconcile_text(summary)
                    };
                    println!("{text}");
                    return Ok(1);
                }
            }
            r.map(|s| {
                if args.json {
                    serde_json::to_string_pretty(&s).unwrap_or_default()
                } else {
                    reconcile_text(&s)
                }
            })
        }
        "policy" => {
            if args.positional.as_slice() != ["reload"] {
                bail!("usage: custody policy reload");
            }
            client.policy_reload().await.map(|p| {
                if args.json {
                    serde_json::to_string_pretty(&p).unwrap_or_default()
                } else {
                    format!(
                        "policy reloaded: generation {}, {} identities with a role, {} regions, {} asset groups",
                        p.generation, p.identities, p.regions, p.asset_groups
                    )
                }
            })
        }
        "suspend" => client
            .suspend(asset_arg(args)?)
            .await
            .map(|a| asset_text(&a, args.json, "suspended")),
        "resume" => client
            .resume(asset_arg(args)?)
            .await
            .map(|a| asset_text(&a, args.json, "resumed")),
        "retire" => client
            .retire(asset_arg(args)?)
            .await
            .map(|a| asset_text(&a, args.json, "retired")),
        "rotate" => {
            let asset = asset_arg(args)?;
            let rotation_id = match &args.rotation_id {
                Some(text) => Uuid::parse_str(text)
                    .with_context(|| format!("--rotation-id {text:?} is not a UUID"))?,
                None => Uuid::new_v4(),
            };
            if args.rotation_id.is_none() {
                // Printed first, so a retry after a lost answer can reuse it.
                eprintln!("rotation id {rotation_id} (pass it as --rotation-id to retry safely)");
            }
            client
                .rotate(asset, rotation_id, args.expect_counter)
                .await
                .map(|r| {
                    if args.json {
                        serde_json::to_string_pretty(&r).unwrap_or_default()
                    } else {
                        format!(
                            "{}: asset {} counter {} -> {} (rotation {}, receipt shard {} seq {})",
                            if r.replayed { "already rotated" } else { "rotated" },
                            r.asset,
                            r.previous_counter,
                            r.counter,
                            r.rotation_id,
                            r.receipt.shard,
                            r.receipt.seq
                        )
                    }
                })
        }
        "unseal" => unseal(&client, args).await?,
        _ => unreachable!("dispatched above"),
    };
    match outcome {
        Ok(text) => {
            println!("{text}");
            Ok(0)
        }
        Err(ClientError::Refused(r)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "error": r.status.name(),
                        "status": r.status as u16,
                        "message": r.message,
                        "retry_after_ms": r.retry_after_ms,
                    })
                );
            } else {
                eprintln!("custody: refused: {r}");
            }
            Ok(3)
        }
        Err(e) => Err(e.into()),
    }
}

fn asset_text(a: &AssetInfo, json: bool, what: &str) -> String {
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

/// `custody unseal`: one share to a `shamir` appliance (from a file, or typed at a prompt
/// that does not echo), or an unseal-now to an HSM appliance (then waits up to 10 s).
async fn unseal(client: &Client, args: &Args) -> anyhow::Result<Result<String, ClientError>> {
    let before = match client.seal_status().await {
        Ok(info) => info,
        Err(e) => return Ok(Err(e)),
    };
    let share = match (&args.share_file, before.provider) {
        (Some(path), _) => shamir::read_share_file(path)?.encode(),
        // A shamir appliance that is sealed: ask for a share (unless only resetting).
        (None, custody::wire::ProviderCode::Shamir) if !args.reset && !before.state.serving() => {
            eprintln!(
                "seed fingerprint {} (compare it with the ceremony record)",
                hex(&before.fingerprint)
            );
            eprintln!(
                "unseal progress {}/{}; share (not echoed):",
                before.shares_received, before.threshold
            );
            read_hidden_line().context("reading the share")?
        }
        _ => zeroize::Zeroizing::new(String::new()),
    };
    let answer = client.unseal(share.trim(), args.reset).await;
    drop(share);
    let mut info = match answer {
        Ok(info) => info,
        Err(e) => return Ok(Err(e)),
    };
    if info.provider != custody::wire::ProviderCode::Shamir && !info.state.serving() {
        // The HSM provider unseals on its own thread: wait for it.
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            info = match client.seal_status().await {
                Ok(info) => info,
                Err(e) => return Ok(Err(e)),
            };
            if info.state.serving() {
                break;
            }
        }
        if !info.state.serving() {
            // Exit non-zero: scripts must not take a still-sealed appliance for success.
            let mut message = format!(
                "still {} after 10 s of waiting for the provider",
                info.state.name()
            );
            if !info.reason.is_empty() {
                message.push_str(&format!(": {}", info.reason));
            }
            return Ok(Err(ClientError::Refused(custody::wire::Refusal::new(
                custody::wire::Status::Sealed,
                message,
            ))));
        }
    }
    Ok(Ok(seal_text(&info, args.json)))
}

/// Reads one line from stdin without echoing it when stdin is a terminal.
fn read_hidden_line() -> std::io::Result<zeroize::Zeroizing<String>> {
    use std::io::BufRead;
    let fd = libc::STDIN_FILENO;
    // SAFETY: isatty and tcgetattr only read the terminal's state into `saved`.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    let tty = unsafe { libc::isatty(fd) == 1 && libc::tcgetattr(fd, &mut saved) == 0 };
    if tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: sets the terminal's attributes from a copy of its own.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    let read = std::io::stdin().lock().read_line(&mut line);
    if tty {
        // SAFETY: restores the attributes read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    read?;
    Ok(line)
}

fn seal_text(s: &SealInfo, json: bool) -> String {
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

fn regions_text(list: &[(String, bool)], json: bool) -> String {
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

use custody::hex::encode as hex;

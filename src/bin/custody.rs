//! custody: the operator and client CLI.
//!
//! ```text
//! custody [CONNECTION] hello
//! custody [CONNECTION] register ASSET_ID
//! custody [CONNECTION] status ASSET_ID
//! custody [CONNECTION] derive ASSET_ID --path PATH --region REGION --purpose PURPOSE --ttl SECONDS
//! custody dev-certs DIR [--client-cn NAME]
//! custody dev-seed FILE
//! custody init --config FILE [--import-seed FILE] [--create-key]
//! ```
//!
//! CONNECTION: `--addr HOST:PORT` (default 127.0.0.1:7443), `--certs DIR` (a dev-certs
//! directory: ca.pem, client.pem, client.key) or `--ca`, `--cert`, `--key` one by one,
//! `--server-name NAME` (default localhost). Every command takes `--json`.

use anyhow::{bail, Context};
use custody::client::{Client, ClientConfig, ClientError};
use custody::policy::Purpose;
use custody::wire::{AssetInfo, DeriveBody};
use std::net::SocketAddr;
use std::path::PathBuf;
use uuid::Uuid;

const USAGE: &str = "usage:
  custody [CONNECTION] hello
  custody [CONNECTION] register ASSET_ID
  custody [CONNECTION] status ASSET_ID
  custody [CONNECTION] derive ASSET_ID --path \"m/44'/0'/0'/0'/7\" --region US-EAST --purpose TRADING --ttl 300
  custody dev-certs DIR [--client-cn NAME]   write a development CA, server and client certificate
  custody dev-seed FILE                      write a random development seed (NOT for production)
  custody init --config FILE [--import-seed FILE] [--create-key]
                         the init ceremony: make a root seed in the HSM (or import one:
                         32 raw bytes or 64 hex characters), seal it with the configured
                         provider and write the sealed file; --create-key first makes the
                         wrapping key on the token

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
    config: Option<PathBuf>,
    import_seed: Option<PathBuf>,
    create_key: bool,
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
            Long("config") | Short('c') => a.config = Some(p.value()?.into()),
            Long("import-seed") => a.import_seed = Some(p.value()?.into()),
            Long("create-key") => a.create_key = true,
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
            let certs = custody::tls::write_dev_certs(&dir, cn)?;
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
        "hello" | "register" | "status" | "derive" => {
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
    let report = custody::seal::init(&config.seal, import, args.create_key)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "seed_id": report.seed_id,
                "fingerprint": report.fingerprint,
                "sealed_seed_file": report.sealed_seed_file,
                "imported": report.imported,
                "created_key": report.created_key,
            })
        );
    } else {
        println!(
            "sealed a {} root seed into {} (mode 0600)",
            if report.imported { "imported" } else { "new" },
            report.sealed_seed_file.display()
        );
        println!("  seed id      {}", report.seed_id);
        println!("  fingerprint  {}", report.fingerprint);
        if report.created_key {
            println!("  made the wrapping key on the token");
        }
        println!("The seed itself was never written or shown. Keep the sealed file with the appliance's state.");
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

fn asset_arg(args: &Args) -> anyhow::Result<Uuid> {
    let text = args.positional.first().context("needs ASSET_ID")?;
    Uuid::parse_str(text).with_context(|| format!("ASSET_ID {text:?} is not a UUID"))
}

async fn client_command(command: &str, args: &Args) -> anyhow::Result<i32> {
    let config = client_config(args)?;
    let client = Client::connect(&config).await?;
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

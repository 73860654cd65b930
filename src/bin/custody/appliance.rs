//! The commands that talk to an appliance: the connection from the CONNECTION flags, one
//! function per command (each reads its arguments, asks, and makes the text it prints),
//! and how an answer or a refusal is printed and what exit status it gives.

use crate::args::Args;
use crate::output::{asset_text, reconcile_text, regions_text, seal_text, unix_ms_text};
use crate::register_file::register_file;
use anyhow::{bail, Context};
use custody::client::{ClientConfig, ClientError, FailoverClient, FailoverConfig};
use custody::hex::encode as hex;
use custody::op::DeriveBody;
use custody::policy::Purpose;
use custody::wire::AssetInfo;
use std::net::SocketAddr;
use std::path::PathBuf;
use uuid::Uuid;

/// An appliance's answer as the command prints it.
pub(crate) struct Answer {
    text: String,
    /// The exit status: 0, or 1 for an answer that reports a problem (a reconciliation's
    /// findings, a receipt not proven).
    status: i32,
}

impl Answer {
    /// An answer that is a success (exit status 0).
    pub(crate) fn ok(text: String) -> Answer {
        Answer { text, status: 0 }
    }
}

/// The answer, or the appliance's refusal (or a failure to ask).
type Reply = Result<Answer, ClientError>;

/// Connects as the CONNECTION flags say and runs `command` (one that real_main sends here).
/// With several `--addr` endpoints every command but the seal ones goes to whichever is
/// active (FailoverClient); with one, a failure is reported at once, as it always was.
pub(crate) async fn client_command(command: &str, args: &Args) -> anyhow::Result<i32> {
    let config = failover_config(args)?;
    if matches!(command, "seal" | "unseal" | "seal-status") && config.endpoints.len() > 1 {
        bail!(
            "{command} acts on one appliance (standbys hold their own seal state): give one --addr"
        );
    }
    let client = FailoverClient::connect(config).await?;
    if command == "register" {
        if let Some(file) = &args.file {
            return register_file(std::sync::Arc::new(client), file, args.json).await;
        }
    }
    if command == "assets" {
        return list_assets(&client, args).await;
    }
    let json = args.json;
    let reply = match command {
        "hello" => hello(&client, json).await,
        "register" => asset_answer(client.register(asset_arg(args)?).await, json, "registered"),
        "status" => asset_answer(client.status(asset_arg(args)?).await, json, "status"),
        "derive" => derive(&client, args).await?,
        "seal-status" => client
            .connected()
            .await?
            .1
            .seal_status()
            .await
            .map(|s| Answer::ok(seal_text(&s, json))),
        "seal" => {
            let (_, one) = client.connected().await?;
            one.seal().await.map(|s| Answer::ok(seal_text(&s, json)))
        }
        "regions" => client
            .regions()
            .await
            .map(|l| Answer::ok(regions_text(&l, json))),
        "region" => set_region(&client, args).await?,
        "prove" => prove(&client, args).await?,
        "reconcile" => reconcile(&client, args).await,
        "policy" => policy(&client, args).await?,
        "suspend" => asset_answer(client.suspend(asset_arg(args)?).await, json, "suspended"),
        "resume" => asset_answer(client.resume(asset_arg(args)?).await, json, "resumed"),
        "retire" => asset_answer(client.retire(asset_arg(args)?).await, json, "retired"),
        "rotate" => rotate(&client, args).await?,
        "unseal" => {
            let (_, one) = client.connected().await?;
            crate::unseal::unseal(&one, args).await?.map(Answer::ok)
        }
        _ => unreachable!("dispatched above"),
    };
    print_reply(reply, json)
}

/// Prints the answer (exit status its own) or the refusal (exit status 3); any other
/// failure is the caller's to report.
fn print_reply(reply: Reply, json: bool) -> anyhow::Result<i32> {
    match reply {
        Ok(answer) => {
            println!("{}", answer.text);
            Ok(answer.status)
        }
        Err(ClientError::Refused(r)) => {
            if json {
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

/// The appliances the CONNECTION flags (or CUSTODY_ADDR, CUSTODY_CERTS) describe: one
/// endpoint is tried once (call deadline zero), several with failover.
fn failover_config(args: &Args) -> anyhow::Result<FailoverConfig> {
    let addr_text = args
        .addr
        .clone()
        .or_else(|| std::env::var("CUSTODY_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:7443".into());
    let endpoints = parse_endpoints(&addr_text)?;
    let one = client_config(args, endpoints[0])?;
    let mut config = FailoverConfig::new(endpoints, &one);
    if config.endpoints.len() == 1 {
        config.call_deadline = std::time::Duration::ZERO;
    }
    Ok(config)
}

/// `--addr HOST:PORT[,HOST:PORT…]`: the endpoints in the order they are tried.
pub(crate) fn parse_endpoints(text: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let endpoints = text
        .split(',')
        .map(|one| {
            one.trim()
                .parse::<SocketAddr>()
                .with_context(|| format!("--addr {one:?} is not HOST:PORT"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if endpoints.len() > custody::client::FAILOVER_ENDPOINTS_MAX {
        bail!(
            "--addr: {} endpoints, more than {}",
            endpoints.len(),
            custody::client::FAILOVER_ENDPOINTS_MAX
        );
    }
    Ok(endpoints)
}

/// The connection to one appliance at `addr`, as the CONNECTION flags describe it.
fn client_config(args: &Args, addr: SocketAddr) -> anyhow::Result<ClientConfig> {
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

/// The ASSET_ID argument.
fn asset_arg(args: &Args) -> anyhow::Result<Uuid> {
    let text = args.positional.first().context("needs ASSET_ID")?;
    Uuid::parse_str(text).with_context(|| format!("ASSET_ID {text:?} is not a UUID"))
}

/// An asset as a lifecycle command (`what`) answered it.
fn asset_answer(answer: Result<AssetInfo, ClientError>, json: bool, what: &str) -> Reply {
    answer.map(|a| Answer::ok(asset_text(&a, json, what)))
}

/// `custody hello`: the protocol and the limits the appliance serves with.
async fn hello(client: &FailoverClient, json: bool) -> Reply {
    client.hello().await.map(|h| {
        Answer::ok(if json {
            serde_json::to_string_pretty(&h).unwrap_or_default()
        } else {
            format!(
                "protocol v{}, {} shards (hash {}), max frame body {} bytes, {} in flight per connection",
                h.version, h.shard_count, h.shard_hash, h.max_frame_body_bytes, h.max_inflight_per_connection
            )
        })
    })
}

/// `custody derive ASSET_ID --path PATH [--region R] [--purpose P] [--ttl S]`: the key.
async fn derive(client: &FailoverClient, args: &Args) -> anyhow::Result<Reply> {
    let asset = asset_arg(args)?;
    let purpose_text = args.purpose.as_deref().unwrap_or("TRADING");
    let purpose = Purpose::from_name(purpose_text).with_context(|| {
        format!("--purpose {purpose_text:?} is not TRADING, SETTLEMENT, AUDIT or BACKUP")
    })?;
    let body = DeriveBody {
        asset,
        path: args.path.clone().context("derive needs --path")?,
        region: args.region.clone().unwrap_or_else(|| "US-EAST".into()),
        purpose: purpose as u8,
        ttl_s: args.ttl.unwrap_or(300),
    };
    Ok(client.derive(body).await.map(|d| {
        let key_hex = hex(&d.key[..]);
        Answer::ok(if args.json {
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
        })
    }))
}

/// `custody region enable|disable REGION`: the regions as they are after.
async fn set_region(client: &FailoverClient, args: &Args) -> anyhow::Result<Reply> {
    let (what, name) = match args.positional.as_slice() {
        [w, n] => (w.as_str(), n.as_str()),
        _ => bail!("usage: custody region enable|disable REGION"),
    };
    let enabled = match what {
        "enable" => true,
        "disable" => false,
        other => bail!("custody region {other:?}: enable or disable"),
    };
    Ok(client
        .set_region(name, enabled)
        .await
        .map(|l| Answer::ok(regions_text(&l, args.json))))
}

/// `custody prove SHARD SEQ HASH`: the verdict on a receipt (exit status 1 unless PROVEN).
async fn prove(client: &FailoverClient, args: &Args) -> anyhow::Result<Reply> {
    let (shard, seq, hash) = match args.positional.as_slice() {
        [s, q, h] => (s, q, h),
        _ => bail!("usage: custody prove SHARD SEQ HASH (the receipt's three parts)"),
    };
    let shard: u16 = shard.parse().with_context(|| format!("SHARD {shard:?}"))?;
    let seq: u64 = seq.parse().with_context(|| format!("SEQ {seq:?}"))?;
    let bytes = (0..hash.len())
        .step_by(2)
        .map(|i| {
            hash.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .with_context(|| format!("HASH {hash:?} is not 64 hex digits"))?;
    let receipt = custody::wire::Receipt {
        shard,
        seq,
        hash: bytes,
    };
    Ok(client.prove_receipt(receipt).await.map(|p| {
        let verdict = custody::reconcile::Verdict::from_u8(p.verdict);
        let name = verdict
            .map(|v| format!("{v:?}").to_uppercase())
            .unwrap_or_else(|| format!("UNKNOWN({})", p.verdict));
        let text = if args.json {
            serde_json::json!({ "verdict": name, "checkpoint_seq": p.checkpoint_seq, "detail": p.detail })
                .to_string()
        } else {
            format!("{name}: {}", p.detail)
        };
        let proven = verdict == Some(custody::reconcile::Verdict::Proven);
        Answer {
            text,
            status: if proven { 0 } else { 1 },
        }
    }))
}

/// `custody reconcile [--full]`: the appliance's run now (exit status 1 on any finding).
async fn reconcile(client: &FailoverClient, args: &Args) -> Reply {
    client.reconcile(args.full).await.map(|s| {
        let text = if args.json {
            serde_json::to_string_pretty(&s).unwrap_or_default()
        } else {
            reconcile_text(&s)
        };
        Answer {
            text,
            status: if s.findings_total > 0 { 1 } else { 0 },
        }
    })
}

/// `custody policy reload`: the generation of the policy now in force, and its size.
async fn policy(client: &FailoverClient, args: &Args) -> anyhow::Result<Reply> {
    if args.positional.as_slice() != ["reload"] {
        bail!("usage: custody policy reload");
    }
    Ok(client.policy_reload().await.map(|p| {
        Answer::ok(if args.json {
            serde_json::to_string_pretty(&p).unwrap_or_default()
        } else {
            format!(
                "policy reloaded: generation {}, {} identities with a role, {} regions, {} asset groups",
                p.generation, p.identities, p.regions, p.asset_groups
            )
        })
    }))
}

/// `custody rotate ASSET_ID [--rotation-id UUID] [--expect-counter N]`.
async fn rotate(client: &FailoverClient, args: &Args) -> anyhow::Result<Reply> {
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
    let answer = client
        .rotate_retrying(asset, rotation_id, args.expect_counter)
        .await;
    Ok(answer.map(|r| {
        Answer::ok(if args.json {
            serde_json::to_string_pretty(&r).unwrap_or_default()
        } else {
            format!(
                "{}: asset {} counter {} -> {} (rotation {}, receipt shard {} seq {})",
                if r.replayed {
                    "already rotated"
                } else {
                    "rotated"
                },
                r.asset,
                r.previous_counter,
                r.counter,
                r.rotation_id,
                r.receipt.shard,
                r.receipt.seq
            )
        })
    }))
}

/// `custody assets [--state S] [--page-size N] [--json]`: every registered asset, page by
/// page (LIST_ASSETS), as the store holds it.
async fn list_assets(client: &FailoverClient, args: &Args) -> anyhow::Result<i32> {
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

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
//! CONNECTION: `--addr HOST:PORT` (default 127.0.0.1:7443; a comma-separated list for a
//! highly available group: each command goes to the active, see
//! `custody::client::FailoverClient`), `--certs DIR` (a dev-certs
//! directory: ca.pem, client.pem, client.key) or `--ca`, `--cert`, `--key` one by one,
//! `--server-name NAME` (default localhost). Every command takes `--json`.

#[path = "custody/appliance.rs"]
mod appliance;
#[path = "custody/args.rs"]
mod args;
#[path = "custody/ceremony.rs"]
mod ceremony;
#[path = "custody/dev.rs"]
mod dev;
#[path = "custody/output.rs"]
mod output;
#[path = "custody/reconcile_offline.rs"]
mod reconcile_offline;
#[path = "custody/register_file.rs"]
mod register_file;
#[path = "custody/unseal.rs"]
mod unseal;

use args::USAGE;

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("custody: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the command the arguments name; its exit status (an error exits 1).
fn real_main() -> anyhow::Result<i32> {
    let Some(args) = args::parse_args()? else {
        return Ok(0);
    };
    let Some(command) = args.command.clone() else {
        eprintln!("{USAGE}");
        return Ok(2);
    };
    match command.as_str() {
        "dev-certs" => dev::dev_certs(&args),
        "dev-seed" => dev::dev_seed(&args),
        "init" => ceremony::init(&args),
        "recover" => ceremony::recover(&args),
        "reconcile" if args.offline => reconcile_offline::reconcile_offline(&args),
        "hello" | "register" | "status" | "derive" | "seal" | "unseal" | "seal-status"
        | "rotate" | "suspend" | "resume" | "retire" | "regions" | "region" | "policy"
        | "reconcile" | "prove" | "assets" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(appliance::client_command(&command, &args))
        }
        other => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            Ok(2)
        }
    }
}

/// The appliance's configuration file, resolved; `None` after printing every problem in it
/// (the command then exits 2).
fn load_config(file: &std::path::Path) -> Option<custody::config::Config> {
    match custody::config::load(file) {
        Ok(c) => Some(c),
        Err(e) => {
            eprint!("{e}");
            None
        }
    }
}

//! custodyd: the appliance.
//!
//! ```text
//! custodyd run --config FILE        serve (the default command)
//! custodyd dev [--state-dir DIR]    a development appliance, ready to use (NOT for production)
//! custodyd check-config FILE        report every problem in a configuration file
//! custodyd version
//! ```

#[path = "custodyd/check_config.rs"]
mod check_config;

use anyhow::Context;
use std::path::PathBuf;

/// jemalloc gives back what a flood of connections freed; glibc's malloc kept it
/// (custody::heap).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (custody::heap::MALLOC_CONF), which jemalloc reads at its start
/// from this symbol as a C string: a pointer to its first byte.
#[export_name = "_rjem_malloc_conf"]
#[used]
pub static MALLOC_CONF: &u8 = &custody::heap::MALLOC_CONF[0];

const USAGE: &str = "usage:
  custodyd run --config FILE     start the appliance
  custodyd dev [--state-dir DIR] [--listen ADDR] [--shard-listen ADDR|\"\"] [--admin-listen ADDR]
               [--cores N] [--rate-limit N/Ss] [--log-level LEVEL]
                                 a development appliance, ready to use, NOT for production:
                                 development certificates and seed, the embedded store, a
                                 policy that gives the development client every role; prints
                                 the commands to use it. A new state directory (removed when
                                 it stops) unless --state-dir names one to keep (reused:
                                 certificates, seed and store). Defaults: listen
                                 127.0.0.1:7443, shard ports from 127.0.0.1:7444, admin
                                 127.0.0.1:7480, an executor per CPU but one (one on
                                 two CPUs), rate limit 1000/1s per requester and asset
  custodyd check-config FILE     check a configuration file and report every problem
  custodyd migrate --config FILE apply the store's schema migrations (PostgreSQL)
  custodyd version               print the version";

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("custodyd: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The resolved config named by `--config` (or the first argument); `None` after printing
/// every problem (exit status 2: systemd does not restart into a bad config).
fn load_config(
    flag: Option<PathBuf>,
    positional: &[PathBuf],
    command: &str,
) -> anyhow::Result<Option<custody::config::Config>> {
    let file = flag
        .or_else(|| positional.first().cloned())
        .with_context(|| format!("{command} needs --config FILE"))?;
    match custody::config::load(&file) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            eprint!("{e}");
            Ok(None)
        }
    }
}

/// Runs the command the arguments name; its exit status (an error exits 1).
fn real_main() -> anyhow::Result<i32> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut command: Option<String> = None;
    let mut config: Option<PathBuf> = None;
    let mut positional: Vec<PathBuf> = Vec::new();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") | Short('c') => config = Some(parser.value()?.into()),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(0);
            }
            Value(v) if command.is_none() => {
                let name = v.string()?;
                if name == "dev" {
                    return dev(parser);
                }
                command = Some(name);
            }
            Value(v) => positional.push(v.into()),
            _ => return Err(arg.unexpected().into()),
        }
    }
    match command.as_deref().unwrap_or("run") {
        "version" => {
            println!("custodyd {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        "check-config" => {
            let file = positional
                .first()
                .cloned()
                .or(config)
                .context("check-config needs a FILE")?;
            Ok(check_config::check_config(&file))
        }
        "migrate" => {
            let Some(config) = load_config(config, &positional, "migrate")? else {
                return Ok(2);
            };
            migrate(config.store.backend)
        }
        "run" => {
            let file = config.clone().or_else(|| positional.first().cloned());
            let Some(config) = load_config(config, &positional, "run")? else {
                return Ok(2);
            };
            serve(config, file)
        }
        other => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            Ok(2)
        }
    }
}

/// `custodyd migrate`: the PostgreSQL store's schema brought up to date (the embedded
/// store needs nothing: it migrates itself when custodyd starts).
fn migrate(backend: custody::config::StoreBackend) -> anyhow::Result<i32> {
    match backend {
        custody::config::StoreBackend::Sqlite { path } => {
            println!(
                "{}: the embedded store migrates itself when custodyd starts",
                path.display()
            );
            Ok(0)
        }
        custody::config::StoreBackend::Postgres(pg) => {
            let version = custody::store::postgres::on_own_executor(
                "custody-migrate",
                move || async move {
                    let client = custody::store::postgres::connect(&pg).await?;
                    custody::store::postgres::migrate(&client).await
                },
            )??;
            println!("schema at version {version}; audit-log partitions ready");
            Ok(0)
        }
    }
}

/// `custodyd dev`: prepares a development state directory, prints how to use it, serves
/// until SIGTERM or Ctrl-C, and removes the directory unless it was given.
fn dev(mut parser: lexopt::Parser) -> anyhow::Result<i32> {
    use lexopt::prelude::*;
    let mut o = custody::dev::DevOptions::default();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("state-dir") => o.state_dir = Some(parser.value()?.into()),
            Long("listen") => o.listen = parser.value()?.parse()?,
            Long("shard-listen") => {
                let v = parser.value()?.string()?;
                o.shard_listen = if v.is_empty() { None } else { Some(v.parse()?) };
            }
            Long("admin-listen") => o.admin_listen = parser.value()?.parse()?,
            Long("cores") => o.cores = parser.value()?.parse()?,
            Long("rate-limit") => o.rate_limit = parser.value()?.string()?,
            Long("log-level") => o.log_level = parser.value()?.string()?,
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(0);
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    let setup = custody::dev::prepare(&o)?;
    let Some(config) = load_config(Some(setup.config_file.clone()), &[], "dev")? else {
        return Ok(2);
    };
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    print!("{}", custody::dev::banner(&setup, &o, &bin_dir));
    std::io::Write::flush(&mut std::io::stdout())?;
    let code = serve(config, Some(setup.config_file.clone()));
    if !setup.kept {
        let _ = std::fs::remove_dir_all(&setup.dir);
    }
    code
}

/// Serves `config` (read from `file`, which a reload reads again) until stopped.
fn serve(config: custody::config::Config, file: Option<PathBuf>) -> anyhow::Result<i32> {
    let logs = tracing_subscriber::fmt()
        .with_max_level(config.server.log_level)
        .with_writer(std::io::stderr)
        .with_target(false);
    if config.server.log_json {
        // One object per line; a request's events carry the connection span.
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        // Colour codes only on a terminal, never in a file or the journal.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    // The process will hold the keyed derivation state: no core dumps, no
    // same-user ptrace.
    if let Err(e) = custody::locked::forbid_core_dumps() {
        eprintln!("custodyd: cannot make the process undumpable: {e}");
        return Ok(1);
    }
    match custody::server::run_with_reload(config, file) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("custodyd stopped: {e}");
            Ok(e.exit_code())
        }
    }
}

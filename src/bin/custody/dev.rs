//! The development commands, offline: `custody dev-certs` (a CA with a server and client
//! certificates) and `custody dev-seed` (a random root seed), neither for production.

use crate::args::Args;
use anyhow::Context;
use std::path::PathBuf;

/// `custody dev-certs DIR`: a development CA, a server certificate and the client
/// certificates (the main one, then DIR/clients/NAME.pem for each of --more-clients).
pub(crate) fn dev_certs(args: &Args) -> anyhow::Result<i32> {
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

/// `custody dev-seed FILE`: a random 32-byte development seed (mode 0600).
pub(crate) fn dev_seed(args: &Args) -> anyhow::Result<i32> {
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

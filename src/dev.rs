//! `custodyd dev`: a development appliance in one command, as `vault server -dev` is:
//! a state directory with development certificates, a development seed, the embedded
//! store and a policy that gives the development client every role, and the commands to
//! use it. NOT for production: the seed is a plain file and the CA's key sits beside the
//! certificates.
//!
//! [`prepare`] writes what is missing and the configuration (rewritten on every start,
//! from the options); the caller runs the appliance on it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The development client certificate's common name (`custody dev-certs`' default too).
pub const DEV_CLIENT: &str = "custody-dev-client";

/// An asset id for the commands the banner prints.
pub const EXAMPLE_ASSET: &str = "0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d";

/// What `custodyd dev` may be told.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Keep the state here (created if missing, reused if present); `None`: a new
    /// directory, removed when the appliance stops.
    pub state_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// The first per-shard port (`server.shard_listen`); shard i listens on port + i.
    pub shard_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    /// Executors; 0 = the configuration's default (one per online core but one).
    pub cores: u32,
    /// `limits.rate_limit`: each requester's requests on each asset.
    pub rate_limit: String,
    pub log_level: String,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            state_dir: None,
            listen: ([127, 0, 0, 1], 7443).into(),
            shard_listen: Some(([127, 0, 0, 1], 7444).into()),
            admin_listen: ([127, 0, 0, 1], 7480).into(),
            cores: 0,
            rate_limit: "1000/1s".into(),
            log_level: "info".into(),
        }
    }
}

/// A prepared development state directory.
#[derive(Debug)]
pub struct DevSetup {
    pub dir: PathBuf,
    /// The directory is the caller's (`--state-dir`): it stays after the appliance stops.
    pub kept: bool,
    pub config_file: PathBuf,
    pub certs: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the development seed: {0}")]
    Seed(String),
    #[error("--rate-limit {0:?}: {1}")]
    RateLimit(String, String),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates (or reuses) the state directory: development certificates and seed where they
/// are missing (kept where present, so clients and keys stay the same across restarts),
/// and the configuration for `options`.
pub fn prepare(options: &DevOptions) -> Result<DevSetup, DevError> {
    crate::ratelimit::RateLimit::parse(&options.rate_limit)
        .map_err(|e| DevError::RateLimit(options.rate_limit.clone(), e.to_string()))?;
    let (dir, kept) = match &options.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io_at(d))?;
            (d.canonicalize().map_err(io_at(d))?, true)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("custody-dev-")
                .tempdir()
                .map_err(io_at(&std::env::temp_dir()))?;
            (t.keep(), false)
        }
    };
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() || !certs.join("client.pem").exists() {
        crate::tls::write_dev_certs(&certs, DEV_CLIENT)?;
    }
    let seed = dir.join("dev-seed.bin");
    if !seed.exists() {
        crate::seal::write_dev_seed(&seed).map_err(|e| DevError::Seed(e.to_string()))?;
    }
    let config_file = dir.join("custody.toml");
    std::fs::write(&config_file, config_text(options, &dir)).map_err(io_at(&config_file))?;
    Ok(DevSetup {
        dir,
        kept,
        config_file,
        certs,
    })
}

/// The development configuration: every key not named here has its default
/// (appliance/custody.toml).
pub fn config_text(options: &DevOptions, dir: &Path) -> String {
    let shard_listen = options
        .shard_listen
        .map_or(String::new(), |a| a.to_string());
    let purposes = crate::policy::Purpose::ALL
        .iter()
        .map(|p| format!("{:?}", p.name()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "# Written by `custodyd dev` on every start: a DEVELOPMENT appliance, NOT for production.\n\
         # To change it, copy this file elsewhere, edit it and run `custodyd run --config FILE`.\n\
         [server]\n\
         listen = \"{listen}\"\n\
         shard_listen = \"{shard_listen}\"\n\
         admin_listen = \"{admin}\"\n\
         cores = {cores}\n\
         state_dir = {state_dir}\n\
         log_level = \"{log_level}\"\n\
         shutdown_timeout_s = 5\n\
         \n\
         [tls]\n\
         cert = \"certs/server.pem\"\n\
         key = \"certs/server.key\"\n\
         client_ca = \"certs/ca.pem\"\n\
         \n\
         [store]\n\
         backend = \"sqlite\"\n\
         \n\
         [seal]\n\
         provider = \"dev\"\n\
         dev_seed_file = \"dev-seed.bin\"\n\
         \n\
         [limits]\n\
         rate_limit = \"{rate_limit}\"\n\
         \n\
         [policy]\n\
         # The development client holds every role: deriver of every purpose in every region,\n\
         # operator, auditor and admin.\n\
         derivers = [{{ identity = \"{client}\", purposes = [{purposes}], regions = [\"US-EAST\", \"EU-WEST\", \"APAC\"] }}]\n\
         operators = [\"{client}\"]\n\
         auditors = [\"{client}\"]\n\
         admins = [\"{client}\"]\n\
         rate_limits = {{ deriver = \"{rate_limit}\", operator = \"{rate_limit}\", auditor = \"{rate_limit}\", admin = \"{rate_limit}\" }}\n",
        listen = options.listen,
        admin = options.admin_listen,
        cores = options.cores,
        state_dir = toml_string(&dir.display().to_string()),
        log_level = options.log_level,
        rate_limit = options.rate_limit,
        client = DEV_CLIENT,
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// What `custodyd dev` prints before it serves: that it is not for production, where
/// everything is, and the exact commands to use it. `bin_dir` is where `custody` is.
pub fn banner(setup: &DevSetup, options: &DevOptions, bin_dir: &Path) -> String {
    let certs = shell_word(&setup.certs.display().to_string());
    let addr = if options.listen == DevOptions::default().listen {
        String::new()
    } else {
        format!(" --addr {}", options.listen)
    };
    let cli = format!("custody --certs {certs}{addr}");
    let mut b = String::new();
    let rule = "=".repeat(78);
    let _ = writeln!(b, "{rule}");
    let _ = writeln!(b, "  custody DEVELOPMENT appliance: NOT FOR PRODUCTION");
    let _ = writeln!(
        b,
        "  The root seed is a plain file, the CA's key sits beside the certificates, and"
    );
    let _ = writeln!(
        b,
        "  the development client ({DEV_CLIENT}) holds every role."
    );
    let _ = writeln!(b, "{rule}");
    let _ = writeln!(
        b,
        "state directory  {}{}",
        setup.dir.display(),
        if setup.kept {
            " (kept: certificates, seed and store are reused next time)"
        } else {
            " (removed when this appliance stops; --state-dir DIR keeps one)"
        }
    );
    let _ = writeln!(b, "client address   {}", options.listen);
    if let Some(s) = options.shard_listen {
        let _ = writeln!(b, "shard ports      {} + shard (announced by HELLO)", s);
    }
    let _ = writeln!(
        b,
        "admin            http://{0}/metrics  http://{0}/readyz",
        options.admin_listen
    );
    let _ = writeln!(
        b,
        "certificates     {}  (ca.pem, client.pem, client.key)",
        setup.certs.display()
    );
    let _ = writeln!(b, "configuration    {}", setup.config_file.display());
    let _ = writeln!(
        b,
        "rate limit       {} per requester and asset",
        options.rate_limit
    );
    let _ = writeln!(b);
    let _ = writeln!(b, "In another terminal:");
    let _ = writeln!(
        b,
        "  export PATH={}:\"$PATH\"",
        shell_word(&bin_dir.display().to_string())
    );
    let a = EXAMPLE_ASSET;
    for line in [
        format!("{cli} hello"),
        format!("{cli} register {a}"),
        format!("{cli} derive {a} --path \"m/44'/0'/0'/0'/7\" --json"),
        format!("{cli} status {a} --json"),
        format!("{cli} rotate {a}"),
        format!("{cli} assets"),
        format!("{cli} reconcile"),
    ] {
        let _ = writeln!(b, "  {line}");
    }
    let _ = writeln!(b, "Python (clients/python):");
    let _ = writeln!(b, "  pip install ./clients/python");
    let _ = writeln!(
        b,
        "  python3 -c 'import custody; print(custody.connect(\"{}\", certs={:?}).hello())'",
        options.listen,
        setup.certs.display().to_string()
    );
    let _ = writeln!(b, "Stop with Ctrl-C.");
    b
}

/// `s` quoted for a POSIX shell where it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"/._-+:,=@".contains(&c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_is_one_the_appliance_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let options = DevOptions {
            state_dir: Some(dir.path().join("state with space")),
            ..DevOptions::default()
        };
        let setup = prepare(&options).unwrap();
        let config = crate::config::load(&setup.config_file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.server.listen, options.listen);
        let grants = config
            .policy
            .access
            .grants(DEV_CLIENT)
            .expect("the dev client's roles");
        assert!(grants.operator && grants.admin && grants.auditor);
        assert!(grants.deriver.is_some());
    }

    #[test]
    fn a_kept_directory_keeps_its_certificates_and_seed() {
        let dir = tempfile::tempdir().unwrap();
        let options = DevOptions {
            state_dir: Some(dir.path().to_owned()),
            ..DevOptions::default()
        };
        let first = prepare(&options).unwrap();
        let ca = std::fs::read(first.certs.join("ca.pem")).unwrap();
        let seed = std::fs::read(first.dir.join("dev-seed.bin")).unwrap();
        let second = prepare(&options).unwrap();
        assert!(second.kept);
        assert_eq!(std::fs::read(second.certs.join("ca.pem")).unwrap(), ca);
        assert_eq!(
            std::fs::read(second.dir.join("dev-seed.bin")).unwrap(),
            seed
        );
    }

    #[test]
    fn a_bad_rate_limit_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let options = DevOptions {
            state_dir: Some(dir.path().join("never")),
            rate_limit: "lots".into(),
            ..DevOptions::default()
        };
        assert!(matches!(prepare(&options), Err(DevError::RateLimit(..))));
        assert!(!dir.path().join("never").exists());
    }

    #[test]
    fn the_banner_says_not_for_production_and_gives_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let options = DevOptions {
            state_dir: Some(dir.path().to_owned()),
            ..DevOptions::default()
        };
        let setup = prepare(&options).unwrap();
        let text = banner(&setup, &options, Path::new("/opt/custody/bin"));
        assert!(text.contains("NOT FOR PRODUCTION"));
        assert!(text.contains(&format!(
            "custody --certs {} register",
            setup.certs.display()
        )));
        assert!(text.contains("http://127.0.0.1:7480/metrics"));
        assert!(text.contains("export PATH=/opt/custody/bin:"));
    }

    #[test]
    fn shell_words_are_quoted_where_needed() {
        assert_eq!(shell_word("/tmp/a-b_c.d"), "/tmp/a-b_c.d");
        assert_eq!(shell_word("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }
}

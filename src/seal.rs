//! Where the root seed comes from. Providers:
//!
//! - `pkcs11` ([`pkcs11`]): the seed sealed by an AES-256 key inside an HSM, in a sealed
//!   file ([`blob`]) that `custody init` writes;
//! - `shamir` ([`shamir`]): no seed at rest; the appliance starts sealed and operators
//!   submit k of the n shares `custody init` wrote ([`cache::SeedCache::submit_share`]);
//! - `dev`: a plain seed file, for development and demos only, never production.
//!
//! Every `custody init` also splits the seed into k-of-n shares ([`shamir`]), so that
//! `custody recover` can rebuild it offline if the HSM is lost.

pub mod blob;
pub mod cache;
pub mod pkcs11;
pub mod shamir;
pub mod slot;

/// The synchronisation primitives [`slot`] is written against (loom swaps these).
pub(crate) mod sync {
    pub use std::sync::atomic::{AtomicU64, Ordering};
    pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};
}

use crate::config::SealConfig;
use crate::kdf::{RootSeed, SEED_LEN};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Errors of the seal layer. Never carries seed bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: a seed file must hold exactly {SEED_LEN} bytes, found {found}")]
    WrongLength { path: PathBuf, found: u64 },
    #[error("{path}: mode {mode:o} lets others read the seed; chmod 600 it")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{0}: already exists; refusing to overwrite a seed")]
    Exists(PathBuf),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error("HSM: {0}")]
    Hsm(String),
    #[error("sealed seed: {0}")]
    Sealed(String),
    #[error(transparent)]
    Blob(#[from] blob::BlobError),
    #[error(transparent)]
    Memory(#[from] crate::locked::LockError),
    #[error("{path}: {reason}")]
    Import { path: PathBuf, reason: String },
    #[error(transparent)]
    Shamir(#[from] shamir::ShamirError),
}

fn file_err(path: &Path, e: impl ToString) -> SealError {
    SealError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Unseals the root seed once with the configured provider (the appliance goes through
/// the seed cache instead, which calls the same provider every TTL).
pub fn unseal(config: &SealConfig) -> Result<RootSeed, SealError> {
    provider(config).unseal()
}

/// The configured provider, as the seed cache calls it (on its worker thread).
///
/// The seed may not change under a running appliance: every refresh must give the seed
/// the first unseal gave (same fingerprint), so a sealed file swapped on disk for another
/// one sealed by the same HSM key is refused, not served.
pub fn provider(config: &SealConfig) -> Box<dyn cache::SealProvider> {
    Box::new(Configured {
        config: config.clone(),
        module: None,
        first: None,
    })
}

struct Configured {
    config: SealConfig,
    /// The PKCS#11 module, loaded and initialised once and kept for the process (a
    /// module is not unloaded under its own background threads); a new session per call.
    module: Option<cryptoki::context::Pkcs11>,
    /// The fingerprint of the seed of the first unseal.
    first: Option<String>,
}

impl cache::SealProvider for Configured {
    fn unseal(&mut self) -> Result<RootSeed, SealError> {
        let seed = match &self.config {
            SealConfig::Dev { seed_file } => read_dev_seed(seed_file)?,
            SealConfig::Shamir { .. } => {
                return Err(SealError::Sealed(
                    "the shamir provider unseals only with shares (custody unseal)".into(),
                ))
            }
            SealConfig::Pkcs11 {
                pkcs11,
                sealed_seed_file,
            } => {
                let sealed = blob::SealedSeed::read(sealed_seed_file)?;
                let module = match self.module.take() {
                    Some(module) => module,
                    None => pkcs11::Hsm::load(pkcs11)?,
                };
                let opened = pkcs11::Hsm::open_with(&module, pkcs11)
                    .and_then(|hsm| hsm.unseal(&pkcs11.key_label, &sealed));
                match opened {
                    Ok(seed) => {
                        self.module = Some(module);
                        tracing::info!(
                            seed_id = %sealed.seed_id,
                            version = sealed.version,
                            fingerprint = %sealed.fingerprint,
                            token = %pkcs11.token_label,
                            "root seed unsealed by the HSM"
                        );
                        seed
                    }
                    Err(e) => {
                        // Start from a freshly loaded module next time (a token that was
                        // removed or a module that lost its state).
                        let _ = module.finalize();
                        return Err(e);
                    }
                }
            }
        };
        let fingerprint = blob::fingerprint(&seed);
        match &self.first {
            None => self.first = Some(fingerprint),
            Some(first) if *first != fingerprint => {
                return Err(SealError::Sealed(format!(
                    "the provider now gives a different seed (fingerprint {fingerprint}, this appliance started with {first}); refusing to switch seeds while running"
                )))
            }
            Some(_) => {}
        }
        Ok(seed)
    }
}

/// What `custody init` made: never the seed, only its names.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub seed_id: uuid::Uuid,
    pub fingerprint: String,
    /// The sealed seed (`pkcs11`) or the share set (`shamir`).
    pub seed_file: PathBuf,
    pub imported: bool,
    pub created_key: bool,
    pub threshold: u8,
    pub shares: u8,
    /// The share files written; empty when the shares are to be printed.
    pub share_files: Vec<PathBuf>,
}

/// Where `custody init` puts the shares.
#[derive(Clone, Debug)]
pub enum ShareOutput {
    /// One file per share in this directory (`share-<n>.txt`, mode 0600).
    Dir(PathBuf),
    /// Returned to the caller, to be printed once.
    Print,
}

/// How `custody init` splits the seed.
#[derive(Clone, Debug)]
pub struct SplitSpec {
    pub threshold: u8,
    pub shares: u8,
    pub output: ShareOutput,
}

/// The init ceremony for the configured provider. Makes a seed (the HSM's generator for
/// `pkcs11`, the operating system's for `shamir`) or takes the `import`ed one, splits it
/// into `split.shares` shares and checks that every run of k of them rebuilds it, then:
///
/// - `pkcs11`: seals it, unseals it again and compares, then writes the shares and the
///   sealed file (mode 0600, never over an existing file);
/// - `shamir`: writes the shares and the share set file (seed id, k, n, fingerprint).
///
/// Printed shares come back with the report; nothing is written if any check fails.
pub fn init(
    config: &SealConfig,
    import: Option<RootSeed>,
    create_key: bool,
    split: &SplitSpec,
) -> Result<(InitReport, Vec<shamir::Share>), SealError> {
    let seed_file = match config {
        SealConfig::Pkcs11 {
            sealed_seed_file, ..
        } => sealed_seed_file,
        SealConfig::Shamir { share_set_file } => share_set_file,
        SealConfig::Dev { .. } => {
            return Err(SealError::Hsm(
                "custody init needs seal.provider = \"pkcs11\" or \"shamir\" (the dev provider's seed is made by `custody dev-seed`)".into(),
            ))
        }
    };
    if seed_file.exists() {
        return Err(SealError::Exists(seed_file.clone()));
    }
    if create_key && !matches!(config, SealConfig::Pkcs11 { .. }) {
        return Err(SealError::Hsm(
            "--create-key makes a wrapping key on the HSM: only for seal.provider = \"pkcs11\""
                .into(),
        ));
    }
    if let ShareOutput::Dir(dir) = &split.output {
        if !dir.is_dir() {
            return Err(file_err(
                dir,
                "not a directory (create it first, mode 0700)",
            ));
        }
    }
    let imported = import.is_some();
    let seed_id = uuid::Uuid::new_v4();
    let (seed, sealed) = match config {
        SealConfig::Pkcs11 { pkcs11, .. } => {
            let hsm = pkcs11::Hsm::open(pkcs11)?;
            if create_key {
                hsm.create_wrapping_key(&pkcs11.key_label)?;
            }
            let seed = match import {
                Some(seed) => seed,
                None => hsm.generate_seed()?,
            };
            let sealed = hsm.seal(&pkcs11.key_label, &seed, seed_id, 1)?;
            // Prove the sealed file opens to the same seed before anyone relies on it.
            let reopened = hsm.unseal(&pkcs11.key_label, &sealed)?;
            if reopened.expose() != seed.expose() {
                return Err(SealError::Sealed(
                    "the sealed seed did not open to the seed that was sealed".into(),
                ));
            }
            (seed, Some(sealed))
        }
        _ => {
            let seed = match import {
                Some(seed) => seed,
                None => {
                    let mut seed = RootSeed::zeroed();
                    getrandom::fill(seed.expose_mut())
                        .map_err(|e| SealError::Random(e.to_string()))?;
                    seed
                }
            };
            (seed, None)
        }
    };
    let fingerprint = blob::fingerprint(&seed);
    let shares = shamir::split(&seed, seed_id, split.threshold, split.shares)?;
    drop(seed);
    let share_files = match &split.output {
        ShareOutput::Dir(dir) => shamir::write_share_files(dir, &shares)?,
        ShareOutput::Print => Vec::new(),
    };
    let written: Result<(), SealError> = match sealed {
        Some(sealed) => sealed.write_new(seed_file).map_err(SealError::from),
        None => shamir::ShareSet::new(seed_id, split.threshold, split.shares, fingerprint.clone())
            .write_new(seed_file)
            .map_err(SealError::from),
    };
    if let Err(e) = written {
        // Shares of a seed that was never kept are useless and still secret.
        shamir::remove_share_files(&share_files);
        return Err(e);
    }
    let report = InitReport {
        seed_id,
        fingerprint,
        seed_file: seed_file.clone(),
        imported,
        created_key: create_key,
        threshold: split.threshold,
        shares: split.shares,
        share_files,
    };
    let printed = match split.output {
        ShareOutput::Print => shares,
        ShareOutput::Dir(_) => Vec::new(),
    };
    Ok((report, printed))
}

/// Reads a seed to import: exactly 32 raw bytes, or 64 hex characters (a trailing
/// newline allowed). The file must not be readable by others.
pub fn read_import_seed(path: &Path) -> Result<RootSeed, SealError> {
    let err = |reason: String| SealError::Import {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > 1024 {
        return Err(err(format!("{} bytes: not a seed", meta.len())));
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
    parse_import_seed(&bytes).map_err(err)
}

/// Decodes an import file's bytes: exactly 32 raw bytes, or 64 hex characters with an
/// optional trailing newline. Pure; never panics (fuzzed).
pub fn parse_import_seed(bytes: &[u8]) -> Result<RootSeed, String> {
    let mut seed = RootSeed::zeroed();
    if bytes.len() == SEED_LEN {
        seed.expose_mut().copy_from_slice(bytes);
        return Ok(seed);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("neither {SEED_LEN} raw bytes nor hex text"))?
        .trim_end_matches(['\r', '\n']);
    if text.len() != 2 * SEED_LEN {
        return Err(format!(
            "neither {SEED_LEN} raw bytes nor {} hex characters",
            2 * SEED_LEN
        ));
    }
    let decoded = Zeroizing::new(crate::hex::decode(text).ok_or("not hexadecimal")?);
    seed.expose_mut().copy_from_slice(&decoded);
    Ok(seed)
}

fn read_dev_seed(path: &Path) -> Result<RootSeed, SealError> {
    let mut file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let meta = file.metadata().map_err(|e| file_err(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() != SEED_LEN as u64 {
        return Err(SealError::WrongLength {
            path: path.to_owned(),
            found: meta.len(),
        });
    }
    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    file.read_exact(&mut seed[..])
        .map_err(|e| file_err(path, e))?;
    Ok(RootSeed::from_bytes(*seed))
}

/// Writes `bytes` to a new file only its owner can read (mode 0600), flushed to disk.
/// Never overwrites: an existing file is an `AlreadyExists` error.
pub fn write_private_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Writes a new random development seed (mode 0600). Refuses to overwrite one.
pub fn write_dev_seed(path: &Path) -> Result<(), SealError> {
    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    getrandom::fill(&mut seed[..]).map_err(|e| SealError::Random(e.to_string()))?;
    write_private_new(path, &seed[..]).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => SealError::Exists(path.to_owned()),
        _ => file_err(path, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_seed_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.bin");
        write_dev_seed(&path).unwrap();
        assert!(matches!(write_dev_seed(&path), Err(SealError::Exists(_))));
        let cfg = SealConfig::Dev {
            seed_file: path.clone(),
        };
        let a = unseal(&cfg).unwrap();
        assert_ne!(a.expose(), &[0u8; 32]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(unseal(&cfg), Err(SealError::TooOpen { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [1u8; 31]).unwrap();
        assert!(matches!(
            unseal(&cfg),
            Err(SealError::WrongLength { found: 31, .. })
        ));
        // The error message never contains seed bytes: it has only the path and lengths.
    }
}

//! Where the root seed comes from. This build has the `dev` provider: a plain seed file,
//! for development and demos only. The HSM (PKCS#11) and Shamir providers implement the
//! same entry point.

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
}

fn file_err(path: &Path, e: impl ToString) -> SealError {
    SealError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Unseals the root seed with the configured provider.
pub fn unseal(config: &SealConfig) -> Result<RootSeed, SealError> {
    match config {
        SealConfig::Dev { seed_file } => read_dev_seed(seed_file),
    }
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

/// Writes a new random development seed (mode 0600). Refuses to overwrite one.
pub fn write_dev_seed(path: &Path) -> Result<(), SealError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    getrandom::fill(&mut seed[..]).map_err(|e| SealError::Random(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SealError::Exists(path.to_owned()),
            _ => file_err(path, e),
        })?;
    file.write_all(&seed[..]).map_err(|e| file_err(path, e))?;
    file.sync_all().map_err(|e| file_err(path, e))
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

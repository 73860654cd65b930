//! PEM files and the crypto provider: how every TLS user of custody (the server's mutual
//! TLS in [`crate::tls`], the client, TLS to PostgreSQL) reads certificates and keys.
//! A leaf: it depends on rustls only, so the configuration can check the files it names
//! without importing the modules that use them.

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A certificate or key file that cannot be used, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FileError {
    pub path: PathBuf,
    pub reason: String,
}

impl FileError {
    pub fn new(path: &Path, reason: impl ToString) -> FileError {
        FileError {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// The crypto provider custody uses everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| FileError::new(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileError::new(path, e))?;
    if certs.is_empty() {
        return Err(FileError::new(path, "no certificate in PEM file"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| FileError::new(path, e))
}

/// The trust anchors `certs` (read from `path`, which errors name).
pub fn root_store(
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<rustls::RootCertStore, FileError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| FileError::new(path, e))?;
    }
    Ok(roots)
}

/// The trust anchors of a PEM file.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, FileError> {
    root_store(path, read_certs(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let e = read_certs(Path::new("/nonexistent.pem")).unwrap_err();
        assert_eq!(e.path, Path::new("/nonexistent.pem"));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not PEM\n").unwrap();
        let e = read_certs(&empty).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        assert!(read_roots(&empty).is_err());
    }
}

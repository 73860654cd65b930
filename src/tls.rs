//! TLS 1.3 with rustls: the server's mutual-TLS configuration, the requester identity
//! taken from the client certificate, the client's configuration, and development
//! certificates (`custody dev-certs`).

use crate::bounds;
use crate::config::IdentitySource;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of the TLS layer, each naming the file or certificate at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("client certificate carries no usable identity ({0})")]
    NoIdentity(&'static str),
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The crypto provider custody uses everywhere: ring, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in PEM file"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

/// The server configuration: TLS 1.3 only, client certificates verified against
/// `client_ca` (required unless `require_client_cert` is false).
pub fn server_config(tls: &crate::config::Tls) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&tls.client_ca)?),
        provider.clone(),
    );
    if !tls.require_client_cert {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)?;
    Ok(Arc::new(config))
}

/// The requester named by a verified client certificate.
pub fn identity_of(
    cert: &CertificateDer<'_>,
    source: IdentitySource,
) -> Result<Arc<str>, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| TlsError::NoIdentity("certificate does not parse"))?;
    let name: Option<String> = match source {
        IdentitySource::CommonName => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentitySource::SubjectAltName => parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(s)
                    | x509_parser::extensions::GeneralName::URI(s) => Some((*s).to_owned()),
                    _ => None,
                })
            }),
    };
    let name = name.ok_or(TlsError::NoIdentity(match source {
        IdentitySource::CommonName => "no subject common name",
        IdentitySource::SubjectAltName => "no DNS or URI subject alternative name",
    }))?;
    let printable = name.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if name.is_empty() || name.len() > bounds::IDENTITY_TEXT_BYTES_MAX || !printable {
        return Err(TlsError::NoIdentity(
            "identity is empty, too long or not printable ASCII",
        ));
    }
    Ok(Arc::from(name))
}

/// The identity recorded for a client without a certificate (when that is allowed).
pub const ANONYMOUS: &str = "anonymous";

/// A client configuration: trusts `ca`, presents `cert` and `key`.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(read_certs(cert)?, read_key(key)?)?;
    Ok(Arc::new(config))
}

/// What `custody dev-certs` writes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DevCerts {
    pub fn in_dir(dir: &Path) -> DevCerts {
        DevCerts {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// Writes a development CA, a server certificate (localhost, 127.0.0.1, ::1) and a client
/// certificate with common name `client_cn`, valid for a year. Keys are written mode 0600.
/// For local use only: the CA key sits beside the certificates.
pub fn write_dev_certs(dir: &Path, client_cn: &str) -> Result<DevCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let paths = DevCerts::in_dir(dir);

    let year = 1970 + (crate::audit::now_ms() / 1000 / 31_556_952) as i32;
    let validity = |p: &mut CertificateParams| {
        p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
    };

    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.distinguished_name.push(
        DnType::CommonName,
        "custody development CA (not for production)",
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;

    let server_key = KeyPair::generate().map_err(gen)?;
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).map_err(gen)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "custody");
    server
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    server
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(gen)?;

    let client_key = KeyPair::generate().map_err(gen)?;
    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    client
        .distinguished_name
        .push(DnType::CommonName, client_cn);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client);
    let client_cert = client
        .signed_by(&client_key, &ca_cert, &ca_key)
        .map_err(gen)?;

    write_file(&paths.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&paths.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&paths.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.server_key,
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&paths.client_cert, client_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &paths.client_key,
        client_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(paths)
}

/// Writes a file with `mode`, replacing any previous file atomically.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

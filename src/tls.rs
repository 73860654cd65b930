//! TLS 1.3 with rustls: the server's mutual-TLS configuration, the requester identity
//! taken from the client certificate, the client's configuration, and development
//! certificates (`custody dev-certs`). `stream` is the server side of a connection.

pub mod stream;

use crate::bounds;
use crate::config::IdentitySource;
use rustls_pki_types::CertificateDer;
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
    #[error("{key} is not the private key of the certificate in {cert}: the two do not belong together (tls.cert, tls.key); install the key the certificate was issued for")]
    KeyMismatch { cert: PathBuf, key: String },
    #[error("{0}")]
    KeySource(String),
    #[error("{path}: the certificate \"{subject}\" {problem} (valid from {not_before} until {not_after}); install a current certificate and start again, or reload")]
    Validity {
        path: PathBuf,
        subject: String,
        problem: &'static str,
        not_before: String,
        not_after: String,
    },
}

use crate::certs::{provider, read_certs, read_key};

impl From<crate::certs::FileError> for TlsError {
    fn from(e: crate::certs::FileError) -> TlsError {
        TlsError::File {
            path: e.path,
            reason: e.reason,
        }
    }
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    crate::certs::FileError::new(path, reason).into()
}

/// A certificate expiring sooner than this is logged as a warning at start and on every
/// reload (and `custody_tls_certificate_expiry_timestamp_seconds` lets an alert say so).
pub const CERTIFICATE_EXPIRY_WARNING_S: i64 = 30 * 24 * 3600;

/// How far ahead of this host's clock a certificate's start of validity may be: clock
/// skew between the issuer and this host.
pub const NOT_BEFORE_SKEW_S: i64 = 300;

/// The server's certificate, as the logs and metrics describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    pub subject: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// The server's TLS configuration and what its certificate is.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub certificate: CertificateInfo,
}

/// `unix` (seconds) as an RFC 2822-like UTC date, as the certificate's own fields print.
pub fn format_unix(unix: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix.to_string())
}

/// The validity of a DER certificate at `now` (Unix seconds): its description, or why it
/// is not valid.
fn check_validity(
    path: &Path,
    cert: &CertificateDer<'_>,
    now: i64,
) -> Result<CertificateInfo, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| file_err(path, format!("certificate does not parse: {e}")))?;
    let validity = parsed.validity();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let subject = parsed.subject().to_string();
    // A certificate issued moments ago on a host whose clock is a little behind (or a
    // boot before the clock is synchronised) is accepted, and said so.
    if now < from && now + NOT_BEFORE_SKEW_S >= from {
        tracing::warn!(
            path = %path.display(),
            seconds_early = from - now,
            "the certificate is not valid yet by this host's clock, within the tolerated skew: check the clock (NTP)"
        );
    }
    let problem = if now + NOT_BEFORE_SKEW_S < from {
        Some("is not valid yet")
    } else if now > until {
        Some("has expired")
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(TlsError::Validity {
            path: path.to_owned(),
            subject,
            problem,
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(CertificateInfo {
        subject,
        serial: parsed.raw_serial_as_string().replace(':', ""),
        not_after: until,
    })
}

/// The client CA bundle, refused when none of its certificates is valid now (no client
/// could connect); an expired one beside valid ones is only logged.
fn client_roots(path: &Path, now: i64) -> Result<rustls::RootCertStore, TlsError> {
    let certs = read_certs(path)?;
    let mut valid = 0;
    let mut first_problem = None;
    for cert in &certs {
        match check_validity(path, cert, now) {
            Ok(_) => valid += 1,
            Err(e) => {
                tracing::warn!(error = %e, "a certificate of tls.client_ca is not valid now");
                first_problem.get_or_insert(e);
            }
        }
    }
    if valid == 0 {
        if let Some(e) = first_problem {
            return Err(e);
        }
    }
    Ok(crate::certs::root_store(path, certs)?)
}

/// The server configuration: TLS 1.3 only, client certificates verified against
/// `client_ca` (required unless `require_client_cert` is false). Refused, with the file
/// and the fix, when the server certificate is expired or not yet valid, when the key is
/// not the certificate's, or when no client CA certificate is valid; a certificate
/// expiring within [`CERTIFICATE_EXPIRY_WARNING_S`] is logged.
pub fn server_config(tls: &crate::config::Tls) -> Result<ServerTls, TlsError> {
    server_config_at(tls, crate::audit::now_ms() as i64 / 1000)
}

/// [`server_config`] at `now` (Unix seconds).
pub fn server_config_at(tls: &crate::config::Tls, now: i64) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let chain = read_certs(&tls.cert)?;
    let certificate = check_validity(&tls.cert, &chain[0], now)?;
    let key = read_key(&tls.key.path().map_err(TlsError::KeySource)?)?;
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots(&tls.client_ca, now)?),
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
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: tls.cert.clone(),
                key: tls.key.to_string(),
            },
            e => TlsError::Config(e),
        })?;
    if certificate.not_after - now < CERTIFICATE_EXPIRY_WARNING_S {
        tracing::warn!(
            cert = %tls.cert.display(),
            subject = %certificate.subject,
            days_left = (certificate.not_after - now) / 86_400,
            "the server certificate expires soon: install a new one and reload (systemctl reload custodyd)"
        );
    }
    Ok(ServerTls {
        config: Arc::new(config),
        certificate,
    })
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
        .with_root_certificates(crate::certs::read_roots(ca)?)
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
    write_dev_certs_with(dir, client_cn, &[])
}

/// [`write_dev_certs`], and a client certificate from the same CA for each name of
/// `more_clients`, as `DIR/clients/NAME.pem` and `NAME.key` (other identities, for tests
/// and the flood bench: an identity with no role, a second deriver).
pub fn write_dev_certs_with(
    dir: &Path,
    client_cn: &str,
    more_clients: &[&str],
) -> Result<DevCerts, TlsError> {
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

    let client = |cn: &str| -> Result<(rcgen::Certificate, KeyPair), TlsError> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params);
        let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(gen)?;
        Ok((cert, key))
    };
    let (client_cert, client_key) = client(client_cn)?;
    if !more_clients.is_empty() {
        let clients = dir.join("clients");
        std::fs::create_dir_all(&clients).map_err(|e| file_err(&clients, e))?;
        for name in more_clients {
            let (cert, key) = client(name)?;
            write_file(
                &clients.join(format!("{name}.pem")),
                cert.pem().as_bytes(),
                0o644,
            )?;
            write_file(
                &clients.join(format!("{name}.key")),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
        }
    }

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

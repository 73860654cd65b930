//! TLS to PostgreSQL with rustls, in the three modes an operator knows from libpq's
//! `sslmode`:
//!
//! - `disable`: plain TCP (a local server on loopback or a private link);
//! - `require`: TLS, but the server's certificate is not checked (encryption against a
//!   passive listener only; an active attacker can impersonate the server);
//! - `verify-full`: TLS, the certificate must chain to `sslrootcert` and name the host
//!   the config gives (DNS name or IP address). The mode for a remote server.
//!
//! tokio-postgres sends PostgreSQL's `SSLRequest` and hands the stream to [`PgTlsConnect`]
//! once the server agrees; a server that refuses TLS fails the connection in both TLS
//! modes (there is no silent fallback to plain text).

use crate::config::{PgSslMode as SslMode, PgTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// The connector for one connection to the server named `server_name` (its certificate
/// must name it in `verify-full`; sent as SNI), secured as `tls` says (`None` when TLS is
/// disabled). The trust anchors were read with the configuration; this builds the rustls
/// client from them, with no file read.
pub(crate) fn connector(
    tls: &PgTls,
    server_name: &ServerName<'static>,
) -> Result<Option<PgTlsConnect>, rustls::Error> {
    let provider = crate::certs::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut client = match (tls.mode(), tls.roots()) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Require, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UnverifiedServer(provider)))
            .with_no_client_auth(),
        (SslMode::VerifyFull, Some(roots)) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        (SslMode::VerifyFull, None) => {
            return Err(rustls::Error::General(
                "sslmode verify-full without trust anchors".into(),
            ))
        }
    };
    // PostgreSQL 17 checks the ALPN name on direct TLS; older servers ignore it.
    client.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(PgTlsConnect {
        client: Arc::new(client),
        server_name: server_name.clone(),
    }))
}

/// `require`: any certificate is accepted, but the handshake signatures are still
/// checked against it (so the session is bound to the key the server showed).
#[derive(Debug)]
struct UnverifiedServer(Arc<CryptoProvider>);

impl ServerCertVerifier for UnverifiedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One TLS handshake over the stream tokio-postgres hands over after `SSLRequest`.
pub(crate) struct PgTlsConnect {
    client: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>>>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.client);
        Box::pin(async move {
            let tls = connector.connect(self.server_name, stream).await?;
            Ok(PgTlsStream(tls))
        })
    }
}

/// A TLS session to PostgreSQL.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> PgTlsStream<S> {
    /// The negotiated protocol version, for logs.
    pub fn protocol(&self) -> Option<rustls::ProtocolVersion> {
        self.0.get_ref().1.protocol_version()
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for PgTlsStream<S>
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for PgTlsStream<S>
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// RFC 5929 `tls-server-end-point`: the hash of the server's certificate, so SCRAM
    /// authentication (`SCRAM-SHA-256-PLUS`) is bound to this TLS session.
    fn channel_binding(&self) -> ChannelBinding {
        let Some(cert) = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return ChannelBinding::none();
        };
        match end_point_hash(cert.as_ref()) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// The certificate's hash with its signature's hash function (SHA-256 for MD5, SHA-1 and
/// SHA-256), as RFC 5929 section 4.1 says; `None` for signatures without one (Ed25519).
fn end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(der).to_vec()),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(der).to_vec()),
        // Ed25519, Ed448: no hash function of their own
        "1.3.101.112" | "1.3.101.113" => None,
        // RSASSA-PSS names its hash in parameters; SHA-256 is what PostgreSQL itself uses
        // for it when the parameters ask for SHA-256, the usual case.
        _ => Some(sha2::Sha256::digest(der).to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_gets_its_connector() {
        let name = ServerName::try_from("10.1.2.3").unwrap();
        assert!(connector(&PgTls::disabled(), &name).unwrap().is_none());
        let require = PgTls::new(SslMode::Require, None).unwrap();
        assert!(connector(&require, &name).unwrap().is_some());
    }

    #[test]
    fn end_point_hash_follows_the_signature_hash() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            end_point_hash(&der).unwrap(),
            sha2::Sha384::digest(&der).to_vec()
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            end_point_hash(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
    }
}

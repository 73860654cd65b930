//! What each new connection is accepted with: the TLS acceptor and the connection limits,
//! published to every core and replaced whole by a reload ([`crate::reload`]).

use crate::config::{ConnectionLimits, IdentitySource};
use crate::tls;
use std::sync::Arc;
use std::time::Duration;

/// What a reload (SIGHUP, POLICY_RELOAD) replaces for the connections, whole: the TLS
/// acceptor (certificate, key, client CA, identity source) and the connection limits.
/// A handshake uses the settings in force when it starts, so a connection established
/// before a reload keeps its certificate; the limits apply from the next accept or request.
pub struct ConnectionSettings {
    pub acceptor: Arc<rustls::ServerConfig>,
    pub identity: IdentitySource,
    pub require_client_cert: bool,
    pub handshake_timeout: Duration,
    pub limits: ConnectionLimits,
    /// The server certificate presented.
    pub certificate: tls::CertificateInfo,
}

impl ConnectionSettings {
    /// The settings `config` asks for: its TLS files read and checked (blocking: off the
    /// executors).
    pub fn from_config(
        config: &crate::config::Config,
    ) -> Result<ConnectionSettings, tls::TlsError> {
        let server = tls::server_config(&config.tls)?;
        Ok(ConnectionSettings {
            acceptor: server.config,
            identity: config.tls.identity,
            require_client_cert: config.tls.require_client_cert,
            handshake_timeout: config.tls.handshake_timeout,
            limits: config.limits.connection.clone(),
            certificate: server.certificate,
        })
    }
}

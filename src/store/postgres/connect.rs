//! Connecting: a connection opened from the current glommio executor and driven there
//! (through [`TokioIo`]), with the TLS mode asked for, the driver's settings, and an
//! executor of its own for code outside the appliance's cores.

use super::*;

/// A connection (and its first queries) slower than this counts as failed.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait after a failed connection attempt; doubled after each further failure.
pub(super) const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between connection attempts.
pub(super) const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl PgConfig {
    /// The driver's settings (the address is not among them: connect with `connect_raw`).
    pub fn driver_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.dbname(&self.dbname)
            .user(&self.user)
            .application_name("custodyd");
        if let Some(p) = &self.password {
            c.password(p.as_bytes());
        }
        c.ssl_mode(match self.tls.mode() {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        c
    }
}
pub(super) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // tokio-postgres errors carry the server's message; they never include parameters.
    StoreError::Unavailable(format!("postgres: {e}"))
}

/// Opens a connection from the current glommio executor and drives it there.
pub async fn connect(config: &PgConfig) -> Result<Client, StoreError> {
    let tcp = glommio::net::TcpStream::connect(config.addr)
        .await
        .map_err(|e| StoreError::Unavailable(format!("connect to {}: {e}", config.addr)))?;
    let _ = tcp.set_nodelay(true);
    let driver = config.driver_config();
    let connector = crate::store::pg_tls::connector(&config.tls)
        .map_err(|e| StoreError::Unavailable(format!("postgres TLS client: {e}")))?;
    match connector {
        None => {
            let (client, connection) = driver
                .connect_raw(TokioIo(tcp), NoTls)
                .await
                .map_err(pg_err)?;
            drive(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = driver
                .connect_raw(TokioIo(tcp), tls)
                .await
                .map_err(|e| tls_err(config, e))?;
            drive(connection);
            Ok(client)
        }
    }
}

/// Runs a connection's I/O on the current executor until the client or server ends it.
pub(super) fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    glommio::spawn_local(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    })
    .detach();
}

/// A failed TLS connection, saying which `sslmode` was asked for (a certificate that
/// does not verify shows up here with rustls's reason).
pub(super) fn tls_err(config: &PgConfig, e: tokio_postgres::Error) -> StoreError {
    use std::error::Error as _;
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    StoreError::Unavailable(format!(
        "postgres at {} with sslmode {}: {reason}",
        config.addr,
        config.tls.mode().as_str()
    ))
}

/// glommio's streams speak the futures I/O traits; tokio-postgres speaks tokio's.
pub struct TokioIo<S>(pub S);

impl<S: futures_lite::AsyncRead + Unpin> tokio::io::AsyncRead for TokioIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        match Pin::new(&mut self.0).poll_read(cx, unfilled) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: futures_lite::AsyncWrite + Unpin> tokio::io::AsyncWrite for TokioIo<S> {
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
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// Runs a future on a glommio executor of a thread of its own and waits for it. A
/// PostgreSQL connection is driven by the executor that made it, so code outside the
/// appliance's cores (start-up, `custodyd migrate`, the load harness, tests) talks to the
/// database this way.
pub fn on_own_executor<T, F>(
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || -> Result<T, StoreError> {
            let ex = glommio::LocalExecutorBuilder::default()
                .io_memory(256 * 1024)
                .make()
                .map_err(|e| StoreError::Unavailable(format!("cannot start an executor: {e}")))?;
            Ok(ex.run(make()))
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start a thread: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("thread {name} panicked"))))
}

impl PgConfig {
    /// Connection settings from a `postgresql://user[:password]@host[:port]/dbname` URL
    /// (tests and the load harness; the appliance reads its config file).
    pub fn from_url(url: &str) -> Result<PgConfig, StoreError> {
        use std::net::ToSocketAddrs;
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?;
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = parsed.get_ports().first().copied().unwrap_or(5432);
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| StoreError::Unavailable(format!("{host}:{port} does not resolve")))?;
        Ok(PgConfig {
            addr,
            dbname: parsed.get_dbname().unwrap_or("postgres").to_owned(),
            user: parsed.get_user().unwrap_or("postgres").to_owned(),
            password: parsed
                .get_password()
                .map(|p| zeroize::Zeroizing::new(String::from_utf8_lossy(p).into_owned())),
            allow_unsafe_durability: false,
            owner_lease: Duration::from_secs(10),
            partition_check: Duration::from_secs(3600),
            tls: match parsed.get_ssl_mode() {
                // `prefer` is the driver's default when the URL names none; custody does
                // not fall back silently, so it means plain TCP here.
                tokio_postgres::config::SslMode::Require => {
                    PgTls::new(SslMode::Require, &host, None)
                        .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?
                }
                _ => PgTls::disabled(),
            },
        })
    }
}

//! Connecting: a connection opened from the current glommio executor and driven there
//! (through [`TokioIo`]), with the TLS mode asked for, the driver's settings, and an
//! executor of its own for code outside the appliance's cores.

use super::*;
use crate::config::{PgHost, PreferredHost};

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

/// Opens a connection to the writable server among the configured hosts, from the
/// current glommio executor, and drives it there.
///
/// The connection is made with `connect_raw` over the executor's own TCP stream, so
/// libpq's `target_session_attrs=read-write` is not available from the driver; this does
/// what it does: the hosts are tried in order (the one that answered last first, see
/// [`PgConfig::host_order`]), each within [`CONNECT_TIMEOUT`], and a server that says
/// `transaction_read_only` is `on` (a hot standby, or a demoted primary) is passed over.
/// When none will do, the error names each host and why.
pub async fn connect(config: &PgConfig) -> Result<Client, StoreError> {
    let mut skipped = Vec::with_capacity(config.hosts.len());
    for i in config.host_order() {
        let host = &config.hosts[i];
        match connect_writable(config, host).await {
            Ok(client) => {
                config.preferred_host.set(i);
                return Ok(client);
            }
            Err(why) => skipped.push(format!("{host}: {why}")),
        }
    }
    if skipped.is_empty() {
        return Err(StoreError::Unavailable(
            "no PostgreSQL host is configured".into(),
        ));
    }
    Err(StoreError::Unavailable(format!(
        "no writable PostgreSQL server: {}",
        skipped.join("; ")
    )))
}

/// Why a host was passed over by [`connect`].
#[derive(Debug, thiserror::Error)]
enum Skipped {
    #[error("{}", io_reason(.0))]
    Connect(io::Error),
    #[error("no answer within {} ms", CONNECT_TIMEOUT.as_millis())]
    TimedOut,
    #[error("read-only (a standby)")]
    ReadOnly,
    #[error("{0}")]
    Postgres(String),
}

/// An I/O error as an operator reads it: "connection refused" without the OS's number.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => e.to_string(),
    }
}

/// A connection to `host`, if it answers within [`CONNECT_TIMEOUT`] and takes writes.
async fn connect_writable(config: &PgConfig, host: &PgHost) -> Result<Client, Skipped> {
    let attempt =
        futures_lite::future::or(async { Some(open_and_check(config, host).await) }, async {
            glommio::timer::sleep(CONNECT_TIMEOUT).await;
            None
        })
        .await;
    attempt.unwrap_or(Err(Skipped::TimedOut))
}

async fn open_and_check(config: &PgConfig, host: &PgHost) -> Result<Client, Skipped> {
    let client = open(config, host).await?;
    if read_only(&client).await? {
        return Err(Skipped::ReadOnly);
    }
    Ok(client)
}

/// Whether the server refuses writes in this session: what libpq and tokio-postgres ask
/// for `target_session_attrs=read-write`. A standby, or a primary demoted to one, says
/// `on`.
async fn read_only(client: &Client) -> Result<bool, Skipped> {
    let messages = client
        .simple_query("SHOW transaction_read_only")
        .await
        .map_err(|e| Skipped::Postgres(format!("postgres: {e}")))?;
    let value = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    });
    match value {
        Some(v) => Ok(v == "on"),
        None => Err(Skipped::Postgres(
            "SHOW transaction_read_only returned no value".into(),
        )),
    }
}

/// TCP, then TLS as `sslmode` says (verifying `host`'s name), then the startup.
async fn open(config: &PgConfig, host: &PgHost) -> Result<Client, Skipped> {
    let tcp = glommio::net::TcpStream::connect(host.addr)
        .await
        .map_err(|e| Skipped::Connect(e.into()))?;
    let _ = tcp.set_nodelay(true);
    let driver = config.driver_config();
    let name = host
        .server_name()
        .map_err(|e| Skipped::Postgres(format!("postgres TLS client: {e}")))?;
    let connector = crate::store::pg_tls::connector(&config.tls, &name)
        .map_err(|e| Skipped::Postgres(format!("postgres TLS client: {e}")))?;
    match connector {
        None => {
            let (client, connection) = driver
                .connect_raw(TokioIo(tcp), NoTls)
                .await
                .map_err(|e| Skipped::Postgres(format!("postgres: {e}")))?;
            drive(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = driver
                .connect_raw(TokioIo(tcp), tls)
                .await
                .map_err(|e| Skipped::Postgres(tls_reason(config, e)))?;
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
fn tls_reason(config: &PgConfig, e: tokio_postgres::Error) -> String {
    use std::error::Error as _;
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    format!("sslmode {}: {reason}", config.tls.mode().as_str())
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
    /// Connection settings from a `postgresql://user[:password]@host[:port][,host[:port]…]/dbname`
    /// URL or a `host=a,b port=5432,5433 …` string (tests and the load harness; the
    /// appliance reads its config file). Each host resolves now, as the config's do.
    pub fn from_url(url: &str) -> Result<PgConfig, StoreError> {
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?;
        let hosts = url_hosts(&parsed)?;
        Ok(PgConfig {
            hosts,
            dbname: parsed.get_dbname().unwrap_or("postgres").to_owned(),
            user: parsed.get_user().unwrap_or("postgres").to_owned(),
            password: parsed
                .get_password()
                .map(|p| zeroize::Zeroizing::new(String::from_utf8_lossy(p).into_owned())),
            allow_unsafe_durability: false,
            owner_lease: Duration::from_secs(10),
            owner_lease_margin: Duration::from_millis(500),
            partition_check: Duration::from_secs(3600),
            tls: match parsed.get_ssl_mode() {
                // `prefer` is the driver's default when the URL names none; custody does
                // not fall back silently, so it means plain TCP here.
                tokio_postgres::config::SslMode::Require => PgTls::new(SslMode::Require, None)
                    .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?,
                _ => PgTls::disabled(),
            },
            preferred_host: PreferredHost::default(),
        })
    }
}

/// The URL's hosts, each with its port as the driver pairs them (one port for all, or one
/// each; none is 5432), resolved; 127.0.0.1 when the URL names none.
fn url_hosts(parsed: &tokio_postgres::Config) -> Result<Vec<PgHost>, StoreError> {
    use std::net::ToSocketAddrs;
    let mut names: Vec<String> = Vec::new();
    for h in parsed.get_hosts() {
        match h {
            tokio_postgres::config::Host::Tcp(h) => names.push(h.clone()),
            #[allow(unreachable_patterns)]
            _ => {
                return Err(StoreError::Unavailable(
                    "database URL: only TCP hosts are supported".into(),
                ))
            }
        }
    }
    if names.is_empty() {
        names.push("127.0.0.1".into());
    }
    let ports = parsed.get_ports();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let port = match ports.len() {
                0 => 5432,
                1 => ports[0],
                _ => ports.get(i).copied().ok_or_else(|| {
                    StoreError::Unavailable("database URL: fewer ports than hosts".into())
                })?,
            };
            let name = name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let addr = (name.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    StoreError::Unavailable(format!("{name}:{port} does not resolve"))
                })?;
            Ok(PgHost { name, addr })
        })
        .collect()
}

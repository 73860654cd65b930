//! Several PostgreSQL hosts (`store.postgres_host = "a,b"`): `connect` passes over a host
//! that refuses the connection and a server that is read-only (a hot standby, or a
//! demoted primary), reaches the writable one, and tries it first the next time.
//!
//! A read-only server is had without a replica in two ways: a database whose
//! `default_transaction_read_only` is on (the real server then answers `SHOW
//! transaction_read_only` with `on`), and a stand-in that speaks just enough of the
//! protocol to say `on`, so that a read-only host and the writable one can be listed
//! together.

mod common;

use common::{on_executor, PgDatabase};
use custody::config::PgHost;
use custody::store::postgres::{self, PgConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

/// The test server's settings, or `None` (skip) when it is not given.
fn admin() -> Option<PgConfig> {
    if std::env::var("CUSTODY_TEST_DATABASE_URL").is_err() {
        common::missing("PostgreSQL", &"CUSTODY_TEST_DATABASE_URL is not set");
        return None;
    }
    Some(PgDatabase::admin_config())
}

/// `config` with `hosts` in place of its own, remembering no host.
fn with_hosts(config: &PgConfig, hosts: Vec<PgHost>) -> PgConfig {
    PgConfig {
        hosts,
        preferred_host: Default::default(),
        ..config.clone()
    }
}

/// Connects and asks which port the server is on (`Err`: `connect`'s message).
fn server_port(config: &PgConfig) -> Result<i32, String> {
    let config = config.clone();
    on_executor(move || async move {
        let c = postgres::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        let row = c
            .query_one("SELECT current_setting('port')::int", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, i32>(0))
    })
}

/// A port nothing listens on: one just bound and let go.
fn dead_host() -> PgHost {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    PgHost::from_addr(addr)
}

#[test]
fn a_refused_host_is_passed_over_and_the_live_one_tried_first_next_time() {
    let Some(admin) = admin() else { return };
    let live = admin.hosts[0].clone();
    let config = with_hosts(&admin, vec![dead_host(), live.clone()]);
    assert_eq!(server_port(&config), Ok(i32::from(live.addr.port())));
    assert_eq!(
        config.host_order().collect::<Vec<_>>(),
        [1, 0],
        "the host that answered is tried first"
    );
    let clone = config.clone();
    assert_eq!(clone.preferred_host.get(2), 1, "clones share it");
}

#[test]
fn no_host_to_be_had_names_each_and_why() {
    let Some(admin) = admin() else { return };
    let (a, b) = (dead_host(), dead_host());
    let err = server_port(&with_hosts(&admin, vec![a.clone(), b.clone()])).unwrap_err();
    assert!(err.contains("no writable PostgreSQL server"), "{err}");
    for host in [a, b] {
        assert!(
            err.contains(&format!("{host}: connection refused")),
            "{err}"
        );
    }
}

#[test]
fn a_read_only_server_is_passed_over() {
    let Some(db) = PgDatabase::create("read_only") else {
        return;
    };
    let name = db.config.dbname.clone();
    db.sql(vec![format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    )]);
    // The real server, read-only for this database: passed over, and said so.
    let err = server_port(&db.config).unwrap_err();
    let host = &db.config.hosts[0];
    assert!(
        err.contains(&format!("{host}: read-only (a standby)")),
        "{err}"
    );
    // The server's own database is writable: after a read-only host, it is the one.
    let admin = PgDatabase::admin_config();
    let standby = ReadOnlyServer::start();
    let config = with_hosts(&admin, vec![standby.host(), admin.hosts[0].clone()]);
    assert_eq!(
        server_port(&config),
        Ok(i32::from(admin.hosts[0].addr.port()))
    );
    assert_eq!(config.preferred_host.get(2), 1);
    assert!(standby.answered(), "the stand-in was asked and said on");
}

/// A stand-in for a hot standby: it accepts one connection, authenticates anyone, and
/// answers every query as `SHOW transaction_read_only` on a standby does (`on`).
struct ReadOnlyServer {
    addr: SocketAddr,
    thread: std::thread::JoinHandle<bool>,
}

impl ReadOnlyServer {
    fn start() -> ReadOnlyServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return false;
            };
            serve_read_only(&mut s).is_ok()
        });
        ReadOnlyServer { addr, thread }
    }

    fn host(&self) -> PgHost {
        PgHost::from_addr(self.addr)
    }

    /// Whether it took a connection and answered a query.
    fn answered(self) -> bool {
        self.thread.join().unwrap_or(false)
    }
}

/// The startup (no TLS, no password), then one query answered `on`.
fn serve_read_only(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut startup)?;
    s.write_all(&message(b'R', &0u32.to_be_bytes()))?; // AuthenticationOk
    s.write_all(&message(b'Z', b"I"))?; // ReadyForQuery
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag)?;
    s.read_exact(&mut len)?;
    let mut query = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut query)?;
    assert_eq!(tag[0], b'Q');
    let mut fields = 1u16.to_be_bytes().to_vec();
    fields.extend_from_slice(b"transaction_read_only\0");
    fields.extend_from_slice(&0u32.to_be_bytes()); // table
    fields.extend_from_slice(&0u16.to_be_bytes()); // column
    fields.extend_from_slice(&25u32.to_be_bytes()); // text
    fields.extend_from_slice(&(-1i16).to_be_bytes());
    fields.extend_from_slice(&(-1i32).to_be_bytes());
    fields.extend_from_slice(&0u16.to_be_bytes()); // text format
    s.write_all(&message(b'T', &fields))?;
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&2u32.to_be_bytes());
    row.extend_from_slice(b"on");
    s.write_all(&message(b'D', &row))?;
    s.write_all(&message(b'C', b"SHOW\0"))?;
    s.write_all(&message(b'Z', b"I"))?;
    // Until the client hangs up (a Terminate, then the end of the stream).
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(())
}

/// A backend message: its tag, its length (with itself), its body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

//! A throwaway PostgreSQL primary and its synchronous streaming replica, each a cluster of
//! its own under a temp dir on free loopback ports, made with the server's own tools
//! (`initdb`, `pg_basebackup`, `pg_ctl`) and stopped and removed when the guard drops, a
//! failed test's too.
//!
//! Why not a replica of the machine's shared server (5432): a primary whose
//! `synchronous_standby_names` names a replica holds every commit until the replica has
//! it, so a replica that dies (and a failover test kills and promotes things) would hang
//! every other PostgreSQL test running meanwhile; and a promoted replica cannot be made a
//! standby again without a rebuild. A pair of its own per test costs about 3 s and leaves
//! the shared server as it was.
//!
//! Run as root (CI), the tools run as the `postgres` user (`initdb` refuses root);
//! otherwise as the current user.

use super::{free_ports, missing, PgDatabase};
use custody::store::postgres::PgConfig;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The superuser `initdb` makes; the pair's `pg_hba.conf` trusts every loopback user.
const SUPERUSER: &str = "custody";
/// The replica's `application_name`, which the primary's `synchronous_standby_names` names.
const REPLICA_NAME: &str = "custody_replica";
/// How long the replica may take to stream synchronously once started.
const SYNC_WAIT: Duration = Duration::from_secs(30);

/// The two servers: [`PRIMARY`] and [`REPLICA`] index [`PgPair::ports`].
pub const PRIMARY: usize = 0;
pub const REPLICA: usize = 1;

pub struct PgPair {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Run the tools as the `postgres` user (this process is root).
    as_postgres: bool,
    pub ports: [u16; 2],
}

impl PgPair {
    /// A primary streaming synchronously to its replica, or `None` (with the notice) when
    /// the server's tools are not here, unless `CUSTODY_REQUIRE_SERVICES=1`.
    pub fn start() -> Option<PgPair> {
        let bin = match server_bin() {
            Ok(bin) => bin,
            Err(why) => {
                missing("PostgreSQL server binaries (initdb, pg_ctl)", &why);
                return None;
            }
        };
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new()
            .prefix("custody-pgpair-")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            if let Err(why) = give_to_postgres(dir.path()) {
                missing("the postgres user (initdb refuses root)", &why);
                return None;
            }
        }
        let first = free_ports(2);
        let pair = PgPair {
            dir,
            bin,
            as_postgres,
            ports: [first, first + 1],
        };
        pair.make_primary();
        pair.make_replica();
        pair.make_synchronous();
        Some(pair)
    }

    /// A fresh database made on the primary (it replicates), whose config lists both
    /// servers: the primary first, or the replica first when `replica_first`.
    pub fn database(&self, name: &str, replica_first: bool) -> PgDatabase {
        let mut ports = self.ports;
        if replica_first {
            ports.reverse();
        }
        let url = format!(
            "postgresql://{SUPERUSER}@127.0.0.1:{},127.0.0.1:{}/postgres",
            ports[0], ports[1]
        );
        PgDatabase::new(PgConfig::from_url(&url).expect("pair URL"), name)
            .unwrap_or_else(|e| panic!("database {name} on the pair: {e}\n{}", self.logs()))
    }

    /// `pg_ctl stop -m immediate` of the primary: PostgreSQL's crash stop (no checkpoint,
    /// connections cut).
    pub fn crash_primary(&self) {
        let data = self.data(PRIMARY);
        self.pg_ctl(&["-D", &data, "-m", "immediate", "stop"]);
    }

    /// `pg_ctl promote` of the replica, waiting until it takes writes.
    pub fn promote_replica(&self) {
        let data = self.data(REPLICA);
        self.pg_ctl(&["-D", &data, "-w", "promote"]);
    }

    /// `SQL` on server `which` through psql: its rows, fields split on `|`.
    pub fn psql(&self, which: usize, sql: &str) -> Vec<Vec<String>> {
        let port = self.ports[which].to_string();
        let psql = self.bin.join("psql");
        let out = Command::new(psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} on {port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('|').map(str::to_owned).collect())
            .collect()
    }

    /// Both servers' logs, for a failure's message.
    pub fn logs(&self) -> String {
        ["primary", "replica"]
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")));
                format!("--- {n}.log\n{}", log.unwrap_or_default())
            })
            .collect()
    }

    fn make_primary(&self) {
        let data = self.data(PRIMARY);
        self.tool(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        // initdb's pg_hba.conf already trusts loopback replication connections.
        self.append_config(PRIMARY, &self.server_settings(PRIMARY));
        self.start_server(PRIMARY);
    }

    /// A base backup of the primary that streams from it as `REPLICA_NAME`.
    fn make_replica(&self) {
        let (data, port) = (self.data(REPLICA), self.ports[PRIMARY].to_string());
        let conninfo = format!("application_name={REPLICA_NAME}");
        self.tool(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                &conninfo,
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        self.append_config(REPLICA, &self.server_settings(REPLICA));
        self.start_server(REPLICA);
    }

    /// Commits on the primary wait for the replica's flush (set only now, so the base
    /// backup did not copy it: the promoted replica must not wait for a standby of its own).
    fn make_synchronous(&self) {
        let names =
            format!("ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ({REPLICA_NAME})'");
        self.psql(PRIMARY, &names);
        self.psql(PRIMARY, "SELECT pg_reload_conf()");
        let ask = format!(
            "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = '{REPLICA_NAME}'"
        );
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let rows = self.psql(PRIMARY, &ask);
            if rows == [["streaming", "sync"]] {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica is not a synchronous standby: {rows:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn server_settings(&self, which: usize) -> String {
        format!(
            // No Unix socket: every tool here connects over TCP, and a long temp dir
            // would pass the socket path's length limit.
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nsynchronous_commit = on\nfsync = on\n",
            self.ports[which],
        )
    }

    fn append_config(&self, which: usize, lines: &str) {
        use std::io::Write;
        let path = Path::new(&self.data(which)).join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("postgresql.conf");
        f.write_all(lines.as_bytes()).expect("postgresql.conf");
    }

    fn start_server(&self, which: usize) {
        let data = self.data(which);
        let log = self.dir.path().join(["primary.log", "replica.log"][which]);
        let log = log.display().to_string();
        self.pg_ctl(&["-D", &data, "-l", &log, "-w", "-t", "60", "start"]);
    }

    fn data(&self, which: usize) -> String {
        let name = ["primary", "replica"][which];
        self.dir.path().join(name).display().to_string()
    }

    fn pg_ctl(&self, args: &[&str]) {
        self.tool("pg_ctl", args);
    }

    /// Runs one of the server's tools (as `postgres` when root), which must succeed.
    fn tool(&self, name: &str, args: &[&str]) {
        let out = self
            .command(name, args)
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{name} {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    fn command(&self, name: &str, args: &[&str]) -> Command {
        let program = self.bin.join(name);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.args(args).current_dir(self.dir.path());
        c
    }
}

impl Drop for PgPair {
    /// Both servers stopped hard (whichever still runs) before the temp dir goes.
    fn drop(&mut self) {
        for which in [PRIMARY, REPLICA] {
            let data = self.data(which);
            let _ = self
                .command("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// The directory of `initdb` and `pg_ctl`: `CUSTODY_TEST_PG_BIN`, else Debian's
/// `/usr/lib/postgresql/<newest>/bin`.
fn server_bin() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("CUSTODY_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return match dir.join("initdb").exists() {
            true => Ok(dir),
            false => Err(format!(
                "CUSTODY_TEST_PG_BIN={} has no initdb",
                dir.display()
            )),
        };
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("/usr/lib/postgresql: {e} (set CUSTODY_TEST_PG_BIN)"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    versions
        .iter()
        .rev()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
        .find(|d| d.join("initdb").exists() && d.join("pg_basebackup").exists())
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/initdb (set CUSTODY_TEST_PG_BIN)".into())
}

/// Hands the temp dir to the `postgres` user, which runs the servers.
fn give_to_postgres(dir: &Path) -> Result<(), String> {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a NUL-terminated name; the record is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err("this process is root and there is no postgres user".into());
    }
    // SAFETY: pw is non-null and points at the C library's static record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(|e| format!("chown {} to postgres: {e}", dir.display()))
}

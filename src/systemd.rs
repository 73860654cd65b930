//! The systemd notify protocol (sd_notify(3)), without libsystemd: READY once the appliance
//! serves, STATUS lines an operator sees in `systemctl status`, STOPPING on SIGTERM, and
//! WATCHDOG pings while every executor is healthy, so a stuck core gets the unit restarted
//! (`WatchdogSec=`).
//!
//! The messages are datagrams to the socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`). Without that variable (not started by systemd
//! with `Type=notify`) every call does nothing. A failed send is logged at debug and never
//! stops the appliance: systemd's own timeouts notice a unit that stopped talking.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The shortest watchdog ping interval the appliance keeps (a setting below 2 s would
/// ping faster than the cores publish).
pub const WATCHDOG_PING_MIN: Duration = Duration::from_millis(500);

/// Unhealthy samples in a row after which the pings stop (a core that looks stale at one
/// instant is not yet stuck).
pub const WATCHDOG_BAD_SAMPLES: u32 = 2;

/// Where the notifications go.
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a notifier that does nothing when it is unset or unusable.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        match Self::connect(&name) {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                tracing::warn!(socket = ?name, error = %e, "NOTIFY_SOCKET is set but unusable: systemd will not hear READY or WATCHDOG");
                Notifier { target: None }
            }
        }
    }

    fn connect(
        name: &std::ffi::OsStr,
    ) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = name.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?
            }
            Some(b'/') => std::os::unix::net::SocketAddr::from_pathname(name)?,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "neither an absolute path nor an @abstract name",
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        Ok((socket, addr))
    }

    /// Whether systemd listens (started with `Type=notify`).
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` lines).
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!(error = %e, "sd_notify failed");
            }
        }
    }

    /// READY=1 with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A status line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// STOPPING=1 with a status line.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// A status is one line: a newline would start another assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// How often to sample the cores' health and ping the watchdog: a quarter of
/// `$WATCHDOG_USEC`, when it is set for this process (`$WATCHDOG_PID` unset or ours), so
/// that one bad sample does not leave a gap as long as `WatchdogSec` (the pings stop
/// after [`WATCHDOG_BAD_SAMPLES`] in a row). `None`: no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some((Duration::from_micros(usec) / 4).max(WATCHDOG_PING_MIN))
}

/// Pings the watchdog every `every` while `healthy` says every executor is alive; after
/// [`WATCHDOG_BAD_SAMPLES`] unhealthy samples in a row the pings stop (systemd then kills
/// and restarts the unit after `WatchdogSec=`) and the problem is logged once.
pub fn spawn_watchdog(
    notifier: std::sync::Arc<Notifier>,
    every: Duration,
    healthy: impl Fn() -> Result<(), String> + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("custody-watchdog".into())
        .spawn(move || {
            let mut bad = 0u32;
            loop {
                match healthy() {
                    Ok(()) => {
                        if bad >= WATCHDOG_BAD_SAMPLES {
                            tracing::warn!("every core is healthy again: watchdog pings resume");
                        }
                        bad = 0;
                        notifier.notify("WATCHDOG=1");
                    }
                    Err(problem) => {
                        bad = bad.saturating_add(1);
                        if bad < WATCHDOG_BAD_SAMPLES {
                            // One more ping: a single stale sample is not a stuck core.
                            notifier.notify("WATCHDOG=1");
                        } else if bad == WATCHDOG_BAD_SAMPLES {
                            tracing::error!(%problem, "a core is not healthy: watchdog pings stop, systemd will restart the appliance after WatchdogSec");
                        }
                    }
                }
                std::thread::sleep(every);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_a_quarter_of_the_setting_and_only_for_this_process() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_millis(7500))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_millis(7500))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(
            watchdog_interval_from(Some("100"), None, 7),
            Some(WATCHDOG_PING_MIN)
        );
    }

    #[test]
    fn messages_reach_a_path_socket_and_statuses_stay_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Notifier::connect(path.as_os_str()).unwrap()),
        };
        n.ready("serving\nSTOPPING=1");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving STOPPING=1");
    }

    #[test]
    fn an_abstract_socket_is_reached_and_a_relative_name_refused() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("custody-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some(Notifier::connect(std::ffi::OsStr::new(&format!("@{name}"))).unwrap()),
        };
        n.notify("WATCHDOG=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert!(Notifier::connect(std::ffi::OsStr::new("relative")).is_err());
    }
}

//! The admin listener (`server.admin_listen`): a thread of its own that answers one small
//! HTTP/1.x request per connection, `GET /metrics`, `GET /healthz` and `GET /readyz`, and
//! the request-head parser it uses (the fuzz target's entry).

use super::registry::Registry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Longest request head the admin listener reads.
const ADMIN_REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long the admin listener waits on one client's read or write.
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds the admin listener (a start-up failure if the address is taken) and serves it
/// on a thread of its own.
pub fn spawn_admin_listener(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("custody-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &registry) {
                            tracing::debug!(error = %e, "admin listener: request not answered");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin listener: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(bound)
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminRequest {
    Get {
        path: String,
        head: bool,
    },
    /// Not GET or HEAD.
    Method,
    Malformed,
}

/// Parses an HTTP/1.x request head (pure; the fuzz target's entry).
pub fn parse_request(head: &[u8]) -> AdminRequest {
    let Ok(text) = std::str::from_utf8(head) else {
        return AdminRequest::Malformed;
    };
    let Some(line) = text.split("\r\n").next() else {
        return AdminRequest::Malformed;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return AdminRequest::Malformed;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return AdminRequest::Malformed;
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    match method {
        "GET" => AdminRequest::Get { path, head: false },
        "HEAD" => AdminRequest::Get { path, head: true },
        _ => AdminRequest::Method,
    }
}

/// The fuzz target's entry: any bytes through the request-head parser; a GET's path
/// must be a prefix-free piece of the request line.
pub fn fuzz_decode(data: &[u8]) {
    if let AdminRequest::Get { path, .. } = parse_request(data) {
        assert!(path.starts_with('/') && !path.contains(' ') && !path.contains('?'));
    }
}

fn answer(mut s: TcpStream, registry: &Registry) -> std::io::Result<()> {
    s.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
    s.set_write_timeout(Some(ADMIN_IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(end);
        }
        if buf.len() >= ADMIN_REQUEST_BYTES_MAX {
            break None;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (code, reason, content_type, body, head_only) =
        match head_end.map(|e| parse_request(&buf[..e])) {
            None => (
                431,
                "Request Header Fields Too Large",
                "text/plain",
                "request head too large\n".to_owned(),
                false,
            ),
            Some(AdminRequest::Malformed) => (
                400,
                "Bad Request",
                "text/plain",
                "bad request\n".to_owned(),
                false,
            ),
            Some(AdminRequest::Method) => (
                405,
                "Method Not Allowed",
                "text/plain",
                "GET or HEAD only\n".to_owned(),
                false,
            ),
            Some(AdminRequest::Get { path, head }) => match path.as_str() {
                "/metrics" => (
                    200,
                    "OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    registry.render(),
                    head,
                ),
                "/healthz" | "/readyz" => {
                    let h = if path == "/healthz" {
                        registry.health()
                    } else {
                        registry.readiness()
                    };
                    let body = if h.ok {
                        "ok\n".to_owned()
                    } else {
                        h.problems.join("\n") + "\n"
                    };
                    if h.ok {
                        (200, "OK", "text/plain", body, head)
                    } else {
                        (503, "Service Unavailable", "text/plain", body, head)
                    }
                }
                _ => (
                    404,
                    "Not Found",
                    "text/plain",
                    "not found: /metrics, /healthz, /readyz\n".to_owned(),
                    head,
                ),
            },
        };
    let mut reply = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        reply.extend_from_slice(body.as_bytes());
    }
    s.write_all(&reply)?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_or_are_refused() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x"),
            AdminRequest::Get {
                path: "/metrics".into(),
                head: false
            }
        );
        assert_eq!(
            parse_request(b"HEAD /readyz?verbose=1 HTTP/1.0"),
            AdminRequest::Get {
                path: "/readyz".into(),
                head: true
            }
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1"),
            AdminRequest::Method
        );
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET metrics HTTP/1.1",
            b"GET /metrics SPDY/3",
            b"GET /metrics HTTP/1.1 extra",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_request(bad), AdminRequest::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn fuzz_entry_survives_mutations() {
        crate::testing::mutation_sweep(
            b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\n",
            5_000,
            6,
            0x2545_f491_4f6c_dd1d,
            fuzz_decode,
        );
    }
}

//! The server side of a TLS connection over rustls's unbuffered API: a stream that holds
//! buffers only while they carry bytes.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB read buffer for the life of every
//! connection, idle or not; with thousands of idle connections that buffer is most of
//! their memory (docs/benchmarks.md, "Memory per connection"). Here every connection of a
//! core reads its ciphertext into the core's scratch buffer and keeps, of its own, only an
//! incomplete record, plaintext its reader has not taken yet, and TLS bytes the socket
//! has not taken yet: an idle connection holds none of the three.
//!
//! `ServerTls` is an `AsyncRead + AsyncWrite` like `futures_rustls`' stream, so the
//! connection code (its reader and writer tasks, each polling through a shared `RefCell`)
//! does not change with it. `accept` drives the handshake.

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use zeroize::Zeroize;

/// The most ciphertext one read takes from the socket: one whole TLS record (16 KiB of
/// plaintext plus the largest expansion) and its header.
pub const READ_BYTES: usize = 16 * 1024 + 256 + 5;

/// The most plaintext one `poll_write` encrypts: one record's worth.
pub const WRITE_PLAINTEXT_BYTES: usize = 16 * 1024;

/// The most ciphertext a connection keeps while it waits for the rest of a message: a
/// handshake message (rustls joins them up to 64 KiB) and the record in which it ends.
pub const INCOMPLETE_BYTES_MAX: usize = 0xffff + READ_BYTES;

thread_local! {
    /// Each core's buffer for the ciphertext of one read, wiped after each use (it is
    /// decrypted in place).
    static READ_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Each core's buffer for the ciphertext of one write.
    static WRITE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A server-side TLS stream over `io`.
pub struct ServerTls<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet wholly processed: an incomplete record, or the
    /// records of a handshake message not yet whole. Empty, with no allocation, between
    /// records.
    incomplete: Vec<u8>,
    /// Plaintext received and not yet read by the caller (wiped as it is read).
    plaintext: Vec<u8>,
    /// TLS bytes encoded and not yet taken by the socket, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify or closed its side: nothing more will be read.
    read_closed: bool,
    close_notify_queued: bool,
    /// rustls refused the peer: the connection is dead, and rustls is not called again
    /// (its position in a handshake message being joined may refer to bytes no longer
    /// kept, so a further call could index past a buffer).
    failed: Option<String>,
}

impl<S> Drop for ServerTls<S> {
    fn drop(&mut self) {
        // Records are decrypted in place: `incomplete` may hold plaintext too.
        self.plaintext.zeroize();
        self.incomplete.zeroize();
    }
}

impl<S> ServerTls<S> {
    /// The client's certificate chain, once the handshake has completed.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Bytes this connection holds in buffers of its own (for tests and assertions).
    pub fn buffered_capacity(&self) -> usize {
        self.incomplete.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn broken(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Where decrypted application data goes: the caller's buffer first, then what does not
/// fit into the connection's own.
struct Sink<'a> {
    out: &'a mut [u8],
    filled: usize,
    overflow: &'a mut Vec<u8>,
}

impl Sink<'_> {
    fn put(&mut self, data: &[u8]) {
        let room = self.out.len() - self.filled;
        let direct = room.min(data.len());
        self.out[self.filled..self.filled + direct].copy_from_slice(&data[..direct]);
        self.filled += direct;
        let rest = &data[direct..];
        if !rest.is_empty() {
            grow_wiped(self.overflow, self.overflow.len() + rest.len());
            self.overflow.extend_from_slice(rest);
        }
    }
}

/// Makes room for `needed` bytes in `buf` without leaving a copy of its bytes behind.
fn grow_wiped(buf: &mut Vec<u8>, needed: usize) {
    if buf.capacity() < needed {
        let mut bigger = Vec::with_capacity(needed.max(2 * buf.capacity()));
        bigger.extend_from_slice(buf);
        buf.zeroize();
        *buf = bigger;
    }
}

/// Makes room for exactly `needed` bytes in `buf` (no doubling: the incomplete-message
/// buffer is bounded by its length), without leaving a copy of its bytes behind.
fn grow_exact_wiped(buf: &mut Vec<u8>, needed: usize) {
    if buf.capacity() < needed {
        let mut bigger = Vec::with_capacity(needed);
        bigger.extend_from_slice(buf);
        buf.zeroize();
        *buf = bigger;
    }
}

/// Removes the first `n` bytes of `buf`, wiping the bytes the shift leaves behind, and
/// gives back a capacity much larger than what is left.
fn consume_front_wiped(buf: &mut Vec<u8>, n: usize) {
    if n == 0 {
        return;
    }
    let n = n.min(buf.len());
    let left = buf.len() - n;
    buf.copy_within(n.., 0);
    buf[left..].zeroize();
    buf.truncate(left);
    if buf.capacity() > 2 * left + READ_BYTES {
        let mut smaller = Vec::with_capacity(left);
        smaller.extend_from_slice(buf);
        buf.zeroize();
        *buf = smaller;
    }
}

/// Encodes one pending handshake (or post-handshake) message at the end of `outgoing`.
fn encode_into(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let start = outgoing.len();
    let mut room = 512;
    loop {
        outgoing.resize(start + room, 0);
        match encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                outgoing.truncate(start);
                return Err(broken("TLS message encoded twice"));
            }
        }
    }
}

/// Encrypts into the end of `outgoing` with `encrypt` (application data or close_notify).
fn encrypt_into(
    outgoing: &mut Vec<u8>,
    guess: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    let start = outgoing.len();
    let mut room = guess;
    loop {
        outgoing.resize(start + room, 0);
        match encrypt(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                assert!(
                    required_size > room,
                    "rustls asked for no more room than it had"
                );
                room = required_size;
            }
            Err(EncryptError::EncryptExhausted) => {
                outgoing.truncate(start);
                return Err(broken("TLS sequence numbers exhausted"));
            }
        }
    }
}

/// What processing the received bytes left the connection ready for.
enum Settled {
    /// Application data may be written (and more read).
    Traffic,
    /// The handshake needs more bytes from the client.
    Handshaking,
    /// The client will send nothing more.
    PeerClosed,
}

/// Encodes the alert rustls queued when it refused the peer, if any, at the end of
/// `outgoing`. `buf` is what `absorb` had left: rustls's position in a handshake message
/// being joined refers to it.
fn queue_alert(conn: &mut UnbufferedServerConnection, buf: &mut [u8], outgoing: &mut Vec<u8>) {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(buf);
    if let Ok(ConnectionState::EncodeTlsData(mut alert)) = state {
        let _ = encode_into(outgoing, |out| alert.encode(out));
    }
}

/// Processes every whole record in `buf`: application data into `sink`, handshake
/// messages answered into `outgoing`. Returns how many bytes of `buf` are done with (the
/// rest is an incomplete message, to keep) and what the connection is ready for.
fn absorb(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    sink: &mut Sink<'_>,
    outgoing: &mut Vec<u8>,
) -> io::Result<(usize, Settled)> {
    let mut done = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut buf[done..]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                done += discard;
                queue_alert(conn, &mut buf[done..], outgoing);
                return Err(tls_error(e));
            }
        };
        let settled = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    sink.put(record.map_err(tls_error)?.payload);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut message) => {
                encode_into(outgoing, |out| message.encode(out))?;
                None
            }
            // The bytes stay in `outgoing`, in order, until the socket takes them.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::WriteTraffic(_) => Some(Settled::Traffic),
            ConnectionState::BlockedHandshake => Some(Settled::Handshaking),
            ConnectionState::PeerClosed | ConnectionState::Closed => Some(Settled::PeerClosed),
            ConnectionState::ReadEarlyData(_) => return Err(broken("TLS early data")),
            _ => return Err(broken("a TLS state this server does not handle")),
        };
        done += discard;
        assert!(done <= buf.len(), "rustls discarded more than it was given");
        if let Some(settled) = settled {
            return Ok((done, settled));
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerTls<S> {
    fn new(io: S, conn: UnbufferedServerConnection) -> Self {
        ServerTls {
            io,
            conn,
            incomplete: Vec::new(),
            plaintext: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            read_closed: false,
            close_notify_queued: false,
            failed: None,
        }
    }

    /// The error every call answers once rustls refused the peer.
    fn dead(&self) -> Option<io::Error> {
        self.failed.as_ref().map(|why| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS connection failed: {why}"),
            )
        })
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        e
    }

    /// Reads once from the socket and processes what came: plaintext into `out` (then
    /// into `self.plaintext`), answers into `self.outgoing`. `Ok((0, _))` at end of stream.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<(usize, usize, Settled)>> {
        READ_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < READ_BYTES {
                scratch.resize(READ_BYTES, 0);
            }
            let n = ready!(Pin::new(&mut self.io).poll_read(cx, &mut scratch[..]))?;
            if n == 0 {
                return Poll::Ready(Ok((0, 0, Settled::PeerClosed)));
            }
            if self.incomplete.len() + n > INCOMPLETE_BYTES_MAX {
                scratch[..n].zeroize();
                let e = broken("a TLS message larger than this server takes");
                return Poll::Ready(Err(self.fail(e)));
            }
            let mut sink = Sink {
                out,
                filled: 0,
                overflow: &mut self.plaintext,
            };
            let result = if self.incomplete.is_empty() {
                // The common case: whole records, processed where they were read.
                absorb(
                    &mut self.conn,
                    &mut scratch[..n],
                    &mut sink,
                    &mut self.outgoing,
                )
                .map(|(done, settled)| {
                    grow_exact_wiped(&mut self.incomplete, n - done);
                    self.incomplete.extend_from_slice(&scratch[done..n]);
                    settled
                })
            } else {
                let needed = self.incomplete.len() + n;
                grow_exact_wiped(&mut self.incomplete, needed);
                self.incomplete.extend_from_slice(&scratch[..n]);
                absorb(
                    &mut self.conn,
                    &mut self.incomplete,
                    &mut sink,
                    &mut self.outgoing,
                )
                .map(|(done, settled)| {
                    consume_front_wiped(&mut self.incomplete, done);
                    settled
                })
            };
            let filled = sink.filled;
            scratch[..n].zeroize();
            let settled = match result {
                Ok(settled) => settled,
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            if self.incomplete.is_empty() {
                self.incomplete = Vec::new();
            }
            Poll::Ready(Ok((n, filled, settled)))
        })
    }

    /// Writes `outgoing` to the socket until it is empty (then frees it).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// The connection in its traffic state, after answering any pending handshake
    /// messages into `outgoing`.
    fn with_traffic<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> R,
    ) -> io::Result<R> {
        if let Some(e) = self.dead() {
            return Err(e);
        }
        let mut f = Some(f);
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incomplete);
            let state = match state {
                Ok(state) => state,
                Err(e) => return Err(self.fail(tls_error(e))),
            };
            let result = match state {
                ConnectionState::WriteTraffic(mut traffic) => {
                    // Taken once: the traffic state ends the loop.
                    let Some(f) = f.take() else {
                        return Err(broken("TLS traffic state reached twice"));
                    };
                    Some(f(&mut traffic, &mut self.outgoing))
                }
                ConnectionState::EncodeTlsData(mut message) => {
                    encode_into(&mut self.outgoing, |out| message.encode(out))?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let payload = match record {
                            Ok(r) => r.payload,
                            Err(e) => {
                                let e = tls_error(e);
                                self.failed = Some(e.to_string());
                                return Err(e);
                            }
                        };
                        let needed = self.plaintext.len() + payload.len();
                        grow_wiped(&mut self.plaintext, needed);
                        self.plaintext.extend_from_slice(payload);
                    }
                    None
                }
                // Edge-triggered: the next call says what may follow.
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                // Both sides said close_notify: nothing more may be written.
                ConnectionState::Closed => {
                    self.read_closed = true;
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                _ => return Err(broken("TLS connection not ready for application data")),
            };
            consume_front_wiped(&mut self.incomplete, discard);
            if let Some(result) = result {
                return Ok(result);
            }
        }
    }
}

/// The TLS handshake of a server-side connection over `io`.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<rustls::ServerConfig>,
    io: S,
) -> io::Result<ServerTls<S>> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut tls = ServerTls::new(io, conn);
    loop {
        let received = futures_lite::future::poll_fn(|cx| tls.poll_receive(cx, &mut [])).await;
        let (n, filled, settled) = match received {
            Ok(r) => r,
            Err(e) => {
                // Tell the client why (a bad certificate, say) before closing.
                let _ = futures_lite::future::poll_fn(|cx| tls.poll_send(cx)).await;
                return Err(e);
            }
        };
        debug_assert_eq!(filled, 0, "no room was given for plaintext");
        futures_lite::future::poll_fn(|cx| tls.poll_send(cx)).await?;
        match settled {
            Settled::Traffic if !tls.conn.is_handshaking() => return Ok(tls),
            // The handshake ended, and the client's last requests and close_notify came
            // with it: they are read, then the end of stream.
            Settled::PeerClosed if !tls.conn.is_handshaking() && n > 0 => {
                tls.read_closed = true;
                return Ok(tls);
            }
            Settled::PeerClosed => {
                tls.read_closed = true;
                return Err(if n == 0 {
                    io::ErrorKind::UnexpectedEof.into()
                } else {
                    broken("the client closed the connection during the handshake")
                });
            }
            Settled::Traffic | Settled::Handshaking => {}
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if !this.plaintext.is_empty() {
                let n = buf.len().min(this.plaintext.len());
                buf[..n].copy_from_slice(&this.plaintext[..n]);
                consume_front_wiped(&mut this.plaintext, n);
                if this.plaintext.is_empty() {
                    this.plaintext = Vec::new();
                }
                return Poll::Ready(Ok(n));
            }
            if let Some(e) = this.dead() {
                return Poll::Ready(Err(e));
            }
            if this.read_closed || buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // What the reads produce to send (an alert) waits for the writer's next write,
            // flush or close: polling the socket for writing from here would take the
            // writer's place as the one the socket wakes.
            let (n, filled, settled) = ready!(this.poll_receive(cx, buf))?;
            if n == 0 || matches!(settled, Settled::PeerClosed) {
                this.read_closed = true;
            }
            if filled > 0 {
                return Poll::Ready(Ok(filled));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.dead() {
            return Poll::Ready(Err(e));
        }
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let take = data.len().min(WRITE_PLAINTEXT_BYTES);
        WRITE_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            let encrypted = this.with_traffic(|traffic, pending| {
                // Messages the connection owed (a ticket, a key update) go first.
                scratch.append(pending);
                *pending = Vec::new();
                let guess = take + take / 8 + 64;
                encrypt_into(&mut scratch, guess, |out| {
                    traffic.encrypt(&data[..take], out)
                })
            });
            let sent = encrypted.and_then(|r| r).and_then(|()| {
                // Straight from the scratch buffer when the socket takes it all (nearly
                // always); what it does not take is kept.
                let mut at = 0;
                while at < scratch.len() {
                    match Pin::new(&mut this.io).poll_write(cx, &scratch[at..]) {
                        Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => break,
                    }
                }
                this.outgoing.extend_from_slice(&scratch[at..]);
                Ok(())
            });
            scratch.clear();
            if scratch.capacity() > 4 * READ_BYTES {
                *scratch = Vec::new();
            }
            Poll::Ready(sent.map(|()| take))
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued && this.failed.is_none() {
            this.close_notify_queued = true;
            let queued = this.with_traffic(|traffic, outgoing| {
                encrypt_into(outgoing, 64, |out| traffic.queue_close_notify(out))
            });
            // A connection that cannot say close_notify any more is closed all the same.
            let _ = queued.and_then(|r| r);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use std::io::{Read, Write};

    struct Pair {
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        certs: crate::tls::DevCerts,
        _dir: tempfile::TempDir,
    }

    fn configs() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::tls::write_dev_certs(dir.path(), "stream-test").unwrap();
        let server = crate::tls::server_config(&crate::config::Tls {
            cert: certs.server_cert.clone(),
            key: crate::config::KeySource::File(certs.server_key.clone()),
            client_ca: certs.ca_cert.clone(),
            require_client_cert: true,
            identity: crate::config::IdentitySource::CommonName,
            handshake_timeout: std::time::Duration::from_secs(5),
        })
        .unwrap()
        .config;
        let client =
            crate::tls::client_config(&certs.ca_cert, &certs.client_cert, &certs.client_key)
                .unwrap();
        Pair {
            server,
            client,
            certs,
            _dir: dir,
        }
    }

    /// Runs `serve` on a glommio executor for one accepted connection while `client` runs
    /// on this thread against it.
    fn with_server<T: Send + 'static>(
        config: Arc<rustls::ServerConfig>,
        serve: impl FnOnce(ServerTls<glommio::net::TcpStream>) -> futures_lite::future::BoxedLocal<T>
            + Send
            + 'static,
        client: impl FnOnce(std::net::SocketAddr),
    ) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            glommio::LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    tx.send(listener.local_addr().unwrap()).unwrap();
                    let stream = listener.accept().await.unwrap();
                    let tls = accept(config, stream).await?;
                    Ok(serve(tls).await)
                })
                .unwrap()
                .join()
                .unwrap()
        });
        client(rx.recv().unwrap());
        server.join().unwrap()
    }

    fn connect(
        config: &Arc<rustls::ClientConfig>,
        addr: std::net::SocketAddr,
    ) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap())
    }

    /// Echoes `rounds` messages of the lengths the client sends (a 4-byte length first),
    /// and reports the bytes the connection kept between them.
    fn echo(
        rounds: usize,
    ) -> impl FnOnce(ServerTls<glommio::net::TcpStream>) -> futures_lite::future::BoxedLocal<Vec<usize>>
    {
        move |mut tls| {
            Box::pin(async move {
                let mut kept = Vec::new();
                for _ in 0..rounds {
                    kept.push(tls.buffered_capacity());
                    let mut len = [0u8; 4];
                    tls.read_exact(&mut len).await.unwrap();
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    tls.read_exact(&mut body).await.unwrap();
                    tls.write_all(&body).await.unwrap();
                    tls.flush().await.unwrap();
                }
                // The client may be gone already.
                let _ = tls.close().await;
                kept
            })
        }
    }

    #[test]
    fn echoes_messages_of_every_size_and_keeps_no_buffer_between_them() {
        let pair = configs();
        let sizes = [1usize, 100, 16 * 1024 - 1, 16 * 1024 + 1, 100_000, 3];
        let client = pair.client.clone();
        let kept = with_server(pair.server, echo(sizes.len()), move |addr| {
            let mut c = connect(&client, addr);
            for (i, &size) in sizes.iter().enumerate() {
                let body: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
                c.write_all(&(size as u32).to_be_bytes()).unwrap();
                // Sent in pieces: records arrive split across reads.
                for piece in body.chunks(7_001) {
                    c.write_all(piece).unwrap();
                    c.flush().unwrap();
                }
                let mut back = vec![0u8; size];
                c.read_exact(&mut back).unwrap();
                assert_eq!(back, body, "message {i} of {size} bytes");
            }
        })
        .unwrap();
        // Between messages (after the first, which follows the handshake's tickets) the
        // connection holds no buffer of its own.
        assert!(kept[1..].iter().all(|&k| k == 0), "kept {kept:?}");
    }

    #[test]
    fn a_client_key_update_is_answered_and_traffic_goes_on() {
        let pair = configs();
        let client = pair.client.clone();
        let kept = with_server(pair.server, echo(3), move |addr| {
            let mut c = connect(&client, addr);
            for round in 0..3u8 {
                if round > 0 {
                    c.conn.refresh_traffic_keys().unwrap();
                }
                c.write_all(&5u32.to_be_bytes()).unwrap();
                c.write_all(&[round; 5]).unwrap();
                let mut back = [0u8; 5];
                c.read_exact(&mut back).unwrap();
                assert_eq!(back, [round; 5]);
            }
        })
        .unwrap();
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn a_client_byte_by_byte_is_understood() {
        let pair = configs();
        let client = pair.client.clone();
        with_server(pair.server, echo(1), move |addr| {
            let mut c = connect(&client, addr);
            c.write_all(&3u32.to_be_bytes()).unwrap();
            c.write_all(b"abc").unwrap();
            // Take the encrypted bytes the client would send and dribble them.
            let mut tls_bytes = Vec::new();
            while c.conn.wants_write() {
                c.conn.write_tls(&mut tls_bytes).unwrap();
            }
            for b in &tls_bytes {
                c.sock.write_all(std::slice::from_ref(b)).unwrap();
            }
            let mut back = [0u8; 3];
            c.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"abc");
        })
        .unwrap();
    }

    #[test]
    fn a_client_from_another_ca_is_refused_with_an_alert() {
        let pair = configs();
        let other = configs();
        // Trusts the server, presents a certificate the server's CA never issued.
        let stranger = crate::tls::client_config(
            &pair.certs.ca_cert,
            &other.certs.client_cert,
            &other.certs.client_key,
        )
        .unwrap();
        let result = with_server(pair.server, echo(1), move |addr| {
            let mut c = connect(&stranger, addr);
            let mut byte = [0u8; 1];
            let err = c
                .write_all(b"x")
                .and_then(|()| c.read(&mut byte))
                .expect_err("a certificate from another CA must be refused");
            assert!(
                err.to_string().contains("alert"),
                "the client reads why: {err}"
            );
        });
        assert!(result.is_err());
    }

    #[test]
    fn garbage_instead_of_a_hello_is_an_error_not_a_panic() {
        let pair = configs();
        let result = with_server(pair.server, echo(1), |addr| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            // A record header announcing a handshake message, then nonsense.
            let _ = s.write_all(&[22, 3, 1, 0, 8, 99, 0, 0, 4, 1, 2, 3, 4]);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        assert!(result.is_err());
    }

    #[test]
    fn a_client_that_closes_mid_handshake_is_an_error() {
        let pair = configs();
        let result = with_server(pair.server, echo(1), |addr| {
            let s = std::net::TcpStream::connect(addr).unwrap();
            drop(s);
        });
        assert_eq!(
            result.err().map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
    }
}

//! The network edge on each core: accept, TLS handshake, read frames, answer in any order.
//!
//! A connection lives on the core that accepted it. Its reader decodes frames, checks each
//! request with the policy gate and hands it to the owning shard through the
//! [`ShardRouter`]; every request runs as its own task, so replies go out as soon as they
//! are ready, matched by request id. Replies are encoded into the connection's outbox and
//! a writer task flushes whatever has gathered in one write (and zeroizes the bytes, which
//! may hold keys). A framing error is answered once and closes only that connection.

use crate::admission::{HandshakeTicket, Refused, Source};
use crate::config::ConnectionLimits;
use crate::context::CoreContext;
use crate::op::{self, Asking, Handled, Reply, Request, Then};
use crate::policy::{Denied, DenyReason};
use crate::seal::cache::clock_ms;
use crate::settings::ConnectionSettings;
use crate::shard::{RateCheck, ShardOp};
use crate::signal::LocalSignal;
use crate::tls;
use crate::wire::{self, Refusal, Status};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// Bytes read from a connection at a time (into the core's one read buffer).
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// The buffer a lingering connection discards its client's late bytes into.
const LINGER_SINK_BYTES: usize = 1024;
/// Reply buffer capacity a connection keeps once its replies are written.
const OUTBOX_RETAINED_BYTES: usize = 4 * 1024;
/// How long a connection refused a slot after its handshake waits for its refusal to be
/// read before the socket closes.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);
/// Encoded replies a connection may hold unsent before it stops reading new requests.
const OUTBOX_HIGH_WATER_BYTES: usize = 256 * 1024;
/// After a drain closed a connection's sending side, how long its late requests are read
/// and discarded before the socket closes: closing a socket with unread input makes the
/// kernel reset the connection and drop the replies still queued to the client.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// Accepts connections until the core drains (then the listener closes: new connections
/// are refused by the kernel, and clients go to another appliance).
pub async fn accept_loop(ctx: Rc<CoreContext>, listener: TcpListener) {
    loop {
        // Checked first: an accept that is ready at once would otherwise win the race.
        if ctx.drain.is_open() {
            return;
        }
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.drain.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else {
            return;
        };
        match accepted {
            Ok(stream) => admit(&ctx, stream),
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A new TCP connection: given a handshake slot (and its task) or closed at once.
fn admit(ctx: &Rc<CoreContext>, stream: TcpStream) {
    let n = {
        let mut m = ctx.metrics.borrow_mut();
        m.connections_accepted += 1;
        m.connections_accepted
    };
    let conn = ConnId {
        core: ctx.router.local_shard().id(),
        n,
    };
    // Gone already (reset before the accept completed): nothing to serve.
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let evict = Rc::new(LocalSignal::default());
    let admitted = {
        let settings = ctx.settings.get();
        ctx.admission.borrow_mut().begin_handshake(
            Source::of(peer.ip()),
            evict.clone(),
            &settings.limits,
        )
    };
    let admitted = match admitted {
        Ok(a) => a,
        Err(reason) => {
            refused(ctx, reason, conn, peer, None);
            return;
        }
    };
    for oldest in admitted.evicted {
        ctx.metrics.borrow_mut().handshakes_evicted += 1;
        oldest.notify();
    }
    let slot = HandshakeSlot {
        ctx: ctx.clone(),
        ticket: admitted.ticket,
        evicted: evict,
    };
    let guard = ConnectionGuard::new(ctx.clone());
    glommio::spawn_local(async move {
        serve(&guard.0, stream, conn, peer, slot).await;
        drop(guard);
    })
    .detach();
}

/// Counts a refused connection and logs it (at most once a second per reason and core,
/// with how many went unlogged).
fn refused(
    ctx: &CoreContext,
    reason: Refused,
    conn: ConnId,
    peer: std::net::SocketAddr,
    identity: Option<&str>,
) {
    ctx.metrics.borrow_mut().connections_refused[reason as usize] += 1;
    let now = clock_ms();
    if let Some(unlogged) = ctx.refusal_log.borrow_mut().should_log(reason, now) {
        tracing::warn!(
            %conn,
            %peer,
            identity = identity.unwrap_or("(before TLS)"),
            bound = reason.key(),
            unlogged_since_last = unlogged,
            "connection refused: a connection bound was reached"
        );
    }
}

/// A handshake's slot, given back when the handshake ends however it ends.
struct HandshakeSlot {
    ctx: Rc<CoreContext>,
    ticket: HandshakeTicket,
    /// Notified when a newer handshake takes this one's slot.
    evicted: Rc<LocalSignal>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.ctx.admission.borrow_mut().end_handshake(self.ticket);
    }
}

/// An established connection's slot.
struct EstablishedSlot {
    ctx: Rc<CoreContext>,
    identity: Arc<str>,
    had_role: bool,
}

impl Drop for EstablishedSlot {
    fn drop(&mut self) {
        self.ctx
            .admission
            .borrow_mut()
            .close(&self.identity, self.had_role);
    }
}

/// A connection's id in the logs: its core and its number there (`core.n`). With the
/// request id the client put in its frame, it names a request in every log line about it
/// (and the audit record keeps the same request id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    pub core: u16,
    pub n: u64,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.core, self.n)
    }
}

struct ConnectionGuard(Rc<CoreContext>);

impl ConnectionGuard {
    fn new(ctx: Rc<CoreContext>) -> Self {
        ctx.connections.set(ctx.connections.get() + 1);
        ConnectionGuard(ctx)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.set(self.0.connections.get() - 1);
    }
}

/// The TLS stream of an established connection, shared by its reader and writer tasks.
type SharedTls = Rc<RefCell<tls::stream::ServerTls<TcpStream>>>;

async fn serve(
    ctx: &Rc<CoreContext>,
    stream: TcpStream,
    conn: ConnId,
    peer: std::net::SocketAddr,
    handshake_slot: HandshakeSlot,
) {
    // This connection's TLS settings: those in force now, for its whole life.
    let settings = ctx.settings.snapshot();
    // Boxed, here and below: a task's future is as large as its largest state, and the
    // handshake's (a whole TLS stream being set up) and the refusal's would otherwise be
    // paid for by every idle connection for its whole life. The stream goes straight into
    // its `Rc`, so that no binding of it stays in this future either.
    let accepted = Box::pin(handshake(
        ctx,
        stream,
        conn,
        peer,
        &handshake_slot,
        &settings,
    ));
    let Some((stream, identity)) = accepted.await else {
        return;
    };
    let has_role = ctx.access.get().require_a_role(&identity).is_ok();
    let admitted = ctx
        .admission
        .borrow_mut()
        .establish(&identity, has_role, &settings.limits);
    if let Err(reason) = admitted {
        refused(ctx, reason, conn, peer, Some(&identity));
        // The handshake slot is held until the refusal is sent: refusals in progress
        // stay bounded per core and per source.
        Box::pin(refuse_connection(Half(stream), reason, &settings.limits)).await;
        drop(handshake_slot);
        return;
    }
    let _slot = EstablishedSlot {
        ctx: ctx.clone(),
        identity: identity.clone(),
        had_role: has_role,
    };
    drop(handshake_slot);
    established(ctx, stream, identity, conn, peer, &settings.limits).await
}

/// Why a handshake ended before it completed.
enum Unfinished {
    TimedOut,
    Evicted,
}

/// The TLS handshake, within `tls.handshake_timeout_ms` and until a newer handshake evicts
/// it; the stream and the client's identity.
async fn handshake(
    ctx: &Rc<CoreContext>,
    stream: TcpStream,
    conn: ConnId,
    peer: std::net::SocketAddr,
    slot: &HandshakeSlot,
    settings: &ConnectionSettings,
) -> Option<(SharedTls, Arc<str>)> {
    let _ = stream.set_nodelay(true);
    let outcome = futures_lite::future::or(
        async { Ok(tls::stream::accept(settings.acceptor.clone(), stream).await) },
        futures_lite::future::or(
            async {
                glommio::timer::sleep(settings.handshake_timeout).await;
                Err(Unfinished::TimedOut)
            },
            async {
                slot.evicted.wait().await;
                Err(Unfinished::Evicted)
            },
        ),
    )
    .await;
    let tls = match outcome {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.metrics.borrow_mut().handshake_failed += 1;
            tracing::debug!(%conn, %peer, error = %e, "TLS handshake refused");
            return None;
        }
        Err(Unfinished::TimedOut) => {
            ctx.metrics.borrow_mut().handshake_timed_out += 1;
            tracing::debug!(%conn, %peer, "TLS handshake timed out");
            return None;
        }
        // Counted by the connection that took the slot.
        Err(Unfinished::Evicted) => {
            tracing::debug!(%conn, %peer, "TLS handshake evicted by a newer one (limits.max_handshakes_per_core)");
            return None;
        }
    };
    let identity = match tls.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match tls::identity_of(cert, settings.identity) {
            Ok(id) => id,
            Err(e) => {
                ctx.metrics.borrow_mut().certificate_refused += 1;
                tracing::debug!(%conn, %peer, error = %e, "client certificate refused");
                return None;
            }
        },
        None if !settings.require_client_cert => Arc::from(tls::ANONYMOUS),
        None => return None,
    };
    Some((Rc::new(RefCell::new(tls)), identity))
}

/// An established connection, from its first frame to its close.
async fn established(
    ctx: &Rc<CoreContext>,
    stream: SharedTls,
    identity: Arc<str>,
    conn: ConnId,
    peer: std::net::SocketAddr,
    limits: &ConnectionLimits,
) {
    tracing::debug!(%conn, %peer, %identity, "connection established");
    let outbox = Rc::new(Outbox::new(ctx.metrics.clone(), conn, identity.clone()));
    let writer = glommio::spawn_local(write_loop(
        Half(stream.clone()),
        outbox.clone(),
        limits.write_timeout,
    ));
    let lingering = Half(stream.clone());
    // Every event about this connection's requests carries its id and identity.
    let span = tracing::info_span!("conn", %conn, %identity);
    let reading = read_loop(ctx, &identity, Half(stream), &outbox, limits);
    let end = tracing::Instrument::instrument(reading, span).await;
    // Let every request already accepted finish and be answered, then close.
    while outbox.inflight.get() > 0 {
        outbox.idle.wait().await;
    }
    outbox.closing.set(true);
    outbox.ready.notify();
    writer.await;
    if !outbox.failed.get() {
        match end {
            ReadEnd::Draining => Box::pin(linger(lingering, DRAIN_LINGER)).await,
            ReadEnd::Refused => Box::pin(linger(lingering, REFUSAL_LINGER)).await,
            ReadEnd::Closed | ReadEnd::Idle => {}
        }
    }
    tracing::debug!(%conn, %peer, %identity, ?end, "connection closed");
}

/// Sends a connection-level refusal (request id 0, opcode `0x80`) and closes, within the
/// connection's write timeout.
async fn refuse_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut tls: S,
    reason: Refused,
    limits: &ConnectionLimits,
) {
    let refusal = Refusal::new(
        Status::ConnectionLimit,
        format!(
            "this connection would exceed {} on this core; close another connection or retry later",
            reason.key()
        ),
    );
    let mut frame = Vec::new();
    Reply::Refused(refusal).encode(0, 0, &mut frame);
    let sent = futures_lite::future::or(
        async {
            let ok = tls.write_all(&frame).await.is_ok() && tls.flush().await.is_ok();
            let _ = tls.close().await;
            ok
        },
        async {
            glommio::timer::sleep(limits.write_timeout).await;
            false
        },
    )
    .await;
    if sent {
        linger(tls, REFUSAL_LINGER).await;
    }
}

/// Reads and discards what the client still sends, until it closes or `how_long` passes,
/// so that the replies already written reach it before the socket closes.
async fn linger<S: AsyncRead + Unpin>(mut r: S, how_long: Duration) {
    let deadline = std::time::Instant::now() + how_long;
    let mut sink = zeroize::Zeroizing::new(vec![0u8; LINGER_SINK_BYTES]);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let read = futures_lite::future::or(async { Some(r.read(&mut sink).await) }, async {
            glommio::timer::sleep(left).await;
            None
        })
        .await;
        match read {
            Some(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Replies waiting to be written, and the connection's in-flight count.
struct Outbox {
    buf: RefCell<Vec<u8>>,
    /// Data was added, or the connection is closing.
    ready: LocalSignal,
    /// The writer emptied the buffer.
    drained: LocalSignal,
    /// The last in-flight request finished.
    idle: LocalSignal,
    inflight: Cell<u32>,
    /// When the connection last had nothing left in flight: the idle timeout counts from
    /// the later of this and the last byte received.
    last_answer: Cell<Instant>,
    closing: Cell<bool>,
    failed: Cell<bool>,
    /// The core's counters: every reply is counted by opcode and status.
    metrics: Rc<RefCell<crate::metrics::NetMetrics>>,
    conn: ConnId,
    identity: Arc<str>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Replies never written (the peer went away) may hold derived keys.
        self.buf.get_mut().zeroize();
    }
}

impl Outbox {
    fn new(
        metrics: Rc<RefCell<crate::metrics::NetMetrics>>,
        conn: ConnId,
        identity: Arc<str>,
    ) -> Outbox {
        Outbox {
            buf: RefCell::default(),
            ready: LocalSignal::default(),
            drained: LocalSignal::default(),
            idle: LocalSignal::default(),
            inflight: Cell::new(0),
            last_answer: Cell::new(Instant::now()),
            closing: Cell::new(false),
            failed: Cell::new(false),
            metrics,
            conn,
            identity,
        }
    }

    /// A request counted in flight was answered.
    fn finished_one(&self) {
        assert!(
            self.inflight.get() > 0,
            "an answer to a request not in flight"
        );
        let left = self.inflight.get() - 1;
        self.inflight.set(left);
        if left == 0 {
            // Only the answer that leaves nothing in flight starts the idle clock.
            self.last_answer.set(Instant::now());
            self.idle.notify();
        }
    }

    fn push(&self, opcode: u8, request_id: u64, reply: &Reply) {
        let status = match reply {
            Reply::Refused(r) => r.status,
            _ => Status::Ok,
        };
        self.metrics.borrow_mut().count_reply(opcode, status);
        // Every answer, at debug: never its body (a DERIVE reply holds the key).
        tracing::debug!(
            conn = %self.conn,
            identity = %self.identity,
            request_id,
            op = crate::metrics::opcode_label(opcode),
            status = status.name(),
            "answered"
        );
        encode_wiped(reply, opcode, request_id, &mut self.buf.borrow_mut());
        self.ready.notify();
    }

    /// Requests in flight, or replies not yet written.
    fn busy(&self) -> bool {
        self.inflight.get() > 0 || !self.buf.borrow().is_empty()
    }

    fn refuse(&self, opcode: u8, request_id: u64, refusal: Refusal) {
        self.push(opcode, request_id, &Reply::Refused(refusal));
    }
}

thread_local! {
    /// Each core's scratch buffer for encoding one reply.
    static REPLY_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes `reply` at the end of `buf` without leaving a copy behind: a reply may hold a
/// key, and a `Vec` that grows frees its old allocation unwiped. The reply is encoded into
/// the core's scratch buffer (wiped after), then appended to `buf`, which grows through a
/// wiped copy.
fn encode_wiped(reply: &Reply, opcode: u8, request_id: u64, buf: &mut Vec<u8>) {
    REPLY_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        reply.encode(opcode, request_id, &mut scratch);
        let needed = buf.len() + scratch.len();
        if buf.capacity() < needed {
            let mut bigger = Vec::with_capacity(needed.max(2 * buf.capacity()));
            bigger.extend_from_slice(buf);
            buf.zeroize();
            *buf = bigger;
        }
        buf.extend_from_slice(&scratch);
        scratch.zeroize();
        // The scratch buffer keeps its capacity (it was wiped) unless a large reply grew it.
        if scratch.capacity() > OUTBOX_RETAINED_BYTES {
            *scratch = Vec::new();
        }
    });
}

async fn write_loop<S: AsyncWrite + Unpin>(mut w: S, outbox: Rc<Outbox>, timeout: Duration) {
    let mut sending = Vec::new();
    loop {
        if outbox.buf.borrow().is_empty() {
            if outbox.closing.get() || outbox.failed.get() {
                break;
            }
            // A quiet connection keeps little: both buffers were wiped after their write.
            shrink_wiped(&mut outbox.buf.borrow_mut());
            outbox.ready.wait().await;
            continue;
        }
        std::mem::swap(&mut *outbox.buf.borrow_mut(), &mut sending);
        let result = futures_lite::future::or(
            async {
                w.write_all(&sending).await?;
                w.flush().await
            },
            async {
                glommio::timer::sleep(timeout).await;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "limits.write_timeout_ms",
                ))
            },
        )
        .await;
        // The bytes may include derived keys.
        sending.zeroize();
        shrink_wiped(&mut sending);
        outbox.drained.notify();
        if let Err(e) = result {
            if e.kind() == io::ErrorKind::TimedOut {
                outbox.metrics.borrow_mut().write_timeouts += 1;
                tracing::info!(conn = %outbox.conn, identity = %outbox.identity, "closing a connection whose client does not read its replies (limits.write_timeout_ms)");
            }
            outbox.failed.set(true);
            outbox.drained.notify();
            break;
        }
    }
    // A client that reads nothing takes no close_notify either: bounded as the writes.
    let _ = futures_lite::future::or(
        async {
            let _ = w.close().await;
        },
        glommio::timer::sleep(timeout),
    )
    .await;
}

/// Gives back a reply buffer's memory once it is empty and larger than a quiet connection
/// keeps (its bytes were wiped when it was emptied).
fn shrink_wiped(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > OUTBOX_RETAINED_BYTES {
        *buf = Vec::new();
    }
}

/// Why a connection's reading ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadEnd {
    /// The client closed, or the connection failed.
    Closed,
    /// The appliance is stopping.
    Draining,
    /// Nothing in flight and nothing received for `limits.idle_timeout_s`.
    Idle,
    /// A framing error or a frame that did not arrive in time, answered once.
    Refused,
}

/// What the reader waits for next.
enum Wake {
    Read(io::Result<usize>),
    Draining,
    Deadline,
}

async fn read_loop<S: AsyncRead + Unpin>(
    ctx: &Rc<CoreContext>,
    identity: &Arc<str>,
    mut r: S,
    outbox: &Rc<Outbox>,
    limits: &ConnectionLimits,
) -> ReadEnd {
    let max_body = ctx.limits.max_frame_body_bytes;
    // What arrived and is not yet a whole frame: empty (and without an allocation) while
    // the connection waits. Zeroized when the connection ends, whatever it held (an UNSEAL
    // frame carries a share); it grows only through `grow_wiped`, so no copy is left
    // behind either.
    let mut buf = zeroize::Zeroizing::new(Vec::<u8>::new());
    let mut last_received = Instant::now();
    // When the first byte of the frame now partly in `buf` arrived.
    let mut frame_started: Option<Instant> = None;
    loop {
        while outbox.buf.borrow().len() > OUTBOX_HIGH_WATER_BYTES && !outbox.failed.get() {
            outbox.drained.wait().await;
        }
        if outbox.failed.get() {
            return ReadEnd::Closed;
        }
        if ctx.drain.is_open() {
            return ReadEnd::Draining;
        }
        let now = Instant::now();
        let deadline = match frame_started {
            Some(at) => at + limits.frame_timeout,
            // Re-checked when it passes: the idle time counts from the last answer.
            None if outbox.busy() => now + limits.idle_timeout,
            None => last_received.max(outbox.last_answer.get()) + limits.idle_timeout,
        };
        // A drain stops the reading; what was read is answered before the close.
        let wake = futures_lite::future::or(
            async { Wake::Read(read_appending(&mut r, &mut buf).await) },
            futures_lite::future::or(
                async {
                    ctx.drain.wait().await;
                    Wake::Draining
                },
                async {
                    glommio::timer::sleep(deadline.saturating_duration_since(now)).await;
                    Wake::Deadline
                },
            ),
        )
        .await;
        match wake {
            Wake::Read(Ok(n)) if n > 0 => {}
            Wake::Read(_) => return ReadEnd::Closed,
            Wake::Draining => return ReadEnd::Draining,
            Wake::Deadline => {
                if frame_started.is_some() {
                    ctx.metrics.borrow_mut().frame_timeouts += 1;
                    let message = format!(
                        "the frame did not arrive whole within limits.frame_timeout_ms ({} ms of its first byte)",
                        limits.frame_timeout.as_millis()
                    );
                    tracing::info!(%identity, bytes = buf.len(), "closing a connection whose frame did not arrive in time");
                    refuse_framing(outbox, &buf, Status::FrameTimeout, message);
                    return ReadEnd::Refused;
                }
                let quiet_since = last_received.max(outbox.last_answer.get());
                if !outbox.busy() && quiet_since + limits.idle_timeout <= Instant::now() {
                    ctx.metrics.borrow_mut().idle_closed += 1;
                    tracing::debug!(%identity, "closing an idle connection (limits.idle_timeout_s)");
                    return ReadEnd::Idle;
                }
                continue;
            }
        }
        last_received = Instant::now();
        let mut start = 0;
        loop {
            match wire::decode_frame(&buf[start..], max_body) {
                Ok(Some(frame)) => {
                    let (opcode, consumed) = (frame.header.opcode, frame.consumed);
                    dispatch(ctx, identity, outbox, frame.header, frame.body);
                    if opcode == wire::Opcode::Unseal as u8 {
                        // The frame held a share: do not leave it in the read buffer.
                        buf[start..start + consumed].zeroize();
                    }
                    start += consumed;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%identity, error = %e, "framing error: closing connection");
                    refuse_framing(outbox, &buf[start..], e.status(), e.to_string());
                    return ReadEnd::Refused;
                }
            }
        }
        // The rest is the start of a frame: it began in this read unless it is the same
        // partial frame as before (nothing was consumed).
        frame_started = match (buf.len() > start, start > 0 || frame_started.is_none()) {
            (false, _) => None,
            (true, true) => Some(last_received),
            (true, false) => frame_started,
        };
        buf.drain(..start);
        if buf.is_empty() {
            // A waiting connection holds no buffer; the old one is zeroized (its whole
            // capacity) as it drops.
            buf = zeroize::Zeroizing::new(Vec::new());
        }
    }
}

thread_local! {
    /// Each core's read buffer: every connection of the core reads into it and keeps only
    /// what is not yet a whole frame.
    static READ_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads what the stream has into the core's scratch buffer and appends it to `buf`
/// (wiping the scratch), so that a connection waiting for its client holds no read buffer
/// of its own. The scratch is borrowed only within a poll.
async fn read_appending<S: AsyncRead + Unpin>(
    r: &mut S,
    buf: &mut zeroize::Zeroizing<Vec<u8>>,
) -> io::Result<usize> {
    futures_lite::future::poll_fn(|cx| {
        READ_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < READ_CHUNK_BYTES {
                scratch.resize(READ_CHUNK_BYTES, 0);
            }
            match Pin::new(&mut *r).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(n)) => {
                    grow_wiped(buf, buf.len() + n);
                    buf.extend_from_slice(&scratch[..n]);
                    scratch[..n].zeroize();
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        })
    })
    .await
}

/// Answers a framing error once. The reply names the request only when a whole header
/// with our magic arrived; otherwise the bytes say nothing trustworthy (opcode 0, id 0).
fn refuse_framing(outbox: &Outbox, rest: &[u8], status: Status, message: String) {
    let (opcode, request_id) = match rest.get(..wire::HEADER_LEN) {
        Some(h) if h[..4] == wire::MAGIC => (
            h[5],
            u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8])),
        ),
        _ => (0, 0),
    };
    outbox.refuse(opcode, request_id, Refusal::new(status, message));
}

/// A refusal by the policy: counted by reason, logged, answered FORBIDDEN.
fn deny(
    ctx: &CoreContext,
    identity: &str,
    outbox: &Outbox,
    opcode: u8,
    request_id: u64,
    denied: Denied,
) {
    ctx.denials.borrow_mut()[denied.reason as usize] += 1;
    match denied.reason {
        DenyReason::Purpose | DenyReason::Region | DenyReason::AssetGroup => {
            tracing::debug!(%identity, request_id, opcode, reason = denied.reason.name(), "request denied")
        }
        _ => {
            tracing::info!(%identity, request_id, opcode, reason = denied.reason.name(), "request denied")
        }
    }
    outbox.refuse(opcode, request_id, denied.refusal)
}

/// Makes room for `len` bytes in `buf` without leaving a copy of its bytes behind: a
/// larger buffer is allocated, the bytes moved over, and the old one wiped.
fn grow_wiped(buf: &mut zeroize::Zeroizing<Vec<u8>>, len: usize) {
    if buf.capacity() >= len {
        return;
    }
    let mut bigger = Vec::with_capacity(len.max(2 * buf.capacity()));
    bigger.extend_from_slice(buf);
    // The old buffer is zeroized (its whole capacity) as it drops.
    *buf = zeroize::Zeroizing::new(bigger);
}

/// Decodes one request, passes it through its opcode's gate and hands it to its
/// operation's handler ([`op`]); then carries out what the handler decided.
fn dispatch(
    ctx: &Rc<CoreContext>,
    identity: &Arc<str>,
    outbox: &Rc<Outbox>,
    header: wire::FrameHeader,
    body: &[u8],
) {
    let (opcode, request_id) = (header.opcode, header.request_id);
    let started = Instant::now();
    let request = match Request::decode(opcode, body) {
        Ok(r) => r,
        Err(e) => {
            return outbox.refuse(opcode, request_id, Refusal::new(e.status(), e.to_string()))
        }
    };
    if !ctx.lease.may_acknowledge() && !runs_on_a_standby(request.opcode()) {
        let why = ctx.lease.why_not_acknowledging();
        let refusal = Refusal::not_active(why, ctx.lease.active_address());
        return outbox.refuse(opcode, request_id, refusal);
    }
    let access = ctx.access.get();
    let allowance = match access.pass_gate(identity, request.opcode().gate()) {
        Ok(allowance) => allowance,
        Err(denied) => return deny(ctx, identity, outbox, opcode, request_id, denied),
    };
    let mut asking = Asking {
        ctx,
        identity,
        request_id,
        access: &access,
        allowance,
    };
    match request.handle(&mut asking) {
        Handled::Now(Ok(reply)) => outbox.push(opcode, request_id, &reply),
        Handled::Now(Err(refusal)) => outbox.refuse(opcode, request_id, refusal),
        Handled::Denied(denied) => deny(ctx, identity, outbox, opcode, request_id, denied),
        Handled::Later(answer) => answer_later(outbox, opcode, request_id, answer),
        Handled::Shard(op, then) => {
            let rate = asking.allowance.map(|allowed| RateCheck {
                requester: identity.clone(),
                role: allowed.role,
                limit: allowed.limit,
            });
            to_shard(ctx, outbox, (opcode, request_id), (op, rate, then), started)
        }
    }
}

/// The requests a standby answers itself: the seal's (each appliance holds its own seed:
/// a standby is unsealed before it can take over). Everything else reads or writes the
/// store's state, which only the active may acknowledge.
fn runs_on_a_standby(opcode: wire::Opcode) -> bool {
    matches!(
        opcode,
        wire::Opcode::Seal | wire::Opcode::Unseal | wire::Opcode::SealStatus
    )
}

/// Answers once work off this core resolves; counted in flight meanwhile, so the
/// connection answers it before it closes.
fn answer_later(outbox: &Rc<Outbox>, opcode: u8, request_id: u64, answer: op::Later) {
    outbox.inflight.set(outbox.inflight.get() + 1);
    let outbox = outbox.clone();
    glommio::spawn_local(async move {
        match answer.await {
            Ok(reply) => outbox.push(opcode, request_id, &reply),
            Err(refusal) => outbox.refuse(opcode, request_id, refusal),
        }
        outbox.finished_one();
    })
    .detach();
}

/// Sends an operation to its asset's shard as a task of its own, if the connection has
/// room in flight (else BUSY), and answers with the reply `then` makes of the shard's
/// answer. DERIVE's latency, decode to reply, is recorded here.
fn to_shard(
    ctx: &Rc<CoreContext>,
    outbox: &Rc<Outbox>,
    (opcode, request_id): (u8, u64),
    (op, rate, then): (ShardOp, Option<RateCheck>, Then),
    started: Instant,
) {
    let inflight = outbox.inflight.get();
    if inflight >= ctx.settings.get().limits.max_inflight_per_connection {
        let mut refusal = Refusal::new(
            Status::Busy,
            format!(
                "{inflight} requests already in flight on this connection (limits.max_inflight_per_connection)"
            ),
        );
        refusal.retry_after_ms = 1;
        return outbox.refuse(opcode, request_id, refusal);
    }
    outbox.inflight.set(inflight + 1);
    let is_derive = matches!(then, Then::Derived(_));
    let ctx = ctx.clone();
    let outbox = outbox.clone();
    glommio::spawn_local(async move {
        let answer = ctx.router.route(op, rate).await;
        match answer.and_then(|answer| then.reply(&ctx, answer)) {
            Ok(reply) => outbox.push(opcode, request_id, &reply),
            Err(refusal) => outbox.refuse(opcode, request_id, refusal),
        }
        if is_derive {
            ctx.metrics
                .borrow_mut()
                .derive_latency
                .record(started.elapsed());
        }
        outbox.finished_one();
    })
    .detach();
}

/// One half of a stream shared by a connection's reader and writer tasks. Both run on the
/// same core and each borrow lasts one poll, so no lock is needed.
struct Half<S>(Rc<RefCell<S>>);

impl<S: AsyncRead + Unpin> AsyncRead for Half<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}

/// The first of `n` consecutive loopback ports nobody listens on now, for the tools that
/// start an appliance of their own (`custody-load demo`, the tests).
///
/// Ports come from a per-process counter below the kernel's ephemeral range, never from
/// the kernel's own choice (`bind(0)`): a port the kernel hands out that way is one it may
/// hand out again, a moment later, as the local port of an outgoing connection (a client,
/// the store) or to another caller, before custodyd binds it; CI saw "Address already in
/// use" from exactly that race. Below the ephemeral range no outgoing connection takes the
/// port, and the counter gives none out twice in a process.
pub fn free_loopback_ports(n: u16) -> io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = loopback_port_pool()?;
    let span = u32::from(high - low);
    // Start where the process id says, so that two processes on one host (two
    // checkouts' tests) seldom walk the same ports. Hashed (Knuth's multiplier): the
    // pids of processes started together are a few apart, and so were their walks.
    let _ = NEXT.compare_exchange(
        0,
        1 + std::process::id().wrapping_mul(2_654_435_761) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(u32::from(n.max(1)), Ordering::Relaxed) % span;
        let Some(first) = u16::try_from(u32::from(low) + offset)
            .ok()
            .filter(|f| f.checked_add(n).is_some_and(|end| end <= high))
        else {
            continue;
        };
        let all_free =
            (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", first + i)).is_ok());
        if all_free {
            return Ok(first);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no {n} free consecutive loopback ports in {low}..{high}"),
    ))
}

/// The ports [`free_loopback_ports`] hands out: above the well-known services and below
/// the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999 by default).
fn loopback_port_pool() -> io::Result<(u16, u16)> {
    const LOW: u16 = 12_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low < LOW + 2_000 {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!(
                "net.ipv4.ip_local_port_range starts at {ephemeral_low}: no room below it for fixed loopback ports"
            ),
        ));
    }
    Ok((LOW, ephemeral_low))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ports_are_bindable_below_the_ephemeral_range_and_never_handed_out_twice() {
        let (low, high) = loopback_port_pool().unwrap();
        let mut seen = std::collections::HashSet::new();
        for n in [1u16, 3, 1, 2, 4] {
            let first = free_loopback_ports(n).unwrap();
            assert!(
                first >= low && first + n <= high,
                "{first}+{n} outside {low}..{high}"
            );
            for p in first..first + n {
                assert!(seen.insert(p), "port {p} handed out twice");
                std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
            }
        }
    }
}

//! Wire protocol v3, sans-IO: frames, the tables of codes ([`Opcode`], [`Status`], seal
//! states and providers), the field reader and writers every body is made with, and the
//! values several layers carry (a [`Receipt`], an [`AssetInfo`], a [`Refusal`]).
//!
//! `docs/protocol.md` is the byte-by-byte specification. Each operation's bodies are in
//! [`crate::op`], one file per operation. Nothing here does I/O: callers hand in bytes
//! and get back either a frame, "need more bytes" (`Ok(None)`), or a typed error that says
//! the stream is invalid.
//!
//! ```text
//!  0      4   5   6       8                16          20
//!  +------+---+---+-------+----------------+-----------+----------------------+
//!  | CSTD | v | op| flags |   request id   | body len  |  body (body len)     |
//!  +------+---+---+-------+----------------+-----------+----------------------+
//!   magic  u8  u8  u16 BE      u64 BE         u32 BE
//! ```
//!
//! A reply carries the request's opcode with bit 7 set, the same request id, and a body that
//! starts with a `u16` status. Every length is checked before it is used.

mod codes;

pub use codes::{Gate, Opcode, ProviderCode, SealStateCode, Status};

use crate::bounds;
use crate::lifecycle::AssetState;
use uuid::Uuid;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"CSTD";
/// The only protocol version this build speaks.
pub const VERSION: u8 = 3;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 20;
/// Bit set in the opcode of every reply.
pub const REPLY_BIT: u8 = 0x80;
/// Identifier of the asset → shard hash announced in HELLO (see docs/protocol.md).
pub const SHARD_HASH_JUMP_FNV1A64: u8 = 1;
/// Length of a derived key on the wire.
pub const KEY_LEN: usize = 32;

/// Why a byte stream or a body is not valid protocol v3.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("bad magic: a frame must start with \"CSTD\"")]
    BadMagic,
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("reserved flags must be zero, got {0:#06x}")]
    ReservedFlags(u16),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("body truncated: {field} needs {needed} more bytes")]
    Truncated { field: &'static str, needed: usize },
    #[error("{0} trailing bytes after the last field")]
    TrailingBytes(usize),
    #[error("field {field}: {reason}")]
    BadField {
        field: &'static str,
        reason: &'static str,
    },
    #[error("unknown status {0}")]
    UnknownStatus(u16),
}

impl WireError {
    /// The status a peer is told when its frame fails with this error.
    pub fn status(&self) -> Status {
        match self {
            WireError::BadMagic | WireError::ReservedFlags(_) => Status::MalformedFrame,
            WireError::UnsupportedVersion(_) => Status::UnsupportedVersion,
            WireError::TooLarge { .. } => Status::FrameTooLarge,
            WireError::UnknownOpcode(_) => Status::UnknownOpcode,
            WireError::Truncated { .. }
            | WireError::TrailingBytes(_)
            | WireError::BadField { .. }
            | WireError::UnknownStatus(_) => Status::BadBody,
        }
    }
}

/// The fixed header of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub opcode: u8,
    pub request_id: u64,
    pub body_len: u32,
}

impl FrameHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.opcode);
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.request_id.to_be_bytes());
        out.extend_from_slice(&self.body_len.to_be_bytes());
    }
}

/// A complete frame found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub body: &'a [u8],
    /// Bytes of the buffer this frame occupies (header and body).
    pub consumed: usize,
}

/// Reads one frame from the front of `buf`.
///
/// `Ok(None)`: the bytes so far are a valid prefix; read more. `Err`: the stream is invalid
/// and no later bytes can fix it. The header is checked as soon as its bytes arrive, so an
/// oversized or foreign frame is refused before its body is buffered.
pub fn decode_frame(buf: &[u8], max_body_bytes: u32) -> Result<Option<Frame<'_>>, WireError> {
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(WireError::BadMagic);
    }
    if buf.len() > 4 && buf[4] != VERSION {
        return Err(WireError::UnsupportedVersion(buf[4]));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let opcode = buf[5];
    let flags = u16::from_be_bytes([buf[6], buf[7]]);
    if flags != 0 {
        return Err(WireError::ReservedFlags(flags));
    }
    let request_id = u64::from_be_bytes(array_at(buf, 8));
    let body_len = u32::from_be_bytes(array_at(buf, 16));
    if body_len > max_body_bytes {
        return Err(WireError::TooLarge {
            len: body_len,
            max: max_body_bytes,
        });
    }
    // body_len <= max_body_bytes <= FRAME_BODY_BYTES_CAP, so this cannot overflow.
    let total = HEADER_LEN + body_len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        header: FrameHeader {
            opcode,
            request_id,
            body_len,
        },
        body: &buf[HEADER_LEN..total],
        consumed: total,
    }))
}

fn array_at<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[at..at + N]);
    out
}

/// A cursor over a body that hands out fields and refuses trailing bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(WireError::Truncated {
                field,
                needed: n - left,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(field, 1)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(array_at(self.take(field, 2)?, 0)))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(array_at(self.take(field, 4)?, 0)))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(array_at(self.take(field, 8)?, 0)))
    }

    pub fn uuid(&mut self, field: &'static str) -> Result<Uuid, WireError> {
        Ok(Uuid::from_bytes(array_at(self.take(field, 16)?, 0)))
    }

    /// A `u8`-length-prefixed string of printable ASCII, at most `max` bytes.
    pub fn short_ascii(&mut self, field: &'static str, max: usize) -> Result<&'a str, WireError> {
        let len = self.u8(field)? as usize;
        if len > max {
            return Err(WireError::BadField {
                field,
                reason: "longer than its limit",
            });
        }
        let bytes = self.take(field, len)?;
        if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(WireError::BadField {
                field,
                reason: "not printable ASCII",
            });
        }
        // Printable ASCII is valid UTF-8.
        std::str::from_utf8(bytes).map_err(|_| WireError::BadField {
            field,
            reason: "not printable ASCII",
        })
    }

    /// A `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn text(&mut self, field: &'static str, max: usize) -> Result<&'a str, WireError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(WireError::BadField {
                field,
                reason: "longer than its limit",
            });
        }
        std::str::from_utf8(self.take(field, len)?).map_err(|_| WireError::BadField {
            field,
            reason: "not UTF-8",
        })
    }

    /// A one-byte boolean: 0 or 1, anything else is a typed error.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadField {
                field,
                reason: "not 0 or 1",
            }),
        }
    }

    /// `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        Ok(array_at(self.take(field, N)?, 0))
    }

    /// A message, finding or reason: [`Reader::text`] of at most
    /// [`bounds::ERROR_MESSAGE_BYTES_MAX`] bytes.
    pub fn message(&mut self, field: &'static str) -> Result<&'a str, WireError> {
        self.text(field, bounds::ERROR_MESSAGE_BYTES_MAX)
    }

    pub fn finish(self) -> Result<(), WireError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

/// Writes a `u8`-length-prefixed field, truncating at 255 bytes (the decoder's limits
/// are lower, so an over-long field is refused by the peer, never silently cut short).
pub fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

/// Writes the body length into the header of the frame that starts at `frame_start`.
pub fn patch_body_len(out: &mut [u8], frame_start: usize) {
    let body_len = (out.len() - frame_start - HEADER_LEN) as u32;
    out[frame_start + 16..frame_start + 20].copy_from_slice(&body_len.to_be_bytes());
}

/// Where an audit record sits in the log: its shard and its per-shard sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Receipt {
    pub shard: u16,
    pub seq: u64,
    /// The record's chain hash (docs/audit.md): what `custody audit prove` checks.
    #[serde(serialize_with = "crate::hex::serialize")]
    pub hash: [u8; 32],
}

/// An asset's state as REGISTER and STATUS report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssetInfo {
    pub asset: Uuid,
    pub state: AssetState,
    pub counter: u64,
    pub shard: u16,
}

/// What ROTATE answers: the asset's new counter, where the rotation's record sits, and
/// whether this is the answer to an earlier request with the same rotation id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rotated {
    pub asset: Uuid,
    pub rotation_id: Uuid,
    pub counter: u64,
    pub previous_counter: u64,
    pub receipt: Receipt,
    pub replayed: bool,
}

/// A refused request: status, when to retry (0 = not applicable), and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub retry_after_ms: u32,
    pub message: String,
    /// NOT_ACTIVE only: the active appliance's client address (`host:port`), when this
    /// one knows it. Carried on the wire after the message, for that status alone.
    pub active: Option<String>,
}

impl Refusal {
    pub fn new(status: Status, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            retry_after_ms: 0,
            message: message.into(),
            active: None,
        }
    }

    /// NOT_ACTIVE: this appliance acknowledges nothing now; `active` is who does, if known.
    pub fn not_active(message: impl Into<String>, active: Option<String>) -> Refusal {
        Refusal {
            active,
            ..Refusal::new(Status::NotActive, message)
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)?;
        if let Some(active) = &self.active {
            write!(f, " (active: {active})")?;
        }
        if self.retry_after_ms > 0 {
            write!(f, " (retry after {} ms)", self.retry_after_ms)?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

/// Writes a `u16`-length-prefixed UTF-8 text (a refusal's message, a finding, a reason),
/// cut at [`bounds::ERROR_MESSAGE_BYTES_MAX`] on a character boundary.
pub fn put_text(out: &mut Vec<u8>, text: &str) {
    let text = truncate_utf8(text, bounds::ERROR_MESSAGE_BYTES_MAX);
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

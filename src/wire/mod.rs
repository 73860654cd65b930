//! Wire protocol v3: a sans-IO codec for frames, requests and replies.
//!
//! `docs/protocol.md` is the byte-by-byte specification; this module is its only
//! implementation, shared by the appliance and the client library. Nothing here does I/O:
//! callers hand in bytes and get back either a frame, "need more bytes" (`Ok(None)`), or a
//! typed error that says the stream is invalid.
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

    pub fn finish(self) -> Result<(), WireError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

/// Body of a DERIVE request, as decoded; field rules are the policy gate's job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeriveBody {
    pub asset: Uuid,
    pub path: String,
    pub region: String,
    pub purpose: u8,
    pub ttl_s: u32,
}

/// A Shamir share as it travels in an UNSEAL request: zeroized when dropped, never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ShareText(pub zeroize::Zeroizing<String>);

impl ShareText {
    pub fn new(text: &str) -> ShareText {
        ShareText(zeroize::Zeroizing::new(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ShareText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShareText(<{} bytes, redacted>)", self.0.len())
    }
}

/// UNSEAL flag: discard the shares submitted so far (before taking this one, if any).
pub const UNSEAL_FLAG_RESET: u8 = 0x01;

/// A decoded request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello,
    Register {
        asset: Uuid,
    },
    Derive(DeriveBody),
    Status {
        asset: Uuid,
    },
    Seal,
    /// A share (empty: ask the HSM provider to unseal now), after an optional reset.
    Unseal {
        reset: bool,
        share: ShareText,
    },
    SealStatus,
    Rotate(RotateBody),
    Suspend {
        asset: Uuid,
    },
    Resume {
        asset: Uuid,
    },
    Retire {
        asset: Uuid,
    },
    SetRegion {
        region: String,
        enabled: bool,
    },
    Regions,
    PolicyReload,
    Reconcile {
        full: bool,
    },
    ProveReceipt(Receipt),
    ListAssets(ListAssets),
}

/// A LIST_ASSETS request: the assets after `after` (by asset id, in RFC 4122 byte order),
/// in `state` if given, at most `limit` (1 to [`bounds::LIST_ASSETS_PAGE_MAX`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListAssets {
    pub state: Option<AssetState>,
    /// Exclusive; the nil UUID starts from the first asset.
    pub after: Uuid,
    pub limit: u16,
}

/// One asset of a LIST_ASSETS page, as the store holds it (durable state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ListedAsset {
    pub asset: Uuid,
    pub state: AssetState,
    pub counter: u64,
    pub shard: u16,
    /// When its state or counter last changed (its registration, its last rotation,
    /// suspension, resumption or retirement).
    pub changed_unix_ms: u64,
}

/// What LIST_ASSETS answers: a page, and whether assets follow its last one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AssetPage {
    pub assets: Vec<ListedAsset>,
    pub more: bool,
}

/// Bytes of one LIST_ASSETS entry.
pub const LISTED_ASSET_BYTES: usize = 16 + 1 + 8 + 2 + 8;

/// What PROVE_RECEIPT answers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProofInfo {
    /// [`crate::reconcile::Verdict`]'s code.
    pub verdict: u8,
    /// The checkpoint that covers the record (0: none).
    pub checkpoint_seq: u64,
    pub detail: String,
}

/// RECONCILE flag: a full run from the first record (else from the last run's watermark).
pub const RECONCILE_FLAG_FULL: u8 = 0x01;
/// Findings a RECONCILE reply carries at most (the appliance's log has every one).
pub const RECONCILE_FINDINGS_MAX: usize = 16;

/// What RECONCILE answers (the drift ratio is `assets_drifted / assets_checked`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileSummary {
    pub records_checked: u64,
    pub checkpoints_checked: u64,
    pub assets_checked: u64,
    pub assets_drifted: u64,
    pub macs_checked: bool,
    /// Findings of the run in all.
    pub findings_total: u32,
    /// The first [`RECONCILE_FINDINGS_MAX`] of them, one line each.
    pub findings: Vec<String>,
}

/// ROTATE flag: `expected_counter` holds (compare-and-set).
pub const ROTATE_FLAG_EXPECTED: u8 = 0x01;

/// Body of a ROTATE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotateBody {
    pub asset: Uuid,
    /// Chosen by the caller; the same id sent again returns the first result.
    pub rotation_id: Uuid,
    /// Rotate only if the asset's counter is this one.
    pub expected_counter: Option<u64>,
}

impl Request {
    /// The asset the request is about, if any: the one that picks its shard.
    pub fn asset(&self) -> Option<Uuid> {
        match self {
            Request::Register { asset }
            | Request::Status { asset }
            | Request::Suspend { asset }
            | Request::Resume { asset }
            | Request::Retire { asset } => Some(*asset),
            Request::Derive(d) => Some(d.asset),
            Request::Rotate(r) => Some(r.asset),
            _ => None,
        }
    }

    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello => Opcode::Hello,
            Request::Register { .. } => Opcode::Register,
            Request::Derive(_) => Opcode::Derive,
            Request::Status { .. } => Opcode::Status,
            Request::Seal => Opcode::Seal,
            Request::Unseal { .. } => Opcode::Unseal,
            Request::SealStatus => Opcode::SealStatus,
            Request::Rotate(_) => Opcode::Rotate,
            Request::Suspend { .. } => Opcode::Suspend,
            Request::Resume { .. } => Opcode::Resume,
            Request::Retire { .. } => Opcode::Retire,
            Request::SetRegion { .. } => Opcode::SetRegion,
            Request::Regions => Opcode::Regions,
            Request::PolicyReload => Opcode::PolicyReload,
            Request::Reconcile { .. } => Opcode::Reconcile,
            Request::ProveReceipt(_) => Opcode::ProveReceipt,
            Request::ListAssets(_) => Opcode::ListAssets,
        }
    }

    /// Decodes the body of a request frame.
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Request, WireError> {
        let op = Opcode::from_u8(opcode).ok_or(WireError::UnknownOpcode(opcode))?;
        let mut r = Reader::new(body);
        let request = match op {
            Opcode::Hello => Request::Hello,
            Opcode::Regions => Request::Regions,
            Opcode::PolicyReload => Request::PolicyReload,
            Opcode::ProveReceipt => Request::ProveReceipt(Receipt {
                shard: r.u16("shard")?,
                seq: r.u64("seq")?,
                hash: array_at(r.take("hash", 32)?, 0),
            }),
            Opcode::ListAssets => {
                let state = match r.u8("state")? {
                    0 => None,
                    code => Some(AssetState::from_u8(code).ok_or(WireError::BadField {
                        field: "state",
                        reason: "not 0 (any) or an asset state code",
                    })?),
                };
                let after = r.uuid("after")?;
                let limit = r.u16("limit")?;
                if limit == 0 || limit > bounds::LIST_ASSETS_PAGE_MAX {
                    return Err(WireError::BadField {
                        field: "limit",
                        reason: "not 1 to 256",
                    });
                }
                Request::ListAssets(ListAssets {
                    state,
                    after,
                    limit,
                })
            }
            Opcode::Reconcile => {
                let flags = r.u8("flags")?;
                if flags & !RECONCILE_FLAG_FULL != 0 {
                    return Err(WireError::BadField {
                        field: "flags",
                        reason: "unknown flag bits",
                    });
                }
                Request::Reconcile {
                    full: flags & RECONCILE_FLAG_FULL != 0,
                }
            }
            Opcode::SetRegion => {
                let enabled = match r.u8("enabled")? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(WireError::BadField {
                            field: "enabled",
                            reason: "not 0 or 1",
                        })
                    }
                };
                let region = r
                    .short_ascii("region", bounds::REGION_TEXT_BYTES_MAX)?
                    .to_owned();
                Request::SetRegion { region, enabled }
            }
            Opcode::Seal => Request::Seal,
            Opcode::SealStatus => Request::SealStatus,
            Opcode::Unseal => {
                let flags = r.u8("flags")?;
                if flags & !UNSEAL_FLAG_RESET != 0 {
                    return Err(WireError::BadField {
                        field: "flags",
                        reason: "reserved bits set",
                    });
                }
                let share = r.short_ascii("share", bounds::SHARE_TEXT_BYTES_MAX)?;
                Request::Unseal {
                    reset: flags & UNSEAL_FLAG_RESET != 0,
                    share: ShareText::new(share),
                }
            }
            Opcode::Register => Request::Register {
                asset: r.uuid("asset_id")?,
            },
            Opcode::Suspend => Request::Suspend {
                asset: r.uuid("asset_id")?,
            },
            Opcode::Resume => Request::Resume {
                asset: r.uuid("asset_id")?,
            },
            Opcode::Retire => Request::Retire {
                asset: r.uuid("asset_id")?,
            },
            Opcode::Rotate => {
                let asset = r.uuid("asset_id")?;
                let rotation_id = r.uuid("rotation_id")?;
                let flags = r.u8("flags")?;
                if flags & !ROTATE_FLAG_EXPECTED != 0 {
                    return Err(WireError::BadField {
                        field: "flags",
                        reason: "reserved bits set",
                    });
                }
                let expected = r.u64("expected_counter")?;
                if flags & ROTATE_FLAG_EXPECTED == 0 && expected != 0 {
                    // One encoding per request: without the flag the field is zero.
                    return Err(WireError::BadField {
                        field: "expected_counter",
                        reason: "non-zero without the EXPECTED flag",
                    });
                }
                Request::Rotate(RotateBody {
                    asset,
                    rotation_id,
                    expected_counter: (flags & ROTATE_FLAG_EXPECTED != 0).then_some(expected),
                })
            }
            Opcode::Status => Request::Status {
                asset: r.uuid("asset_id")?,
            },
            Opcode::Derive => Request::Derive(DeriveBody {
                asset: r.uuid("asset_id")?,
                path: r
                    .short_ascii("path", bounds::PATH_TEXT_BYTES_MAX)?
                    .to_owned(),
                region: r
                    .short_ascii("region", bounds::REGION_TEXT_BYTES_MAX)?
                    .to_owned(),
                purpose: r.u8("purpose")?,
                ttl_s: r.u32("ttl_s")?,
            }),
        };
        r.finish()?;
        Ok(request)
    }

    /// Encodes a whole request frame (header and body) onto `out`.
    pub fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        let start = out.len();
        FrameHeader {
            opcode: self.opcode() as u8,
            request_id,
            body_len: 0,
        }
        .encode(out);
        match self {
            Request::Hello
            | Request::Seal
            | Request::SealStatus
            | Request::Regions
            | Request::PolicyReload => {}
            Request::Reconcile { full } => {
                out.push(if *full { RECONCILE_FLAG_FULL } else { 0 });
            }
            Request::ListAssets(l) => {
                out.push(l.state.map_or(0, |s| s as u8));
                out.extend_from_slice(l.after.as_bytes());
                out.extend_from_slice(&l.limit.to_be_bytes());
            }
            Request::ProveReceipt(receipt) => {
                out.extend_from_slice(&receipt.shard.to_be_bytes());
                out.extend_from_slice(&receipt.seq.to_be_bytes());
                out.extend_from_slice(&receipt.hash);
            }
            Request::SetRegion { region, enabled } => {
                out.push(u8::from(*enabled));
                put_short(out, region.as_bytes());
            }
            Request::Unseal { reset, share } => {
                out.push(if *reset { UNSEAL_FLAG_RESET } else { 0 });
                put_short(out, share.as_str().as_bytes());
            }
            Request::Register { asset }
            | Request::Status { asset }
            | Request::Suspend { asset }
            | Request::Resume { asset }
            | Request::Retire { asset } => out.extend_from_slice(asset.as_bytes()),
            Request::Rotate(b) => {
                out.extend_from_slice(b.asset.as_bytes());
                out.extend_from_slice(b.rotation_id.as_bytes());
                out.push(if b.expected_counter.is_some() {
                    ROTATE_FLAG_EXPECTED
                } else {
                    0
                });
                out.extend_from_slice(&b.expected_counter.unwrap_or(0).to_be_bytes());
            }
            Request::Derive(d) => {
                out.extend_from_slice(d.asset.as_bytes());
                put_short(out, d.path.as_bytes());
                put_short(out, d.region.as_bytes());
                out.push(d.purpose);
                out.extend_from_slice(&d.ttl_s.to_be_bytes());
            }
        }
        patch_body_len(out, start);
    }
}

/// Writes a `u8`-length-prefixed field, truncating at 255 bytes (the decoder's limits
/// are lower, so an over-long field is refused by the peer, never silently cut short).
fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

fn patch_body_len(out: &mut [u8], frame_start: usize) {
    let body_len = (out.len() - frame_start - HEADER_LEN) as u32;
    out[frame_start + 16..frame_start + 20].copy_from_slice(&body_len.to_be_bytes());
}

/// Where an audit record sits in the log: its shard and its per-shard sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Receipt {
    pub shard: u16,
    pub seq: u64,
    /// The record's chain hash (docs/audit.md): what `custody audit prove` checks.
    #[serde(serialize_with = "hex32")]
    pub hash: [u8; 32],
}

fn hex32<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// What HELLO reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HelloInfo {
    pub version: u8,
    pub shard_count: u16,
    pub shard_hash: u8,
    pub max_frame_body_bytes: u32,
    pub max_inflight_per_connection: u32,
    /// The port each shard also listens on, by shard (`server.shard_listen`): a client
    /// that sends each asset's requests to its shard's port never has them cross cores.
    /// Empty when the appliance has no per-shard ports.
    pub shard_ports: Vec<u16>,
}

/// An asset's state as REGISTER and STATUS report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssetInfo {
    pub asset: Uuid,
    pub state: AssetState,
    pub counter: u64,
    pub shard: u16,
}

/// A successful derivation. The key is zeroized when this value drops.
#[derive(Clone, PartialEq, Eq)]
pub struct Derived {
    pub counter: u64,
    pub scheme_version: u8,
    pub key: zeroize::Zeroizing<[u8; KEY_LEN]>,
    pub receipt: Receipt,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Derived")
            .field("counter", &self.counter)
            .field("scheme_version", &self.scheme_version)
            .field("key", &"<redacted>")
            .field("receipt", &self.receipt)
            .finish()
    }
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

/// What POLICY_RELOAD answers: the policy now in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyReloaded {
    /// The policy's generation (1 at start, one more per reload).
    pub generation: u64,
    /// Identities that hold a role.
    pub identities: u32,
    /// Configured regions.
    pub regions: u16,
    /// Asset groups defined.
    pub asset_groups: u16,
}

/// What SEAL, UNSEAL and SEAL_STATUS answer. Times are Unix milliseconds (0: none).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SealInfo {
    pub state: SealStateCode,
    pub provider: ProviderCode,
    /// Shares submitted so far (`shamir`; 0 otherwise).
    pub shares_received: u8,
    /// Shares needed (k), and shares made (n); 0 for the other providers.
    pub threshold: u8,
    pub shares: u8,
    /// When the current state began (0 while unsealed and fresh).
    pub since_unix_ms: u64,
    /// When the serving key was unsealed (0: no key).
    pub key_unsealed_unix_ms: u64,
    /// Provider calls by result, and times the breaker opened.
    pub calls_ok: u64,
    pub calls_failed: u64,
    pub calls_timed_out: u64,
    pub breaker_opened: u64,
    /// The fingerprint of the seed last unsealed or (`shamir`) of the seed the shares must
    /// rebuild; all zero when not known yet. Compare it with the ceremony record.
    #[serde(serialize_with = "hex_bytes")]
    pub fingerprint: [u8; 16],
    /// Why it is sealed by failure (empty otherwise).
    pub reason: String,
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.serialize_str(&text)
}

/// A refused request: status, when to retry (0 = not applicable), and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub retry_after_ms: u32,
    pub message: String,
}

impl Refusal {
    pub fn new(status: Status, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            retry_after_ms: 0,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)?;
        if self.retry_after_ms > 0 {
            write!(f, " (retry after {} ms)", self.retry_after_ms)?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

/// A decoded reply body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Hello(HelloInfo),
    Asset(AssetInfo),
    Derived(Derived),
    Seal(SealInfo),
    Rotated(Rotated),
    /// The configured regions, in configuration order, and whether each is enabled.
    Regions(Vec<(String, bool)>),
    PolicyReloaded(PolicyReloaded),
    Reconciled(ReconcileSummary),
    Proof(ProofInfo),
    Assets(AssetPage),
    Refused(Refusal),
}

impl Reply {
    /// Encodes a whole reply frame onto `out`.
    pub fn encode(&self, opcode: u8, request_id: u64, out: &mut Vec<u8>) {
        let start = out.len();
        FrameHeader {
            opcode: opcode | REPLY_BIT,
            request_id,
            body_len: 0,
        }
        .encode(out);
        match self {
            Reply::Hello(h) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.push(h.version);
                out.extend_from_slice(&h.shard_count.to_be_bytes());
                out.push(h.shard_hash);
                out.extend_from_slice(&h.max_frame_body_bytes.to_be_bytes());
                out.extend_from_slice(&h.max_inflight_per_connection.to_be_bytes());
                out.extend_from_slice(&(h.shard_ports.len() as u16).to_be_bytes());
                for port in &h.shard_ports {
                    out.extend_from_slice(&port.to_be_bytes());
                }
            }
            Reply::Assets(page) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                let n = page
                    .assets
                    .len()
                    .min(usize::from(bounds::LIST_ASSETS_PAGE_MAX));
                out.extend_from_slice(&(n as u16).to_be_bytes());
                for a in &page.assets[..n] {
                    out.extend_from_slice(a.asset.as_bytes());
                    out.push(a.state as u8);
                    out.extend_from_slice(&a.counter.to_be_bytes());
                    out.extend_from_slice(&a.shard.to_be_bytes());
                    out.extend_from_slice(&a.changed_unix_ms.to_be_bytes());
                }
                out.push(u8::from(page.more));
            }
            Reply::Asset(a) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.extend_from_slice(a.asset.as_bytes());
                out.push(a.state as u8);
                out.extend_from_slice(&a.counter.to_be_bytes());
                out.extend_from_slice(&a.shard.to_be_bytes());
            }
            Reply::Derived(d) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.extend_from_slice(&d.counter.to_be_bytes());
                out.push(d.scheme_version);
                out.extend_from_slice(&d.key[..]);
                out.extend_from_slice(&d.receipt.shard.to_be_bytes());
                out.extend_from_slice(&d.receipt.seq.to_be_bytes());
                out.extend_from_slice(&d.receipt.hash);
            }
            Reply::Regions(list) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                // At most 255 regions are configured (config checks it).
                let n = list.len().min(255);
                out.push(n as u8);
                for (name, enabled) in &list[..n] {
                    put_short(out, name.as_bytes());
                    out.push(u8::from(*enabled));
                }
            }
            Reply::PolicyReloaded(p) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.extend_from_slice(&p.generation.to_be_bytes());
                out.extend_from_slice(&p.identities.to_be_bytes());
                out.extend_from_slice(&p.regions.to_be_bytes());
                out.extend_from_slice(&p.asset_groups.to_be_bytes());
            }
            Reply::Proof(p) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.push(p.verdict);
                out.extend_from_slice(&p.checkpoint_seq.to_be_bytes());
                let detail = truncate_utf8(&p.detail, bounds::ERROR_MESSAGE_BYTES_MAX);
                out.extend_from_slice(&(detail.len() as u16).to_be_bytes());
                out.extend_from_slice(detail.as_bytes());
            }
            Reply::Reconciled(r) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                for v in [
                    r.records_checked,
                    r.checkpoints_checked,
                    r.assets_checked,
                    r.assets_drifted,
                ] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.push(u8::from(r.macs_checked));
                out.extend_from_slice(&r.findings_total.to_be_bytes());
                let n = r.findings.len().min(RECONCILE_FINDINGS_MAX);
                out.push(n as u8);
                for f in &r.findings[..n] {
                    let f = truncate_utf8(f, bounds::ERROR_MESSAGE_BYTES_MAX);
                    out.extend_from_slice(&(f.len() as u16).to_be_bytes());
                    out.extend_from_slice(f.as_bytes());
                }
            }
            Reply::Rotated(r) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.extend_from_slice(r.asset.as_bytes());
                out.extend_from_slice(r.rotation_id.as_bytes());
                out.extend_from_slice(&r.counter.to_be_bytes());
                out.extend_from_slice(&r.previous_counter.to_be_bytes());
                out.extend_from_slice(&r.receipt.shard.to_be_bytes());
                out.extend_from_slice(&r.receipt.seq.to_be_bytes());
                out.extend_from_slice(&r.receipt.hash);
                out.push(u8::from(r.replayed));
            }
            Reply::Seal(s) => {
                out.extend_from_slice(&(Status::Ok as u16).to_be_bytes());
                out.push(s.state as u8);
                out.push(s.provider as u8);
                out.push(s.shares_received);
                out.push(s.threshold);
                out.push(s.shares);
                for v in [
                    s.since_unix_ms,
                    s.key_unsealed_unix_ms,
                    s.calls_ok,
                    s.calls_failed,
                    s.calls_timed_out,
                    s.breaker_opened,
                ] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.extend_from_slice(&s.fingerprint);
                let reason = truncate_utf8(&s.reason, bounds::ERROR_MESSAGE_BYTES_MAX);
                out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Reply::Refused(r) => {
                out.extend_from_slice(&(r.status as u16).to_be_bytes());
                out.extend_from_slice(&r.retry_after_ms.to_be_bytes());
                let msg = truncate_utf8(&r.message, bounds::ERROR_MESSAGE_BYTES_MAX);
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.extend_from_slice(msg.as_bytes());
            }
        }
        patch_body_len(out, start);
    }

    /// Decodes the body of a reply to a request with opcode `request_opcode`.
    pub fn decode(request_opcode: Opcode, body: &[u8]) -> Result<Reply, WireError> {
        let mut r = Reader::new(body);
        let raw_status = r.u16("status")?;
        let status = Status::from_u16(raw_status).ok_or(WireError::UnknownStatus(raw_status))?;
        let reply = if status != Status::Ok {
            let retry_after_ms = r.u32("retry_after_ms")?;
            let message = r
                .text("message", bounds::ERROR_MESSAGE_BYTES_MAX)?
                .to_owned();
            Reply::Refused(Refusal {
                status,
                retry_after_ms,
                message,
            })
        } else {
            match request_opcode {
                Opcode::Hello => {
                    let version = r.u8("version")?;
                    let shard_count = r.u16("shard_count")?;
                    let shard_hash = r.u8("shard_hash")?;
                    let max_frame_body_bytes = r.u32("max_frame_body_bytes")?;
                    let max_inflight_per_connection = r.u32("max_inflight_per_connection")?;
                    let n = r.u16("shard_port_count")?;
                    if n != 0 && n != shard_count {
                        return Err(WireError::BadField {
                            field: "shard_port_count",
                            reason: "neither 0 nor shard_count",
                        });
                    }
                    let mut shard_ports = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        match r.u16("shard_port")? {
                            0 => {
                                return Err(WireError::BadField {
                                    field: "shard_port",
                                    reason: "port 0",
                                })
                            }
                            port => shard_ports.push(port),
                        }
                    }
                    Reply::Hello(HelloInfo {
                        version,
                        shard_count,
                        shard_hash,
                        max_frame_body_bytes,
                        max_inflight_per_connection,
                        shard_ports,
                    })
                }
                Opcode::SetRegion | Opcode::Regions => {
                    let n = r.u8("count")?;
                    let mut list = Vec::with_capacity(n.into());
                    for _ in 0..n {
                        let name = r
                            .short_ascii("region", bounds::REGION_TEXT_BYTES_MAX)?
                            .to_owned();
                        let enabled = match r.u8("enabled")? {
                            0 => false,
                            1 => true,
                            _ => {
                                return Err(WireError::BadField {
                                    field: "enabled",
                                    reason: "not 0 or 1",
                                })
                            }
                        };
                        list.push((name, enabled));
                    }
                    Reply::Regions(list)
                }
                Opcode::ListAssets => {
                    let n = r.u16("count")?;
                    if n > bounds::LIST_ASSETS_PAGE_MAX {
                        return Err(WireError::BadField {
                            field: "count",
                            reason: "more than 256",
                        });
                    }
                    let mut assets = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        let asset = r.uuid("asset_id")?;
                        let state =
                            AssetState::from_u8(r.u8("state")?).ok_or(WireError::BadField {
                                field: "state",
                                reason: "unknown asset state",
                            })?;
                        assets.push(ListedAsset {
                            asset,
                            state,
                            counter: r.u64("counter")?,
                            shard: r.u16("shard")?,
                            changed_unix_ms: r.u64("changed_unix_ms")?,
                        });
                    }
                    let more = match r.u8("more")? {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(WireError::BadField {
                                field: "more",
                                reason: "not 0 or 1",
                            })
                        }
                    };
                    Reply::Assets(AssetPage { assets, more })
                }
                Opcode::ProveReceipt => Reply::Proof(ProofInfo {
                    verdict: r.u8("verdict")?,
                    checkpoint_seq: r.u64("checkpoint_seq")?,
                    detail: r
                        .text("detail", bounds::ERROR_MESSAGE_BYTES_MAX)?
                        .to_owned(),
                }),
                Opcode::Reconcile => {
                    let records_checked = r.u64("records_checked")?;
                    let checkpoints_checked = r.u64("checkpoints_checked")?;
                    let assets_checked = r.u64("assets_checked")?;
                    let assets_drifted = r.u64("assets_drifted")?;
                    let macs_checked = match r.u8("macs_checked")? {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(WireError::BadField {
                                field: "macs_checked",
                                reason: "not 0 or 1",
                            })
                        }
                    };
                    let findings_total = r.u32("findings_total")?;
                    let n = r.u8("findings")? as usize;
                    if n > RECONCILE_FINDINGS_MAX {
                        return Err(WireError::BadField {
                            field: "findings",
                            reason: "more than 16",
                        });
                    }
                    let mut findings = Vec::with_capacity(n);
                    for _ in 0..n {
                        findings.push(
                            r.text("finding", bounds::ERROR_MESSAGE_BYTES_MAX)?
                                .to_owned(),
                        );
                    }
                    Reply::Reconciled(ReconcileSummary {
                        records_checked,
                        checkpoints_checked,
                        assets_checked,
                        assets_drifted,
                        macs_checked,
                        findings_total,
                        findings,
                    })
                }
                Opcode::PolicyReload => Reply::PolicyReloaded(PolicyReloaded {
                    generation: r.u64("generation")?,
                    identities: r.u32("identities")?,
                    regions: r.u16("regions")?,
                    asset_groups: r.u16("asset_groups")?,
                }),
                Opcode::Rotate => {
                    let asset = r.uuid("asset_id")?;
                    let rotation_id = r.uuid("rotation_id")?;
                    let counter = r.u64("counter")?;
                    let previous_counter = r.u64("previous_counter")?;
                    let receipt = Receipt {
                        shard: r.u16("shard")?,
                        seq: r.u64("seq")?,
                        hash: array_at(r.take("hash", 32)?, 0),
                    };
                    let replayed = match r.u8("replayed")? {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(WireError::BadField {
                                field: "replayed",
                                reason: "not 0 or 1",
                            })
                        }
                    };
                    Reply::Rotated(Rotated {
                        asset,
                        rotation_id,
                        counter,
                        previous_counter,
                        receipt,
                        replayed,
                    })
                }
                Opcode::Register
                | Opcode::Status
                | Opcode::Suspend
                | Opcode::Resume
                | Opcode::Retire => {
                    let asset = r.uuid("asset_id")?;
                    let state = AssetState::from_u8(r.u8("state")?).ok_or(WireError::BadField {
                        field: "state",
                        reason: "unknown asset state",
                    })?;
                    Reply::Asset(AssetInfo {
                        asset,
                        state,
                        counter: r.u64("counter")?,
                        shard: r.u16("shard")?,
                    })
                }
                Opcode::Seal | Opcode::Unseal | Opcode::SealStatus => {
                    let state =
                        SealStateCode::from_u8(r.u8("state")?).ok_or(WireError::BadField {
                            field: "state",
                            reason: "unknown seal state",
                        })?;
                    let provider =
                        ProviderCode::from_u8(r.u8("provider")?).ok_or(WireError::BadField {
                            field: "provider",
                            reason: "unknown seal provider",
                        })?;
                    Reply::Seal(SealInfo {
                        state,
                        provider,
                        shares_received: r.u8("shares_received")?,
                        threshold: r.u8("threshold")?,
                        shares: r.u8("shares")?,
                        since_unix_ms: r.u64("since_unix_ms")?,
                        key_unsealed_unix_ms: r.u64("key_unsealed_unix_ms")?,
                        calls_ok: r.u64("calls_ok")?,
                        calls_failed: r.u64("calls_failed")?,
                        calls_timed_out: r.u64("calls_timed_out")?,
                        breaker_opened: r.u64("breaker_opened")?,
                        fingerprint: array_at(r.take("fingerprint", 16)?, 0),
                        reason: r
                            .text("reason", bounds::ERROR_MESSAGE_BYTES_MAX)?
                            .to_owned(),
                    })
                }
                Opcode::Derive => {
                    let counter = r.u64("counter")?;
                    let scheme_version = r.u8("scheme_version")?;
                    let mut key = zeroize::Zeroizing::new([0u8; KEY_LEN]);
                    key.copy_from_slice(r.take("key", KEY_LEN)?);
                    Reply::Derived(Derived {
                        counter,
                        scheme_version,
                        key,
                        receipt: Receipt {
                            shard: r.u16("shard")?,
                            seq: r.u64("seq")?,
                            hash: array_at(r.take("hash", 32)?, 0),
                        },
                    })
                }
            }
        };
        r.finish()?;
        Ok(reply)
    }
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

/// Fuzz entry point: any bytes through the frame and request decoders must give a frame,
/// "need more", or a typed error, never a panic. `fuzz/` and the unit tests call this.
pub fn fuzz_decode(data: &[u8]) {
    let mut buf = data;
    // Bounded: every iteration consumes at least HEADER_LEN bytes.
    while let Ok(Some(frame)) = decode_frame(buf, bounds::FRAME_BODY_BYTES_CAP) {
        if let Ok(request) = Request::decode(frame.header.opcode, frame.body) {
            let mut again = Vec::new();
            request.encode(frame.header.request_id, &mut again);
            assert_eq!(&again[HEADER_LEN..], frame.body, "request codec round trip");
        }
        for &op in Opcode::ALL {
            if let Ok(reply) = Reply::decode(op, frame.body) {
                let mut again = Vec::new();
                reply.encode(op as u8, frame.header.request_id, &mut again);
                assert_eq!(&again[HEADER_LEN..], frame.body, "reply codec round trip");
            }
        }
        buf = &buf[frame.consumed..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derive_body() -> DeriveBody {
        DeriveBody {
            asset: Uuid::from_bytes([0x11; 16]),
            path: "m/44'/0'/0'/0'/7".into(),
            region: "US-EAST".into(),
            purpose: 1,
            ttl_s: 300,
        }
    }

    #[test]
    fn header_layout_is_byte_exact() {
        let mut out = Vec::new();
        Request::Status {
            asset: Uuid::from_bytes([0xAB; 16]),
        }
        .encode(0x0102030405060708, &mut out);
        assert_eq!(
            &out[..HEADER_LEN],
            &[
                0x43, 0x53, 0x54, 0x44, // "CSTD"
                0x03, // version
                0x04, // STATUS
                0x00, 0x00, // flags
                0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // request id
                0x00, 0x00, 0x00, 0x10, // body length 16
            ]
        );
        assert_eq!(out.len(), HEADER_LEN + 16);
    }

    #[test]
    fn request_round_trip() {
        for req in [
            Request::Hello,
            Request::Register {
                asset: Uuid::from_bytes([7; 16]),
            },
            Request::Status {
                asset: Uuid::from_bytes([9; 16]),
            },
            Request::Derive(derive_body()),
            Request::Seal,
            Request::SealStatus,
            Request::Suspend {
                asset: Uuid::from_bytes([4; 16]),
            },
            Request::Resume {
                asset: Uuid::from_bytes([5; 16]),
            },
            Request::Retire {
                asset: Uuid::from_bytes([6; 16]),
            },
            Request::Rotate(RotateBody {
                asset: Uuid::from_bytes([7; 16]),
                rotation_id: Uuid::from_bytes([8; 16]),
                expected_counter: None,
            }),
            Request::Regions,
            Request::SetRegion {
                region: "EU-WEST".into(),
                enabled: false,
            },
            Request::Rotate(RotateBody {
                asset: Uuid::from_bytes([7; 16]),
                rotation_id: Uuid::from_bytes([8; 16]),
                expected_counter: Some(u64::MAX),
            }),
            Request::Unseal {
                reset: false,
                share: ShareText::new(""),
            },
            Request::Unseal {
                reset: true,
                share: ShareText::new("custody-share/1:5b0d:3:1:00ff:0a0b0c0d"),
            },
        ] {
            let mut out = Vec::new();
            req.encode(42, &mut out);
            let frame = decode_frame(&out, 1024).unwrap().unwrap();
            assert_eq!(frame.consumed, out.len());
            assert_eq!(frame.header.request_id, 42);
            assert_eq!(
                Request::decode(frame.header.opcode, frame.body).unwrap(),
                req
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete_not_invalid() {
        let mut out = Vec::new();
        Request::Derive(derive_body()).encode(1, &mut out);
        for end in 0..out.len() {
            assert_eq!(decode_frame(&out[..end], 1024), Ok(None), "prefix {end}");
        }
        assert!(decode_frame(&out, 1024).unwrap().is_some());
    }

    #[test]
    fn invalid_headers_are_refused_early() {
        assert_eq!(decode_frame(b"CSX", 1024), Err(WireError::BadMagic));
        assert_eq!(
            decode_frame(b"GET / HTTP/1.1", 1024),
            Err(WireError::BadMagic)
        );
        assert_eq!(
            decode_frame(b"CSTD\x01", 1024),
            Err(WireError::UnsupportedVersion(1))
        );
        let mut out = Vec::new();
        Request::Hello.encode(1, &mut out);
        out[6] = 0x80;
        assert_eq!(
            decode_frame(&out, 1024),
            Err(WireError::ReservedFlags(0x8000))
        );
        // An oversized frame is refused from its header alone.
        let mut big = Vec::new();
        FrameHeader {
            opcode: 1,
            request_id: 1,
            body_len: 4097,
        }
        .encode(&mut big);
        assert_eq!(
            decode_frame(&big, 4096),
            Err(WireError::TooLarge {
                len: 4097,
                max: 4096
            })
        );
    }

    #[test]
    fn bad_bodies_are_typed() {
        assert_eq!(
            Request::decode(0x7f, &[]),
            Err(WireError::UnknownOpcode(0x7f))
        );
        assert_eq!(
            Request::decode(Opcode::Status as u8, &[0; 15]),
            Err(WireError::Truncated {
                field: "asset_id",
                needed: 1
            })
        );
        assert_eq!(
            Request::decode(Opcode::Status as u8, &[0; 17]),
            Err(WireError::TrailingBytes(1))
        );
        let mut out = Vec::new();
        let mut body = derive_body();
        body.path = "m/44'/0'/0'/0'/\u{7}".into();
        Request::Derive(body).encode(1, &mut out);
        assert_eq!(
            Request::decode(Opcode::Derive as u8, &out[HEADER_LEN..]),
            Err(WireError::BadField {
                field: "path",
                reason: "not printable ASCII"
            })
        );
        for e in [
            WireError::TrailingBytes(1),
            WireError::Truncated {
                field: "x",
                needed: 1,
            },
        ] {
            assert_eq!(e.status(), Status::BadBody);
        }
    }

    #[test]
    fn unseal_bodies_are_checked() {
        // Reserved flag bits, an over-long share, a share that is not printable ASCII.
        assert_eq!(
            Request::decode(Opcode::Unseal as u8, &[0x02, 0]),
            Err(WireError::BadField {
                field: "flags",
                reason: "reserved bits set"
            })
        );
        let mut long = vec![0u8, (bounds::SHARE_TEXT_BYTES_MAX + 1) as u8];
        long.extend(std::iter::repeat(b'a').take(bounds::SHARE_TEXT_BYTES_MAX + 1));
        assert_eq!(
            Request::decode(Opcode::Unseal as u8, &long),
            Err(WireError::BadField {
                field: "share",
                reason: "longer than its limit"
            })
        );
        assert_eq!(
            Request::decode(Opcode::Unseal as u8, &[0, 2, b'a', b' ']),
            Err(WireError::BadField {
                field: "share",
                reason: "not printable ASCII"
            })
        );
        assert_eq!(
            Request::decode(Opcode::Seal as u8, &[0]),
            Err(WireError::TrailingBytes(1))
        );
        // The share never shows in a Debug print of the request.
        let req = Request::Unseal {
            reset: false,
            share: ShareText::new("custody-share/1:secret-part"),
        };
        assert!(!format!("{req:?}").contains("secret-part"));
    }

    #[test]
    fn rotate_bodies_are_checked() {
        let mut body = vec![0u8; 41];
        body[32] = 0x02;
        assert_eq!(
            Request::decode(Opcode::Rotate as u8, &body),
            Err(WireError::BadField {
                field: "flags",
                reason: "reserved bits set"
            })
        );
        body[32] = 0;
        assert_eq!(
            Request::decode(Opcode::Rotate as u8, &body[..40]),
            Err(WireError::Truncated {
                field: "expected_counter",
                needed: 1
            })
        );
        // Without the flag the expected counter must be zero (one encoding per request).
        body[32] = 0;
        body[40] = 9;
        assert_eq!(
            Request::decode(Opcode::Rotate as u8, &body),
            Err(WireError::BadField {
                field: "expected_counter",
                reason: "non-zero without the EXPECTED flag"
            })
        );
        body[40] = 0;
        assert!(matches!(
            Request::decode(Opcode::Rotate as u8, &body),
            Ok(Request::Rotate(RotateBody {
                expected_counter: None,
                ..
            }))
        ));
        let mut reply = Vec::new();
        Reply::Rotated(Rotated {
            asset: Uuid::nil(),
            rotation_id: Uuid::nil(),
            counter: 1,
            previous_counter: 0,
            receipt: Receipt {
                shard: 0,
                seq: 1,
                hash: [0xab; 32],
            },
            replayed: false,
        })
        .encode(Opcode::Rotate as u8, 1, &mut reply);
        let last = reply.len() - 1;
        reply[last] = 2;
        assert!(Reply::decode(Opcode::Rotate, &reply[HEADER_LEN..]).is_err());
    }

    #[test]
    fn list_assets_round_trips_and_checks_its_fields() {
        let request = Request::ListAssets(ListAssets {
            state: Some(AssetState::Suspended),
            after: Uuid::from_bytes([7; 16]),
            limit: 256,
        });
        let mut frame = Vec::new();
        request.encode(9, &mut frame);
        assert_eq!(frame.len(), HEADER_LEN + 19);
        assert_eq!(Request::decode(0x11, &frame[HEADER_LEN..]), Ok(request));
        let mut body = frame[HEADER_LEN..].to_vec();
        body[17..19].copy_from_slice(&257u16.to_be_bytes());
        assert!(matches!(
            Request::decode(0x11, &body),
            Err(WireError::BadField { field: "limit", .. })
        ));
        body[17..19].copy_from_slice(&1u16.to_be_bytes());
        body[0] = 9;
        assert!(matches!(
            Request::decode(0x11, &body),
            Err(WireError::BadField { field: "state", .. })
        ));
        let entry = ListedAsset {
            asset: Uuid::from_bytes([3; 16]),
            state: AssetState::Active,
            counter: 5,
            shard: 1,
            changed_unix_ms: 1_764_000_000_000,
        };
        let page = AssetPage {
            assets: vec![entry; usize::from(bounds::LIST_ASSETS_PAGE_MAX)],
            more: true,
        };
        let mut out = Vec::new();
        Reply::Assets(page.clone()).encode(0x11, 9, &mut out);
        assert_eq!(out.len() - HEADER_LEN, 5 + 256 * LISTED_ASSET_BYTES);
        assert_eq!(
            out.len() - HEADER_LEN,
            8_965,
            "docs/protocol.md gives this bound"
        );
        assert_eq!(
            Reply::decode(Opcode::ListAssets, &out[HEADER_LEN..]),
            Ok(Reply::Assets(page))
        );
    }

    #[test]
    fn opcode_numbers_are_stable() {
        let expected = [
            (Opcode::Hello, 0x01),
            (Opcode::Register, 0x02),
            (Opcode::Derive, 0x03),
            (Opcode::Status, 0x04),
            (Opcode::Seal, 0x05),
            (Opcode::Unseal, 0x06),
            (Opcode::SealStatus, 0x07),
            (Opcode::Rotate, 0x08),
            (Opcode::Suspend, 0x09),
            (Opcode::Resume, 0x0A),
            (Opcode::Retire, 0x0B),
            (Opcode::SetRegion, 0x0C),
            (Opcode::Regions, 0x0D),
            (Opcode::PolicyReload, 0x0E),
            (Opcode::Reconcile, 0x0F),
            (Opcode::ProveReceipt, 0x10),
            (Opcode::ListAssets, 0x11),
        ];
        for (op, number) in expected {
            assert_eq!(op as u8, number);
            assert_eq!(Opcode::from_u8(number), Some(op));
        }
        assert_eq!(Opcode::from_u8(0x12), None);
        for (code, n) in [
            (SealStateCode::Unsealed, 1),
            (SealStateCode::ServingStale, 2),
            (SealStateCode::Sealed, 3),
            (SealStateCode::Unsealing, 4),
            (SealStateCode::SealedByOperator, 5),
            (SealStateCode::SealedByFailure, 6),
        ] {
            assert_eq!(code as u8, n);
            assert_eq!(SealStateCode::from_u8(n), Some(code));
        }
        assert_eq!(SealStateCode::from_u8(0), None);
        assert_eq!(ProviderCode::from_u8(3), Some(ProviderCode::Shamir));
        assert_eq!(ProviderCode::from_u8(4), None);
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            (
                Opcode::Hello,
                Reply::Hello(HelloInfo {
                    version: 1,
                    shard_count: 2,
                    shard_hash: SHARD_HASH_JUMP_FNV1A64,
                    max_frame_body_bytes: 4096,
                    max_inflight_per_connection: 256,
                    shard_ports: vec![7450, 7451],
                }),
            ),
            (
                Opcode::Status,
                Reply::Asset(AssetInfo {
                    asset: Uuid::from_bytes([3; 16]),
                    state: AssetState::Suspended,
                    counter: 9,
                    shard: 1,
                }),
            ),
            (
                Opcode::Derive,
                Reply::Derived(Derived {
                    counter: 3,
                    scheme_version: 1,
                    key: zeroize::Zeroizing::new([0x5a; KEY_LEN]),
                    receipt: Receipt {
                        shard: 1,
                        seq: 77,
                        hash: [7; 32],
                    },
                }),
            ),
            (
                Opcode::Unseal,
                Reply::Seal(SealInfo {
                    state: SealStateCode::Unsealing,
                    provider: ProviderCode::Shamir,
                    shares_received: 2,
                    threshold: 3,
                    shares: 5,
                    since_unix_ms: 1_795_000_000_000,
                    key_unsealed_unix_ms: 0,
                    calls_ok: 1,
                    calls_failed: 2,
                    calls_timed_out: 3,
                    breaker_opened: 4,
                    fingerprint: [0xab; 16],
                    reason: "é".into(),
                }),
            ),
            (
                Opcode::Rotate,
                Reply::Rotated(Rotated {
                    asset: Uuid::from_bytes([1; 16]),
                    rotation_id: Uuid::from_bytes([2; 16]),
                    counter: 8,
                    previous_counter: 7,
                    receipt: Receipt {
                        shard: 1,
                        seq: 99,
                        hash: [9; 32],
                    },
                    replayed: true,
                }),
            ),
            (
                Opcode::Regions,
                Reply::Regions(vec![("US-EAST".into(), true), ("EU-WEST".into(), false)]),
            ),
            (Opcode::SetRegion, Reply::Regions(vec![])),
            (
                Opcode::PolicyReload,
                Reply::PolicyReloaded(PolicyReloaded {
                    generation: 3,
                    identities: 12,
                    regions: 4,
                    asset_groups: 2,
                }),
            ),
            (
                Opcode::Retire,
                Reply::Asset(AssetInfo {
                    asset: Uuid::from_bytes([3; 16]),
                    state: AssetState::Retired,
                    counter: 8,
                    shard: 0,
                }),
            ),
            (
                Opcode::Unseal,
                Reply::Refused(Refusal {
                    status: Status::SeedMismatch,
                    retry_after_ms: 0,
                    message: "fingerprint".into(),
                }),
            ),
            (
                Opcode::Derive,
                Reply::Refused(Refusal {
                    status: Status::Busy,
                    retry_after_ms: 5,
                    message: "shard queue full".into(),
                }),
            ),
        ];
        for (op, reply) in replies {
            let mut out = Vec::new();
            reply.encode(op as u8, 9, &mut out);
            let frame = decode_frame(&out, 4096).unwrap().unwrap();
            assert_eq!(frame.header.opcode, op as u8 | REPLY_BIT);
            assert_eq!(Reply::decode(op, frame.body).unwrap(), reply);
        }
    }

    #[test]
    fn status_numbers_are_stable() {
        // Changing any of these breaks deployed clients: add new numbers instead.
        let expected: [(Status, u16); 36] = [
            (Status::Ok, 0),
            (Status::UnsupportedVersion, 1),
            (Status::MalformedFrame, 2),
            (Status::FrameTooLarge, 3),
            (Status::UnknownOpcode, 4),
            (Status::BadBody, 5),
            (Status::FrameTimeout, 6),
            (Status::InvalidAssetId, 10),
            (Status::InvalidPath, 11),
            (Status::InvalidRegion, 12),
            (Status::InvalidPurpose, 13),
            (Status::InvalidTtl, 14),
            (Status::InvalidRotationId, 15),
            (Status::RegionDisabled, 16),
            (Status::UnknownAsset, 20),
            (Status::AssetExists, 21),
            (Status::AssetSuspended, 22),
            (Status::AssetRetired, 23),
            (Status::CounterMismatch, 24),
            (Status::RotationIdReused, 25),
            (Status::CounterExhausted, 26),
            (Status::InvalidTransition, 27),
            (Status::Busy, 30),
            (Status::StoreUnavailable, 31),
            (Status::Sealed, 32),
            (Status::ShuttingDown, 33),
            (Status::ConnectionLimit, 34),
            (Status::Forbidden, 40),
            (Status::RateLimited, 41),
            (Status::Internal, 50),
            (Status::ShareInvalid, 60),
            (Status::ShareRepeated, 61),
            (Status::SeedMismatch, 62),
            (Status::AlreadyUnsealed, 63),
            (Status::PolicyInvalid, 70),
            (Status::ReloadUnavailable, 71),
        ];
        for (status, number) in expected {
            assert_eq!(status as u16, number);
            assert_eq!(Status::from_u16(number), Some(status));
        }
        assert_eq!(Status::from_u16(7), None);
    }

    /// The hex dump of docs/protocol.md's DERIVE OK reply is what the encoder writes.
    #[test]
    fn the_documented_derive_reply_is_what_the_encoder_writes() {
        let documented = documented_dump("### DERIVE OK reply");
        let mut out = Vec::new();
        Reply::Derived(Derived {
            counter: 0,
            scheme_version: 1,
            key: zeroize::Zeroizing::new([0x5a; 32]),
            receipt: Receipt {
                shard: 3,
                seq: 42,
                hash: [0xc3; 32],
            },
        })
        .encode(Opcode::Derive as u8, 1, &mut out);
        assert_eq!(out, documented);
    }

    /// The bytes of the hex dumps (`text` blocks) of a section of docs/protocol.md, in order.
    fn documented_dump(section: &str) -> Vec<u8> {
        let doc = include_str!("../../docs/protocol.md");
        let at = doc.find(section).expect("section");
        let rest = &doc[at + section.len()..];
        let rest = &rest[..rest.find("\n### ").unwrap_or(rest.len())];
        rest.split("```text\n")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .flat_map(|dump| dump.lines())
            .flat_map(|line| {
                line.get(10..58)
                    .unwrap_or("")
                    .split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn the_documented_hello_is_what_the_encoder_writes() {
        let documented = documented_dump("### HELLO");
        let mut out = Vec::new();
        Request::Hello.encode(7, &mut out);
        Reply::Hello(HelloInfo {
            version: VERSION,
            shard_count: 4,
            shard_hash: SHARD_HASH_JUMP_FNV1A64,
            max_frame_body_bytes: 16384,
            max_inflight_per_connection: 1024,
            shard_ports: vec![7450, 7451, 7452, 7453],
        })
        .encode(Opcode::Hello as u8, 7, &mut out);
        assert_eq!(out, documented);
        // A port list that is neither empty nor one per shard is refused.
        let body = &out[20 + HEADER_LEN..];
        let mut bad = body.to_vec();
        bad[15] = 3;
        assert!(Reply::decode(Opcode::Hello, &bad).is_err());
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        // A deterministic sweep standing in for the fuzzer on every test run.
        let mut valid = Vec::new();
        Request::Derive(derive_body()).encode(5, &mut valid);
        crate::testing::mutation_sweep(&valid, 20_000, 7, 0x9e3779b97f4a7c15, fuzz_decode);
        let mut unseal = Vec::new();
        Request::Unseal {
            reset: true,
            share: ShareText::new("custody-share/1:x:2:1:ab:cd"),
        }
        .encode(6, &mut unseal);
        crate::testing::mutation_sweep(&unseal, 5_000, 5, 0x51ab1e, fuzz_decode);
        let mut rotate = Vec::new();
        Request::Rotate(RotateBody {
            asset: Uuid::from_bytes([0x11; 16]),
            rotation_id: Uuid::from_bytes([0x22; 16]),
            expected_counter: Some(3),
        })
        .encode(8, &mut rotate);
        crate::testing::mutation_sweep(&rotate, 5_000, 5, 0x707a7e, fuzz_decode);
        let mut reply = Vec::new();
        Reply::Seal(SealInfo {
            state: SealStateCode::Sealed,
            provider: ProviderCode::Pkcs11,
            shares_received: 0,
            threshold: 0,
            shares: 0,
            since_unix_ms: 1,
            key_unsealed_unix_ms: 2,
            calls_ok: 3,
            calls_failed: 4,
            calls_timed_out: 5,
            breaker_opened: 6,
            fingerprint: [1; 16],
            reason: "r".into(),
        })
        .encode(Opcode::SealStatus as u8, 7, &mut reply);
        crate::testing::mutation_sweep(&reply, 5_000, 5, 0x5ea1, fuzz_decode);
    }
}

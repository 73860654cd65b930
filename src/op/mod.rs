//! The operations of protocol v3, one file each (or one per small group that shares its
//! bodies), each with its request body, its reply body and their encoding and decoding.
//! [`crate::wire`] keeps the framing and the tables of codes: an opcode's number, name,
//! metrics label and who may send it are its row in [`crate::wire::Opcode`].
//!
//! Each file also handles its operations: its field rules, what it asks the owning shard
//! (or the auditor, or a thread of its own) and how the reply is made. A handler gets the
//! request once the opcode table's gate let it in ([`Asking`]) and says what to do
//! ([`Handled`]); the connection ([`crate::net`]) carries that out, so a handler never
//! touches a socket, a buffer or a task.
//!
//! To add an operation: a row in the opcode table, a file here with its bodies and its
//! handler, a variant of [`Request`] and of [`Reply`] and their arms below, and its
//! section in docs/protocol.md.
//!
//! | file | operations |
//! |---|---|
//! | [`hello`] | HELLO |
//! | [`asset`] | REGISTER, STATUS, SUSPEND, RESUME, RETIRE |
//! | [`derive`] | DERIVE |
//! | [`rotate`] | ROTATE |
//! | [`seal`] | SEAL, UNSEAL, SEAL_STATUS |
//! | [`region`] | SET_REGION, REGIONS |
//! | [`policy_reload`] | POLICY_RELOAD |
//! | [`reconcile`] | RECONCILE, PROVE_RECEIPT |
//! | [`list_assets`] | LIST_ASSETS |

pub mod asset;
pub mod derive;
pub mod hello;
pub mod list_assets;
pub mod policy_reload;
pub mod reconcile;
pub mod region;
pub mod rotate;
pub mod seal;

use crate::context::CoreContext;
use crate::policy::{AccessPolicy, Allowance, Denied};
use crate::shard::{LifecycleOp, ShardOp, ShardReply};
use crate::store::handoff::Pending;
use crate::wire::{
    patch_body_len, put_text, AssetInfo, FrameHeader, Opcode, Reader, Receipt, Refusal, Rotated,
    Status, WireError, REPLY_BIT,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use uuid::Uuid;

pub use derive::{DeriveBody, Derived};
pub use hello::HelloInfo;
pub use list_assets::{AssetPage, ListAssets, ListedAsset};
pub use policy_reload::PolicyReloaded;
pub use reconcile::{ProofInfo, ReconcileSummary};
pub use rotate::RotateBody;
pub use seal::{SealInfo, ShareText};

#[cfg(test)]
mod tests;

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

    /// Decodes the body of a request frame: the whole body, or a typed error.
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Request, WireError> {
        let op = Opcode::from_u8(opcode).ok_or(WireError::UnknownOpcode(opcode))?;
        let mut r = Reader::new(body);
        let request = match op {
            Opcode::Hello => Request::Hello,
            Opcode::Regions => Request::Regions,
            Opcode::PolicyReload => Request::PolicyReload,
            Opcode::Seal => Request::Seal,
            Opcode::SealStatus => Request::SealStatus,
            Opcode::ProveReceipt => Request::ProveReceipt(decode_receipt(&mut r)?),
            Opcode::ListAssets => Request::ListAssets(ListAssets::decode(&mut r)?),
            Opcode::Reconcile => Request::Reconcile {
                full: reconcile::decode_flags(&mut r)?,
            },
            Opcode::SetRegion => {
                let (region, enabled) = region::decode_switch(&mut r)?;
                Request::SetRegion { region, enabled }
            }
            Opcode::Unseal => {
                let (reset, share) = seal::decode_unseal(&mut r)?;
                Request::Unseal { reset, share }
            }
            Opcode::Register => Request::Register {
                asset: asset::decode_id(&mut r)?,
            },
            Opcode::Suspend => Request::Suspend {
                asset: asset::decode_id(&mut r)?,
            },
            Opcode::Resume => Request::Resume {
                asset: asset::decode_id(&mut r)?,
            },
            Opcode::Retire => Request::Retire {
                asset: asset::decode_id(&mut r)?,
            },
            Opcode::Status => Request::Status {
                asset: asset::decode_id(&mut r)?,
            },
            Opcode::Rotate => Request::Rotate(RotateBody::decode(&mut r)?),
            Opcode::Derive => Request::Derive(DeriveBody::decode(&mut r)?),
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
            Request::Reconcile { full } => reconcile::encode_flags(*full, out),
            Request::ListAssets(l) => l.encode(out),
            Request::ProveReceipt(receipt) => encode_receipt(receipt, out),
            Request::SetRegion { region, enabled } => region::encode_switch(region, *enabled, out),
            Request::Unseal { reset, share } => seal::encode_unseal(*reset, share, out),
            Request::Register { asset }
            | Request::Status { asset }
            | Request::Suspend { asset }
            | Request::Resume { asset }
            | Request::Retire { asset } => asset::encode_id(asset, out),
            Request::Rotate(b) => b.encode(out),
            Request::Derive(d) => d.encode(out),
        }
        patch_body_len(out, start);
    }
}

/// A request the opcode table's gate let in: who asks, and what every handler may read.
pub struct Asking<'a> {
    pub ctx: &'a CoreContext,
    pub identity: &'a Arc<str>,
    pub request_id: u64,
    /// The policy in force, the same for the whole request.
    pub access: &'a AccessPolicy,
    /// The rate the gate found for the identity's role; DERIVE replaces it with the rate
    /// of the role that may derive this asset for this purpose.
    pub allowance: Option<Allowance>,
}

/// What a handler decided; the connection carries it out.
pub enum Handled {
    /// Answered at once, from this core's state.
    Now(Result<Reply, Refusal>),
    /// Refused by the policy (counted by reason and logged by the connection).
    Denied(Denied),
    /// Asks the asset's owning shard (once the connection has room in flight); [`Then`]
    /// makes the reply from its answer.
    Shard(ShardOp, Then),
    /// Runs off this core (the auditor, a thread of its own); answered when it resolves.
    Later(Later),
}

/// An answer that work off this core gives later.
pub type Later = Pin<Box<dyn Future<Output = Result<Reply, Refusal>>>>;

/// How a shard's answer becomes the reply, by operation.
pub enum Then {
    /// REGISTER, STATUS, SUSPEND, RESUME, RETIRE: the asset as the shard has it.
    Asset,
    /// ROTATE: the new counter and the record's receipt.
    Rotated,
    /// SET_REGION: every region's state, the switch just set included.
    Regions,
    /// DERIVE: the key, derived on this core once its record is durable.
    Derived(derive::Keep),
}

impl Then {
    pub fn reply(self, ctx: &CoreContext, answer: ShardReply) -> Result<Reply, Refusal> {
        match self {
            Then::Asset => asset::reply(answer),
            Then::Rotated => rotate::reply(answer),
            Then::Regions => region::reply(ctx, answer),
            Then::Derived(keep) => derive::reply(ctx, keep, answer),
        }
    }
}

impl Request {
    /// Hands the request to its operation's handler.
    pub fn handle(self, a: &mut Asking<'_>) -> Handled {
        match self {
            Request::Hello => hello::handle(a),
            Request::Regions => region::list(a),
            Request::SetRegion { region, enabled } => region::switch(a, &region, enabled),
            Request::PolicyReload => policy_reload::handle(a),
            Request::Reconcile { full } => reconcile::handle(a, full),
            Request::ProveReceipt(receipt) => reconcile::prove(a, receipt),
            Request::ListAssets(page) => list_assets::handle(a, page),
            Request::SealStatus => seal::status(a),
            Request::Seal => seal::seal(a),
            Request::Unseal { reset, share } => seal::unseal(a, reset, share),
            Request::Status { asset } => asset::status(asset),
            Request::Register { asset } => asset::register(a, asset),
            Request::Suspend { asset } => asset::lifecycle(a, asset, LifecycleOp::Suspend),
            Request::Resume { asset } => asset::lifecycle(a, asset, LifecycleOp::Resume),
            Request::Retire { asset } => asset::lifecycle(a, asset, LifecycleOp::Retire),
            Request::Rotate(body) => rotate::handle(a, body),
            Request::Derive(body) => derive::handle(a, body),
        }
    }
}

/// The answer of work handed off this core once `pending` resolves: `ok` makes the reply,
/// `failed` the refusal of a failure; a worker gone without an answer is INTERNAL
/// (`abandoned`).
fn later<T: 'static>(
    pending: Pending<Result<T, String>>,
    ok: impl FnOnce(T) -> Reply + 'static,
    failed: impl FnOnce(String) -> Refusal + 'static,
    abandoned: &'static str,
) -> Handled {
    Handled::Later(Box::pin(async move {
        match pending.await {
            Ok(Ok(value)) => Ok(ok(value)),
            Ok(Err(why)) => Err(failed(why)),
            Err(_) => Err(Refusal::new(Status::Internal, abandoned)),
        }
    }))
}

/// BUSY, with when to ask again.
fn busy(message: &str, retry_after_ms: u32) -> Handled {
    let mut refusal = Refusal::new(Status::Busy, message);
    refusal.retry_after_ms = retry_after_ms;
    Handled::Now(Err(refusal))
}

/// A shard's answer of another kind than the request's: a broken invariant of the shard,
/// answered INTERNAL rather than misread.
fn mismatched(answer: &ShardReply) -> Refusal {
    debug_assert!(
        false,
        "a shard answered {answer:?} to another kind of request"
    );
    Refusal::new(
        Status::Internal,
        "the shard answered another kind of request",
    )
}

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
    /// Encodes a whole reply frame to a request with `opcode` onto `out`.
    pub fn encode(&self, opcode: u8, request_id: u64, out: &mut Vec<u8>) {
        let start = out.len();
        FrameHeader {
            opcode: opcode | REPLY_BIT,
            request_id,
            body_len: 0,
        }
        .encode(out);
        let status = match self {
            Reply::Refused(r) => r.status,
            _ => Status::Ok,
        };
        out.extend_from_slice(&(status as u16).to_be_bytes());
        match self {
            Reply::Hello(h) => h.encode(out),
            Reply::Assets(page) => page.encode(out),
            Reply::Asset(a) => asset::encode_info(a, out),
            Reply::Derived(d) => d.encode(out),
            Reply::Regions(list) => region::encode_list(list, out),
            Reply::PolicyReloaded(p) => p.encode(out),
            Reply::Proof(p) => p.encode(out),
            Reply::Reconciled(r) => r.encode(out),
            Reply::Rotated(r) => rotate::encode_rotated(r, out),
            Reply::Seal(s) => s.encode(out),
            Reply::Refused(r) => {
                out.extend_from_slice(&r.retry_after_ms.to_be_bytes());
                put_text(out, &r.message);
                if r.status == Status::NotActive {
                    put_active(out, r.active.as_deref().unwrap_or(""));
                }
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
            let message = r.message("message")?.to_owned();
            let active = if status == Status::NotActive {
                Some(
                    r.text("active", crate::bounds::ACTIVE_ADDRESS_BYTES_MAX)?
                        .to_owned(),
                )
                .filter(|a| !a.is_empty())
            } else {
                None
            };
            Reply::Refused(Refusal {
                status,
                retry_after_ms,
                message,
                active,
            })
        } else {
            match request_opcode {
                Opcode::Hello => Reply::Hello(HelloInfo::decode(&mut r)?),
                Opcode::SetRegion | Opcode::Regions => Reply::Regions(region::decode_list(&mut r)?),
                Opcode::ListAssets => Reply::Assets(AssetPage::decode(&mut r)?),
                Opcode::ProveReceipt => Reply::Proof(ProofInfo::decode(&mut r)?),
                Opcode::Reconcile => Reply::Reconciled(ReconcileSummary::decode(&mut r)?),
                Opcode::PolicyReload => Reply::PolicyReloaded(PolicyReloaded::decode(&mut r)?),
                Opcode::Rotate => Reply::Rotated(rotate::decode_rotated(&mut r)?),
                Opcode::Register
                | Opcode::Status
                | Opcode::Suspend
                | Opcode::Resume
                | Opcode::Retire => Reply::Asset(asset::decode_info(&mut r)?),
                Opcode::Seal | Opcode::Unseal | Opcode::SealStatus => {
                    Reply::Seal(SealInfo::decode(&mut r)?)
                }
                Opcode::Derive => Reply::Derived(Derived::decode(&mut r)?),
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

/// NOT_ACTIVE's active address: `u16` length and the text, or nothing (length 0) when it
/// is unknown or longer than [`crate::bounds::ACTIVE_ADDRESS_BYTES_MAX`] (an address cut
/// short would send clients elsewhere).
fn put_active(out: &mut Vec<u8>, active: &str) {
    let active = if active.len() <= crate::bounds::ACTIVE_ADDRESS_BYTES_MAX {
        active
    } else {
        ""
    };
    out.extend_from_slice(&(active.len() as u16).to_be_bytes());
    out.extend_from_slice(active.as_bytes());
}

/// Where a record sits, as DERIVE's and ROTATE's replies and PROVE_RECEIPT's request carry
/// it: shard (2) | seq (8) | hash (32).
fn encode_receipt(receipt: &Receipt, out: &mut Vec<u8>) {
    out.extend_from_slice(&receipt.shard.to_be_bytes());
    out.extend_from_slice(&receipt.seq.to_be_bytes());
    out.extend_from_slice(&receipt.hash);
}

fn decode_receipt(r: &mut Reader<'_>) -> Result<Receipt, WireError> {
    Ok(Receipt {
        shard: r.u16("shard")?,
        seq: r.u64("seq")?,
        hash: r.array("hash")?,
    })
}

/// Fuzz entry point: any bytes through the frame, request and reply decoders must give a
/// frame, "need more", or a typed error, never a panic; whatever decodes encodes back to
/// the same bytes. `fuzz/` and the unit tests call this.
pub fn fuzz_decode(data: &[u8]) {
    let mut buf = data;
    // Bounded: every iteration consumes at least HEADER_LEN bytes.
    while let Ok(Some(frame)) = crate::wire::decode_frame(buf, crate::bounds::FRAME_BODY_BYTES_CAP)
    {
        if let Ok(request) = Request::decode(frame.header.opcode, frame.body) {
            let mut again = Vec::new();
            request.encode(frame.header.request_id, &mut again);
            assert_eq!(
                &again[crate::wire::HEADER_LEN..],
                frame.body,
                "request codec round trip"
            );
        }
        for &op in Opcode::ALL {
            if let Ok(reply) = Reply::decode(op, frame.body) {
                let mut again = Vec::new();
                reply.encode(op as u8, frame.header.request_id, &mut again);
                assert_eq!(
                    &again[crate::wire::HEADER_LEN..],
                    frame.body,
                    "reply codec round trip"
                );
            }
        }
        buf = &buf[frame.consumed..];
    }
}

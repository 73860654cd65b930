//! ROTATE: move an asset's counter forward by one, idempotent by the caller's rotation id,
//! optionally only if the counter is the one the caller expects (compare-and-set).
//!
//! ```text
//! request: asset_id (16) | rotation_id (16) | flags (1: EXPECTED) | expected_counter (8)
//! reply:   status (2) | asset_id (16) | rotation_id (16) | counter (8)
//!          | previous_counter (8) | shard (2) | seq (8) | hash (32) | replayed (1)
//! ```

use super::{decode_receipt, encode_receipt};
use super::{mismatched, Asking, Handled, Reply, Then};
use crate::policy::check_asset_id;
use crate::shard::{ShardOp, ShardReply};
use crate::wire::{Reader, Rotated, WireError};
use crate::wire::{Refusal, Status};
use uuid::Uuid;

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

impl RotateBody {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<RotateBody, WireError> {
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
        Ok(RotateBody {
            asset,
            rotation_id,
            expected_counter: (flags & ROTATE_FLAG_EXPECTED != 0).then_some(expected),
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.asset.as_bytes());
        out.extend_from_slice(self.rotation_id.as_bytes());
        out.push(if self.expected_counter.is_some() {
            ROTATE_FLAG_EXPECTED
        } else {
            0
        });
        out.extend_from_slice(&self.expected_counter.unwrap_or(0).to_be_bytes());
    }
}

pub(super) fn encode_rotated(r: &Rotated, out: &mut Vec<u8>) {
    out.extend_from_slice(r.asset.as_bytes());
    out.extend_from_slice(r.rotation_id.as_bytes());
    out.extend_from_slice(&r.counter.to_be_bytes());
    out.extend_from_slice(&r.previous_counter.to_be_bytes());
    encode_receipt(&r.receipt, out);
    out.push(u8::from(r.replayed));
}

pub(super) fn decode_rotated(r: &mut Reader<'_>) -> Result<Rotated, WireError> {
    let asset = r.uuid("asset_id")?;
    let rotation_id = r.uuid("rotation_id")?;
    let counter = r.u64("counter")?;
    let previous_counter = r.u64("previous_counter")?;
    let receipt = decode_receipt(r)?;
    let replayed = r.flag("replayed")?;
    Ok(Rotated {
        asset,
        rotation_id,
        counter,
        previous_counter,
        receipt,
        replayed,
    })
}

/// ROTATE: both ids checked, then the shard moves the counter (audited, idempotent by
/// rotation id).
pub(super) fn handle(a: &Asking<'_>, body: RotateBody) -> Handled {
    if let Err(refusal) =
        check_asset_id(&body.asset).and_then(|()| check_rotation_id(&body.rotation_id))
    {
        return Handled::Now(Err(refusal));
    }
    let op = ShardOp::Rotate {
        asset: body.asset,
        rotation_id: body.rotation_id,
        expected_counter: body.expected_counter,
        requester: a.identity.clone(),
        request_id: a.request_id,
    };
    Handled::Shard(op, Then::Rotated)
}

/// A rotation id must be an RFC 4122 UUID, as an asset id must.
fn check_rotation_id(id: &Uuid) -> Result<(), Refusal> {
    check_asset_id(id).map_err(|_| {
        Refusal::new(
            Status::InvalidRotationId,
            format!("rotation_id {id} is not an RFC 4122 UUID (variant 10, version 1-8)"),
        )
    })
}

pub(super) fn reply(answer: ShardReply) -> Result<Reply, Refusal> {
    match answer {
        ShardReply::Rotated(r) => Ok(Reply::Rotated(r)),
        other => Err(mismatched(&other)),
    }
}

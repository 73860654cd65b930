//! REGISTER, STATUS, SUSPEND, RESUME and RETIRE: a request that names one asset, and a
//! reply with the asset's state, counter and shard ([`AssetInfo`]).
//!
//! ```text
//! request: asset_id (16)
//! reply:   status (2) | asset_id (16) | state (1) | counter (8) | shard (2)
//! ```

use super::{mismatched, Asking, Handled, Reply, Then};
use crate::lifecycle::AssetState;
use crate::policy::check_asset_id;
use crate::shard::{LifecycleOp, ShardOp, ShardReply};
use crate::wire::Refusal;
use crate::wire::{AssetInfo, Reader, WireError};
use uuid::Uuid;

pub(super) fn decode_id(r: &mut Reader<'_>) -> Result<Uuid, WireError> {
    r.uuid("asset_id")
}

pub(super) fn encode_id(asset: &Uuid, out: &mut Vec<u8>) {
    out.extend_from_slice(asset.as_bytes());
}

/// An asset state code, or the typed error that names `field`.
pub(super) fn decode_state(
    r: &mut Reader<'_>,
    field: &'static str,
) -> Result<AssetState, WireError> {
    AssetState::from_u8(r.u8(field)?).ok_or(WireError::BadField {
        field,
        reason: "unknown asset state",
    })
}

pub(super) fn encode_info(a: &AssetInfo, out: &mut Vec<u8>) {
    out.extend_from_slice(a.asset.as_bytes());
    out.push(a.state as u8);
    out.extend_from_slice(&a.counter.to_be_bytes());
    out.extend_from_slice(&a.shard.to_be_bytes());
}

pub(super) fn decode_info(r: &mut Reader<'_>) -> Result<AssetInfo, WireError> {
    let asset = r.uuid("asset_id")?;
    let state = decode_state(r, "state")?;
    Ok(AssetInfo {
        asset,
        state,
        counter: r.u64("counter")?,
        shard: r.u16("shard")?,
    })
}

/// STATUS: the asset as its shard has it (nothing audited).
pub(super) fn status(asset: Uuid) -> Handled {
    match check_asset_id(&asset) {
        Ok(()) => Handled::Shard(ShardOp::Status { asset }, Then::Asset),
        Err(refusal) => Handled::Now(Err(refusal)),
    }
}

/// REGISTER: a new asset, active at counter 0 (audited).
pub(super) fn register(a: &Asking<'_>, asset: Uuid) -> Handled {
    if let Err(refusal) = check_asset_id(&asset) {
        return Handled::Now(Err(refusal));
    }
    let op = ShardOp::Register {
        asset,
        requester: a.identity.clone(),
        request_id: a.request_id,
    };
    Handled::Shard(op, Then::Asset)
}

/// SUSPEND, RESUME, RETIRE: a lifecycle transition, applied and audited by the shard.
pub(super) fn lifecycle(a: &Asking<'_>, asset: Uuid, op: LifecycleOp) -> Handled {
    if let Err(refusal) = check_asset_id(&asset) {
        return Handled::Now(Err(refusal));
    }
    let op = ShardOp::Lifecycle {
        asset,
        op,
        requester: a.identity.clone(),
        request_id: a.request_id,
    };
    Handled::Shard(op, Then::Asset)
}

/// The reply of every asset operation: the asset's state, counter and shard.
pub(super) fn reply(answer: ShardReply) -> Result<Reply, Refusal> {
    match answer {
        ShardReply::Asset(info) => Ok(Reply::Asset(info)),
        other => Err(mismatched(&other)),
    }
}

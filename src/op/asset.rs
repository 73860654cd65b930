//! REGISTER, STATUS, SUSPEND, RESUME and RETIRE: a request that names one asset, and a
//! reply with the asset's state, counter and shard ([`AssetInfo`]).
//!
//! ```text
//! request: asset_id (16)
//! reply:   status (2) | asset_id (16) | state (1) | counter (8) | shard (2)
//! ```

use crate::lifecycle::AssetState;
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

//! SET_REGION and REGIONS: switch a configured compliance region on or off (admin; durable
//! and audited, in force on every core before the reply), and list the regions with their
//! state (any role). Both answer with the list.
//!
//! ```text
//! SET_REGION request: enabled (1: 0 or 1) | region (u8 len + ASCII, ≤ 32)
//! reply: status (2) | count (1) | { region (u8 len + ASCII) | enabled (1) } each
//! ```

use super::{mismatched, Asking, Handled, Reply};
use crate::bounds;
use crate::context::CoreContext;
use crate::shard::{ShardOp, ShardReply};
use crate::wire::{put_short, Reader, WireError};
use crate::wire::{Refusal, Status};

// The count of regions travels in one byte.
const _: () = assert!(bounds::REGIONS_MAX <= u8::MAX as usize);

pub(super) fn decode_switch(r: &mut Reader<'_>) -> Result<(String, bool), WireError> {
    let enabled = r.flag("enabled")?;
    let region = r
        .short_ascii("region", bounds::REGION_TEXT_BYTES_MAX)?
        .to_owned();
    Ok((region, enabled))
}

pub(super) fn encode_switch(region: &str, enabled: bool, out: &mut Vec<u8>) {
    out.push(u8::from(enabled));
    put_short(out, region.as_bytes());
}

pub(super) fn encode_list(list: &[(String, bool)], out: &mut Vec<u8>) {
    // At most 255 regions are configured (config checks it).
    let n = list.len().min(bounds::REGIONS_MAX);
    out.push(n as u8);
    for (name, enabled) in &list[..n] {
        put_short(out, name.as_bytes());
        out.push(u8::from(*enabled));
    }
}

pub(super) fn decode_list(r: &mut Reader<'_>) -> Result<Vec<(String, bool)>, WireError> {
    let n = r.u8("count")?;
    let mut list = Vec::with_capacity(n.into());
    for _ in 0..n {
        let name = r
            .short_ascii("region", bounds::REGION_TEXT_BYTES_MAX)?
            .to_owned();
        let enabled = r.flag("enabled")?;
        list.push((name, enabled));
    }
    Ok(list)
}

/// REGIONS: the configured regions and their state, from this core's copy of the switch.
pub(super) fn list(a: &Asking<'_>) -> Handled {
    let list = a.access.regions().states(a.ctx.rules.switch());
    Handled::Now(Ok(Reply::Regions(list)))
}

/// SET_REGION: a configured region, switched by shard 0 (durable and audited there, then
/// in force on every core).
pub(super) fn switch(a: &Asking<'_>, region: &str, enabled: bool) -> Handled {
    let Some((_, slot)) = a.access.regions().find(region) else {
        return Handled::Now(Err(Refusal::new(
            Status::InvalidRegion,
            format!("region {region:?} is not configured (policy.regions)"),
        )));
    };
    let (identity, request_id) = (a.identity, a.request_id);
    tracing::warn!(%identity, request_id, %region, enabled, "region switch requested");
    let op = ShardOp::SetRegion {
        index: slot,
        enabled,
        requester: identity.clone(),
        request_id,
    };
    Handled::Shard(op, super::Then::Regions)
}

/// SET_REGION's reply: every region as it stands once the switch is in force.
pub(super) fn reply(ctx: &CoreContext, answer: ShardReply) -> Result<Reply, Refusal> {
    match answer {
        ShardReply::RegionSet { .. } => Ok(Reply::Regions(
            ctx.access.get().regions().states(ctx.rules.switch()),
        )),
        other => Err(mismatched(&other)),
    }
}

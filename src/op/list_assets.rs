//! LIST_ASSETS (auditor, operator or admin): a page of the registered assets from the
//! store, by asset id, optionally in one state.
//!
//! ```text
//! request: state (1: 0 = any, else an asset state code) | after (16, exclusive; nil:
//!          from the first) | limit (2: 1 to 256)
//! reply:   status (2) | count (2, ≤ 256) | { asset_id (16) | state (1) | counter (8)
//!          | shard (2) | changed_unix_ms (8) } each | more (1)
//! ```

use super::asset::decode_state;
use super::{later, Asking, Handled, Reply};
use crate::bounds;
use crate::lifecycle::AssetState;
use crate::wire::{Reader, WireError};
use crate::wire::{Refusal, Status};
use uuid::Uuid;

/// A LIST_ASSETS request: the assets after `after` (by asset id, in RFC 4122 byte order),
/// in `state` if given, at most `limit` (1 to [`bounds::LIST_ASSETS_PAGE_MAX`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListAssets {
    pub state: Option<AssetState>,
    /// Exclusive; the nil UUID starts from the first asset.
    pub after: Uuid,
    pub limit: u16,
}

impl ListAssets {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<ListAssets, WireError> {
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
        Ok(ListAssets {
            state,
            after,
            limit,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.state.map_or(0, |s| s as u8));
        out.extend_from_slice(self.after.as_bytes());
        out.extend_from_slice(&self.limit.to_be_bytes());
    }
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

impl AssetPage {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let n = self
            .assets
            .len()
            .min(usize::from(bounds::LIST_ASSETS_PAGE_MAX));
        out.extend_from_slice(&(n as u16).to_be_bytes());
        for a in &self.assets[..n] {
            out.extend_from_slice(a.asset.as_bytes());
            out.push(a.state as u8);
            out.extend_from_slice(&a.counter.to_be_bytes());
            out.extend_from_slice(&a.shard.to_be_bytes());
            out.extend_from_slice(&a.changed_unix_ms.to_be_bytes());
        }
        out.push(u8::from(self.more));
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<AssetPage, WireError> {
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
            let state = decode_state(r, "state")?;
            assets.push(ListedAsset {
                asset,
                state,
                counter: r.u64("counter")?,
                shard: r.u16("shard")?,
                changed_unix_ms: r.u64("changed_unix_ms")?,
            });
        }
        let more = r.flag("more")?;
        Ok(AssetPage { assets, more })
    }
}

/// LIST_ASSETS: the auditor thread reads a page of the key table (the durable state), one
/// row past the page to say whether more follow.
pub(super) fn handle(a: &Asking<'_>, page: ListAssets) -> Handled {
    let pending = a.ctx.auditor.as_ref().and_then(|au| {
        au.list_assets(crate::auditor::AssetQuery {
            state: page.state,
            after: page.after,
            limit: page.limit,
        })
    });
    let Some(pending) = pending else {
        return super::busy("the auditor's queue is full; ask again shortly", 1000);
    };
    let shards = a.ctx.shard_count;
    let limit = usize::from(page.limit);
    later(
        pending,
        move |mut rows| {
            let more = rows.len() > limit;
            rows.truncate(limit);
            Reply::Assets(AssetPage {
                assets: rows
                    .into_iter()
                    .map(|r| ListedAsset {
                        asset: r.asset.asset,
                        state: r.asset.state,
                        counter: r.asset.counter,
                        shard: crate::placement::shard_of(&r.asset.asset, shards),
                        changed_unix_ms: r.changed_unix_ms,
                    })
                    .collect(),
                more,
            })
        },
        |why| {
            Refusal::new(
                Status::StoreUnavailable,
                format!("the assets could not be read: {why}"),
            )
        },
        "the auditor thread stopped",
    )
}

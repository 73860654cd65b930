//! DERIVE: the key of an asset at a derivation path, for a purpose, in a region, with a
//! time to live; answered only once the derivation's audit record is durable, with the
//! counter in force and where the record sits.
//!
//! ```text
//! request: asset_id (16) | path (u8 len + ASCII, ≤ 64) | region (u8 len + ASCII, ≤ 32)
//!          | purpose (1) | ttl_s (4)
//! reply:   status (2) | counter (8) | scheme_version (1) | key (32)
//!          | shard (2) | seq (8) | hash (32)
//! ```
//!
//! Its field rules ([`DeriveBody::check`]: asset id, path grammar, region configured and
//! enabled, purpose, ttl range) run before the shard sees the request; who may derive what
//! (purposes, regions, asset groups) is the policy's ([`crate::policy`]).

use super::{decode_receipt, encode_receipt};
use super::{mismatched, Asking, Handled, Reply, Then};
use crate::bounds;
use crate::context::CoreContext;
use crate::kdf::SCHEME_V1;
use crate::kdf::{DerivationPath, PathError};
use crate::policy::Need;
use crate::policy::{check_asset_id, CheckedDerive, Purpose, RegionTable};
use crate::regions::RegionSwitch;
use crate::shard::{ShardOp, ShardReply};
use crate::wire::{put_short, Reader, Receipt, Refusal, Status, WireError, KEY_LEN};
use uuid::Uuid;

/// Shortest key holding time a caller may ask for.
pub const TTL_MIN_S: u32 = 60;
/// Longest key holding time a caller may ask for.
pub const TTL_MAX_S: u32 = 3600;

/// Body of a DERIVE request, as decoded; field rules are the policy gate's job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeriveBody {
    pub asset: Uuid,
    pub path: String,
    pub region: String,
    pub purpose: u8,
    pub ttl_s: u32,
}

impl DeriveBody {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<DeriveBody, WireError> {
        Ok(DeriveBody {
            asset: r.uuid("asset_id")?,
            path: r
                .short_ascii("path", bounds::PATH_TEXT_BYTES_MAX)?
                .to_owned(),
            region: r
                .short_ascii("region", bounds::REGION_TEXT_BYTES_MAX)?
                .to_owned(),
            purpose: r.u8("purpose")?,
            ttl_s: r.u32("ttl_s")?,
        })
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.asset.as_bytes());
        put_short(out, self.path.as_bytes());
        put_short(out, self.region.as_bytes());
        out.push(self.purpose);
        out.extend_from_slice(&self.ttl_s.to_be_bytes());
    }

    /// DERIVE's field rules: checks the body field by field, in wire order, each failure
    /// naming the field and why. `regions` are the configured regions of the policy in
    /// force, `switch` the appliance's region switch (a disabled region is refused).
    pub fn check(
        &self,
        switch: &RegionSwitch,
        regions: &RegionTable,
    ) -> Result<CheckedDerive, Refusal> {
        let body = self;
        check_asset_id(&body.asset)?;
        let path = DerivationPath::parse(&body.path).map_err(|e: PathError| {
            Refusal::new(Status::InvalidPath, format!("path {:?}: {e}", body.path))
        })?;
        let Some((region, slot)) = regions.find(&body.region) else {
            return Err(Refusal::new(
                Status::InvalidRegion,
                format!(
                    "region {:?} is not configured (configured: {})",
                    body.region,
                    regions.names().join(", ")
                ),
            ));
        };
        if !switch.is_enabled(slot) {
            return Err(Refusal::new(
                Status::RegionDisabled,
                format!("region {} is disabled by an admin", body.region),
            ));
        }
        let region = region.clone();
        let purpose = Purpose::from_u8(body.purpose).ok_or_else(|| {
            Refusal::new(
                Status::InvalidPurpose,
                format!(
                    "purpose code {} is not one of 1 TRADING, 2 SETTLEMENT, 3 AUDIT, 4 BACKUP",
                    body.purpose
                ),
            )
        })?;
        if !(TTL_MIN_S..=TTL_MAX_S).contains(&body.ttl_s) {
            return Err(Refusal::new(
                Status::InvalidTtl,
                format!(
                    "ttl {} s is outside {TTL_MIN_S}..={TTL_MAX_S} s",
                    body.ttl_s
                ),
            ));
        }
        Ok(CheckedDerive {
            asset: body.asset,
            path,
            region,
            purpose,
            ttl_s: body.ttl_s,
        })
    }
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

impl Derived {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.push(self.scheme_version);
        out.extend_from_slice(&self.key[..]);
        encode_receipt(&self.receipt, out);
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Derived, WireError> {
        let counter = r.u64("counter")?;
        let scheme_version = r.u8("scheme_version")?;
        let mut key = zeroize::Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(r.take("key", KEY_LEN)?);
        Ok(Derived {
            counter,
            scheme_version,
            key,
            receipt: decode_receipt(r)?,
        })
    }
}

/// What DERIVE keeps while its record commits: the key is derived on this core from the
/// durable counter the shard answers with.
pub struct Keep {
    asset: Uuid,
    path: DerivationPath,
}

/// DERIVE: the field rules, then who may derive this asset for this purpose in this
/// region (its rate replaces the gate's), then the seal; the shard writes the record.
pub(super) fn handle(a: &mut Asking<'_>, body: DeriveBody) -> Handled {
    let request = match body.check(a.ctx.rules.switch(), a.access.regions()) {
        Ok(request) => request,
        Err(refusal) => return Handled::Now(Err(refusal)),
    };
    let need = Need::Derive {
        asset: &request.asset,
        purpose: request.purpose,
        region: &request.region,
    };
    match a.access.authorize(a.identity, need) {
        Ok(allowance) => a.allowance = allowance,
        Err(denied) => return Handled::Denied(denied),
    }
    // Sealed: refused before anything is audited.
    if !a.ctx.key.serving() {
        return Handled::Now(Err(super::seal::sealed_refusal(a.ctx.key.cache())));
    }
    let keep = Keep {
        asset: request.asset,
        path: request.path,
    };
    let op = ShardOp::Derive {
        request,
        requester: a.identity.clone(),
        request_id: a.request_id,
    };
    Handled::Shard(op, Then::Derived(keep))
}

/// The key at the durable counter. Sealed while the record committed: the record stays
/// (it over-reports, the safe direction) and no key leaves.
pub(super) fn reply(ctx: &CoreContext, keep: Keep, answer: ShardReply) -> Result<Reply, Refusal> {
    let ShardReply::Derived { counter, receipt } = answer else {
        return Err(mismatched(&answer));
    };
    match ctx.key.derive(&keep.asset, counter, &keep.path) {
        Some(key) => Ok(Reply::Derived(Derived {
            counter,
            scheme_version: SCHEME_V1,
            key,
            receipt,
        })),
        None => Err(super::seal::sealed_refusal(ctx.key.cache())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    fn switch() -> Arc<RegionSwitch> {
        Arc::new(RegionSwitch::new(&three()))
    }

    fn three() -> Vec<String> {
        vec!["US-EAST".into(), "EU-WEST".into(), "APAC".into()]
    }

    fn table() -> RegionTable {
        RegionTable::in_order(&three())
    }

    /// A DERIVE body that passes every field rule (the policy's tests use it too).
    pub(crate) fn body() -> DeriveBody {
        DeriveBody {
            asset: Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap(),
            path: "m/44'/0'/0'/0'/1".into(),
            region: "EU-WEST".into(),
            purpose: 2,
            ttl_s: 60,
        }
    }

    #[test]
    fn a_good_request_passes() {
        let checked = body().check(&switch(), &table()).unwrap();
        assert_eq!(&*checked.region, "EU-WEST");
        assert_eq!(checked.purpose, Purpose::Settlement);
    }

    /// A change that spoils one field of a good request.
    type Spoil = Box<dyn Fn(&mut DeriveBody)>;

    #[test]
    fn each_bad_field_has_its_status() {
        let cases: Vec<(Spoil, Status)> = vec![
            (Box::new(|b| b.asset = Uuid::nil()), Status::InvalidAssetId),
            (Box::new(|b| b.asset = Uuid::max()), Status::InvalidAssetId),
            (
                Box::new(|b| b.asset = Uuid::from_bytes([0x11; 16])),
                Status::InvalidAssetId,
            ),
            (
                Box::new(|b| b.path = "m/44'/0'/0'/0'/1'".into()),
                Status::InvalidPath,
            ),
            (
                Box::new(|b| b.region = "eu-west".into()),
                Status::InvalidRegion,
            ),
            (
                Box::new(|b| b.region = "MARS".into()),
                Status::InvalidRegion,
            ),
            (Box::new(|b| b.purpose = 0), Status::InvalidPurpose),
            (Box::new(|b| b.purpose = 5), Status::InvalidPurpose),
            (Box::new(|b| b.ttl_s = 59), Status::InvalidTtl),
            (Box::new(|b| b.ttl_s = 3601), Status::InvalidTtl),
            (Box::new(|b| b.ttl_s = 0), Status::InvalidTtl),
        ];
        for (mutate, status) in cases {
            let mut b = body();
            mutate(&mut b);
            let refusal = b.check(&switch(), &table()).unwrap_err();
            assert_eq!(refusal.status, status, "{b:?}: {}", refusal.message);
        }
        let mut b = body();
        b.ttl_s = 3600;
        assert!(b.check(&switch(), &table()).is_ok());
    }
}

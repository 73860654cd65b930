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
//! The fields' rules (path grammar, purposes, ttl range, region known and enabled) are the
//! policy gate's ([`crate::policy`]), checked before the shard sees the request.

use super::{decode_receipt, encode_receipt};
use crate::bounds;
use crate::wire::{put_short, Reader, Receipt, WireError, KEY_LEN};
use uuid::Uuid;

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

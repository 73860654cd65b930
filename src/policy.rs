//! The policy gate's field rules (pure code): every request is checked here before it
//! reaches a shard, and each failure names the field and why.
//!
//! This is the brief's request table for the fields a request carries. Identity roles,
//! rate limits and the region switch build on it in the lifecycle-and-policy issue.

use crate::kdf::{DerivationPath, PathError};
use crate::wire::{DeriveBody, Refusal, Status};
use std::sync::Arc;
use uuid::{Uuid, Variant};

/// Shortest key holding time a caller may ask for.
pub const TTL_MIN_S: u32 = 60;
/// Longest key holding time a caller may ask for.
pub const TTL_MAX_S: u32 = 3600;

/// Why the caller wants the key. The codes are on the wire: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum Purpose {
    Trading = 1,
    Settlement = 2,
    Audit = 3,
    Backup = 4,
}

impl Purpose {
    pub const ALL: [Purpose; 4] = [
        Purpose::Trading,
        Purpose::Settlement,
        Purpose::Audit,
        Purpose::Backup,
    ];

    pub fn from_u8(code: u8) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| *p as u8 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Trading => "TRADING",
            Purpose::Settlement => "SETTLEMENT",
            Purpose::Audit => "AUDIT",
            Purpose::Backup => "BACKUP",
        }
    }

    pub fn from_name(name: &str) -> Option<Purpose> {
        Purpose::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }
}

/// A derive request that passed the field rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedDerive {
    pub asset: Uuid,
    pub path: DerivationPath,
    /// The configured region's name.
    pub region: Arc<str>,
    pub purpose: Purpose,
    pub ttl_s: u32,
}

/// The configured regions, in configuration order.
#[derive(Clone, Debug)]
pub struct FieldRules {
    regions: Vec<Arc<str>>,
}

impl FieldRules {
    pub fn new(regions: Vec<String>) -> FieldRules {
        FieldRules {
            regions: regions.into_iter().map(Arc::from).collect(),
        }
    }

    /// Checks a DERIVE body field by field, in wire order.
    pub fn check_derive(&self, body: &DeriveBody) -> Result<CheckedDerive, Refusal> {
        check_asset_id(&body.asset)?;
        let path = DerivationPath::parse(&body.path).map_err(|e: PathError| {
            Refusal::new(Status::InvalidPath, format!("path {:?}: {e}", body.path))
        })?;
        let region = self
            .regions
            .iter()
            .find(|r| ***r == *body.region)
            .cloned()
            .ok_or_else(|| {
                Refusal::new(
                    Status::InvalidRegion,
                    format!(
                        "region {:?} is not configured (configured: {})",
                        body.region,
                        self.regions.join(", ")
                    ),
                )
            })?;
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

/// An asset id must be an RFC 4122 UUID (variant bits 10, version 1–8), not nil or max.
pub fn check_asset_id(asset: &Uuid) -> Result<(), Refusal> {
    let version_ok = (1..=8).contains(&asset.get_version_num());
    if asset.get_variant() != Variant::RFC4122 || !version_ok {
        return Err(Refusal::new(
            Status::InvalidAssetId,
            format!("asset_id {asset} is not an RFC 4122 UUID (variant 10, version 1-8)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> FieldRules {
        FieldRules::new(vec!["US-EAST".into(), "EU-WEST".into(), "APAC".into()])
    }

    fn body() -> DeriveBody {
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
        let checked = rules().check_derive(&body()).unwrap();
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
            let refusal = rules().check_derive(&b).unwrap_err();
            assert_eq!(refusal.status, status, "{b:?}: {}", refusal.message);
        }
        let mut b = body();
        b.ttl_s = 3600;
        assert!(rules().check_derive(&b).is_ok());
    }

    #[test]
    fn purposes_round_trip() {
        for p in Purpose::ALL {
            assert_eq!(Purpose::from_u8(p as u8), Some(p));
            assert_eq!(Purpose::from_name(p.name()), Some(p));
        }
    }
}

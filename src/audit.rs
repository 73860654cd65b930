//! Audit records (pure code): what the log keeps for every audited event.
//!
//! A shard builds one record per acknowledged operation, numbers it with its own
//! per-shard sequence when the batch is sealed, and the store commits the batch before any
//! reply leaves (I1).
//!
//! Tamper evidence: each shard chains its records. A record's hash is SHA-256 over a
//! domain tag, its canonical encoding ([`encode_canonical`], docs/audit.md byte by byte)
//! and the previous record's hash; each committed batch adds a checkpoint (the shard's
//! last sequence number and hash) authenticated with a MAC under a key derived from the
//! root seed, so write access to the store is not enough to rewrite history unnoticed.

use crate::kdf::DerivationPath;
use crate::lifecycle::AssetState;
use crate::policy::Purpose;
use std::sync::Arc;
use uuid::Uuid;

/// What happened. Stored by name; the names are part of the store's schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditEvent {
    Register,
    Derive,
    /// The counter moved forward by one (the record's `counter` is the new one).
    Rotate,
    Suspend,
    Resume,
    /// Terminal.
    Retire,
    /// An admin enabled a compliance region (`switched_region`; no asset: nil).
    RegionEnable,
    /// An admin disabled a compliance region.
    RegionDisable,
}

impl AuditEvent {
    pub const ALL: [AuditEvent; 8] = [
        AuditEvent::Register,
        AuditEvent::Derive,
        AuditEvent::Rotate,
        AuditEvent::Suspend,
        AuditEvent::Resume,
        AuditEvent::Retire,
        AuditEvent::RegionEnable,
        AuditEvent::RegionDisable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuditEvent::Register => "REGISTER",
            AuditEvent::Derive => "DERIVE",
            AuditEvent::Rotate => "ROTATE",
            AuditEvent::Suspend => "SUSPEND",
            AuditEvent::Resume => "RESUME",
            AuditEvent::Retire => "RETIRE",
            AuditEvent::RegionEnable => "REGION_ENABLE",
            AuditEvent::RegionDisable => "REGION_DISABLE",
        }
    }

    pub fn from_name(name: &str) -> Option<AuditEvent> {
        AuditEvent::ALL.into_iter().find(|e| e.name() == name)
    }

    /// The event's code in the canonical encoding (docs/audit.md): never renumber.
    pub fn code(self) -> u8 {
        match self {
            AuditEvent::Register => 1,
            AuditEvent::Derive => 2,
            AuditEvent::Rotate => 3,
            AuditEvent::Suspend => 4,
            AuditEvent::Resume => 5,
            AuditEvent::Retire => 6,
            AuditEvent::RegionEnable => 7,
            AuditEvent::RegionDisable => 8,
        }
    }
}

/// The hash before a shard's first chained record.
pub const GENESIS: [u8; 32] = [0; 32];
/// Domain tag hashed before a record's canonical encoding.
pub const RECORD_DOMAIN_V1: &[u8; 24] = b"custody/audit-record/v1\0";

/// The canonical encoding of `record` (docs/audit.md): fixed-width big-endian integers,
/// length-prefixed text, a presence byte before each optional part.
pub fn encode_canonical(record: &AuditRecord, out: &mut Vec<u8>) {
    fn text8(out: &mut Vec<u8>, t: &str) {
        // Every short text (path, region) is bounded far below 255 bytes on the way in.
        let b = &t.as_bytes()[..t.len().min(255)];
        out.push(b.len() as u8);
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&record.shard.to_be_bytes());
    out.extend_from_slice(&record.seq.to_be_bytes());
    out.push(record.event.code());
    out.extend_from_slice(record.asset.as_bytes());
    out.extend_from_slice(&record.counter.to_be_bytes());
    out.push(record.state as u8);
    let requester = &record.requester.as_bytes()[..record.requester.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(requester.len() as u16).to_be_bytes());
    out.extend_from_slice(requester);
    out.extend_from_slice(&record.request_id.to_be_bytes());
    out.extend_from_slice(&record.ts_ms.to_be_bytes());
    match &record.derive {
        None => out.push(0),
        Some(d) => {
            out.push(1);
            // The path's text, at most PATH_TEXT_MAX (≤ 61) bytes, written in place.
            let at = out.len();
            out.push(0);
            d.path.write_canonical(out);
            let len = out.len() - at - 1;
            debug_assert!(len <= crate::kdf::PATH_TEXT_MAX);
            out[at] = len.min(255) as u8;
            out.push(d.purpose as u8);
            text8(out, &d.region);
            out.extend_from_slice(&d.ttl_s.to_be_bytes());
            out.push(d.scheme_version);
        }
    }
    match &record.rotation_id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(id.as_bytes());
        }
    }
    match &record.switched_region {
        None => out.push(0),
        Some(r) => {
            out.push(1);
            text8(out, r);
        }
    }
}

/// The chain hash of `record` after `prev`: SHA-256(domain ‖ canonical ‖ prev).
pub fn chain_hash(record: &AuditRecord, prev: &[u8; 32], scratch: &mut Vec<u8>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    scratch.clear();
    encode_canonical(record, scratch);
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN_V1);
    h.update(&scratch[..]);
    h.update(prev);
    h.finalize().into()
}

/// Fields only a derivation has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeriveDetail {
    pub path: DerivationPath,
    pub purpose: Purpose,
    /// Region name, shared with the shard's configuration.
    pub region: Arc<str>,
    pub ttl_s: u32,
    pub scheme_version: u8,
}

/// One audit record. `seq` is 0 until the shard seals the batch it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub shard: u16,
    pub seq: u64,
    pub event: AuditEvent,
    pub asset: Uuid,
    /// The asset's counter the event used (derivation) or set (registration, rotation;
    /// the other transitions record the counter they left unchanged).
    pub counter: u64,
    /// The asset's state when the event was accepted (a derivation), or the state the
    /// event leaves it in (registration and the lifecycle transitions).
    pub state: AssetState,
    /// The mutual-TLS identity of the requester.
    pub requester: Arc<str>,
    /// The request id the client put in the frame header.
    pub request_id: u64,
    /// Wall-clock time the shard accepted the request, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub derive: Option<DeriveDetail>,
    /// The rotation's id (ROTATE only): a rotation sent again with the same id returns
    /// the first result.
    pub rotation_id: Option<Uuid>,
    /// The region a REGION_ENABLE / REGION_DISABLE switched (stored in the `region`
    /// column, which a derivation uses for its own region).
    pub switched_region: Option<Arc<str>>,
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::AssetState;

    use crate::hex::encode as hex;

    fn asset() -> Uuid {
        Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap()
    }

    fn derivation() -> AuditRecord {
        AuditRecord {
            shard: 3,
            seq: 42,
            event: AuditEvent::Derive,
            asset: asset(),
            counter: 7,
            state: AssetState::Active,
            requester: Arc::from("trading-svc"),
            request_id: 99,
            ts_ms: 1_795_000_000_123,
            derive: Some(DeriveDetail {
                path: DerivationPath::parse("m/44'/0'/0'/0'/7").unwrap(),
                purpose: Purpose::Settlement,
                region: Arc::from("EU-WEST"),
                ttl_s: 300,
                scheme_version: 1,
            }),
            rotation_id: None,
            switched_region: None,
        }
    }

    /// The vectors of docs/audit.md, computed by `appliance/audit_verify.py` (a separate
    /// implementation of the page); the audit key's also by `openssl kdf ... KBKDF`.
    #[test]
    fn canonical_encoding_and_chain_match_the_documented_vectors() {
        let mut out = Vec::new();
        encode_canonical(&derivation(), &mut out);
        assert_eq!(
            hex(&out),
            "0003000000000000002a020b9f3c5e8d1a4f6b9c2d3e4f5a6b7c8d000000000000000701000b74726164696e672d7376630000000000000063000001a1ee565e7b01106d2f3434272f30272f30272f30272f37020745552d574553540000012c010000"
        );
        let prev: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut scratch = Vec::new();
        let h = chain_hash(&derivation(), &prev, &mut scratch);
        assert_eq!(
            hex(&h),
            "9ed038b1289aaf5f9f2d1860e54fc304b95873695b0d3bdc9212986e19178fe3"
        );

        let rotation = AuditRecord {
            shard: 0,
            seq: 1,
            event: AuditEvent::Rotate,
            counter: 8,
            requester: Arc::from("ops"),
            request_id: 1,
            ts_ms: 5,
            derive: None,
            rotation_id: Some(Uuid::parse_str("6ba7b810-9dad-11d1-80b4-00c04fd430c8").unwrap()),
            ..derivation()
        };
        assert_eq!(
            hex(&chain_hash(&rotation, &GENESIS, &mut scratch)),
            "ff211c4c53aab3eddf05170efb591e59a5b0adfec5be6095eb7a2912b83cb712"
        );
        let switch = AuditRecord {
            event: AuditEvent::RegionDisable,
            asset: Uuid::nil(),
            counter: 0,
            rotation_id: None,
            switched_region: Some(Arc::from("EU-WEST")),
            ..rotation
        };
        assert_eq!(
            hex(&chain_hash(&switch, &GENESIS, &mut scratch)),
            "04ca4a3c9b80ae52fab8b70696a600989842e3484c05d347d6355e271c7268a5"
        );

        let seed = crate::kdf::RootSeed::from_bytes([7; 32]);
        assert_eq!(
            hex(&crate::kdf::audit_key(&seed).unwrap()[..]),
            "9c4d9c5b7b858697c6006191347d306f02e329f2e2f8dfa40fd404d7485e2a31"
        );
        let key = crate::kdf::DerivationKey::new(&seed).unwrap();
        assert_eq!(
            hex(&key.checkpoint_mac(3, 42, &h)),
            "f9bcf9ed8d0363c97dcff65edd34b180462aebd0c6b9fc2967fa1c68b63fe9a3"
        );
    }

    #[test]
    fn every_field_changes_the_hash() {
        let mut scratch = Vec::new();
        let base = chain_hash(&derivation(), &GENESIS, &mut scratch);
        let spoiled: Vec<Box<dyn Fn(&mut AuditRecord)>> = vec![
            Box::new(|r| r.shard = 4),
            Box::new(|r| r.seq = 43),
            Box::new(|r| r.event = AuditEvent::Register),
            Box::new(|r| r.asset = Uuid::nil()),
            Box::new(|r| r.counter = 6),
            Box::new(|r| r.state = AssetState::Suspended),
            Box::new(|r| r.requester = Arc::from("trading-svd")),
            Box::new(|r| r.request_id = 98),
            Box::new(|r| r.ts_ms += 1),
            Box::new(|r| r.derive.as_mut().unwrap().ttl_s = 301),
            Box::new(|r| r.derive.as_mut().unwrap().region = Arc::from("EU-EAST")),
            Box::new(|r| r.rotation_id = Some(Uuid::nil())),
            Box::new(|r| r.switched_region = Some(Arc::from("X"))),
        ];
        for (i, spoil) in spoiled.iter().enumerate() {
            let mut r = derivation();
            spoil(&mut r);
            assert_ne!(chain_hash(&r, &GENESIS, &mut scratch), base, "change {i}");
        }
        assert_ne!(chain_hash(&derivation(), &[1; 32], &mut scratch), base);
    }
}

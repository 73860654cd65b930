//! Audit records (pure code): what the log keeps for every audited event.
//!
//! A shard builds one record per acknowledged operation, numbers it with its own
//! per-shard sequence when the batch is sealed, and the store commits the batch before any
//! reply leaves (I1). The hash chain over these records is built on this type.

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

//! POLICY_RELOAD (admin): re-read the configuration file and put its `[policy]`, TLS files
//! and connection limits in force, whole or not at all (as SIGHUP does); the reply says
//! what is in force now.
//!
//! ```text
//! reply: status (2) | generation (8) | identities (4) | regions (2) | asset_groups (2)
//! ```

use crate::wire::{Reader, WireError};

/// What POLICY_RELOAD answers: the policy now in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyReloaded {
    /// The policy's generation (1 at start, one more per reload).
    pub generation: u64,
    /// Identities that hold a role.
    pub identities: u32,
    /// Configured regions.
    pub regions: u16,
    /// Asset groups defined.
    pub asset_groups: u16,
}

impl PolicyReloaded {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.identities.to_be_bytes());
        out.extend_from_slice(&self.regions.to_be_bytes());
        out.extend_from_slice(&self.asset_groups.to_be_bytes());
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<PolicyReloaded, WireError> {
        Ok(PolicyReloaded {
            generation: r.u64("generation")?,
            identities: r.u32("identities")?,
            regions: r.u16("regions")?,
            asset_groups: r.u16("asset_groups")?,
        })
    }
}

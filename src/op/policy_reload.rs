//! POLICY_RELOAD (admin): re-read the configuration file and put its `[policy]`, TLS files
//! and connection limits in force, whole or not at all (as SIGHUP does); the reply says
//! what is in force now.
//!
//! ```text
//! reply: status (2) | generation (8) | identities (4) | regions (2) | asset_groups (2)
//! ```

use super::{later, Asking, Handled, Reply};
use crate::wire::{Reader, WireError};
use crate::wire::{Refusal, Status};

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

/// POLICY_RELOAD: re-reads the configuration file on a thread of its own (file I/O stays
/// off the executor) and answers with the policy now in force, or every problem of the
/// file (the policy in force unchanged).
pub(super) fn handle(a: &Asking<'_>) -> Handled {
    let Some(reloader) = &a.ctx.reloader else {
        return Handled::Now(Err(Refusal::new(
            Status::ReloadUnavailable,
            "the appliance was started without a configuration file (--config) to re-read",
        )));
    };
    let Some(ticket) = reloader.try_request() else {
        return super::busy("a policy reload is already running", 100);
    };
    let trigger = format!("POLICY_RELOAD by {:?}", a.identity);
    let (done, pending) = crate::store::handoff::completion();
    if let Err(e) = std::thread::Builder::new()
        .name("custody-reload-request".into())
        .spawn(move || {
            let outcome = ticket.reloader().reload(&trigger);
            // Released before the answer, so the admin may send the next one at once.
            drop(ticket);
            done.complete(outcome)
        })
    {
        // The completer went with the closure: the answer is INTERNAL.
        tracing::error!(error = %e, "cannot start a thread for the policy reload");
    }
    later(
        pending,
        |r| {
            Reply::PolicyReloaded(PolicyReloaded {
                generation: r.generation,
                identities: u32::try_from(r.identities).unwrap_or(u32::MAX),
                regions: u16::try_from(r.regions).unwrap_or(u16::MAX),
                asset_groups: u16::try_from(r.asset_groups).unwrap_or(u16::MAX),
            })
        },
        |problems| {
            Refusal::new(
                Status::PolicyInvalid,
                format!("configuration not reloaded; the policy, TLS certificate and limits in force are unchanged: {problems}"),
            )
        },
        // No thread for it: nothing was read or changed.
        "the reload could not run (no thread); the policy in force is unchanged",
    )
}

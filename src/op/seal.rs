//! SEAL, UNSEAL and SEAL_STATUS: drop the seed at once (admin), submit a Shamir share or ask
//! the HSM provider to unseal now (admin), and read the seal state (anyone); all three
//! answer with the seal state ([`SealInfo`]).
//!
//! ```text
//! UNSEAL request: flags (1: RESET) | share (u8 len + ASCII, ≤ 160; empty: unseal by HSM)
//! reply: status (2) | state (1) | provider (1) | shares_received (1) | threshold (1)
//!        | shares (1) | since_unix_ms, key_unsealed_unix_ms, calls_ok, calls_failed,
//!          calls_timed_out, breaker_opened (8 each) | fingerprint (16)
//!        | reason (u16 len + UTF-8)
//! ```

use super::{Asking, Handled, Reply};
use crate::bounds;
use crate::seal::cache::{clock_ms, SealState, SeedCache};
use crate::seal::shamir::ShareError;
use crate::wire::{put_short, put_text, ProviderCode, Reader, SealStateCode, WireError};
use crate::wire::{Refusal, Status};

/// UNSEAL flag: discard the shares submitted so far (before taking this one, if any).
pub const UNSEAL_FLAG_RESET: u8 = 0x01;

/// A Shamir share as it travels in an UNSEAL request: zeroized when dropped, never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ShareText(pub zeroize::Zeroizing<String>);

impl ShareText {
    pub fn new(text: &str) -> ShareText {
        ShareText(zeroize::Zeroizing::new(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ShareText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShareText(<{} bytes, redacted>)", self.0.len())
    }
}

pub(super) fn decode_unseal(r: &mut Reader<'_>) -> Result<(bool, ShareText), WireError> {
    let flags = r.u8("flags")?;
    if flags & !UNSEAL_FLAG_RESET != 0 {
        return Err(WireError::BadField {
            field: "flags",
            reason: "reserved bits set",
        });
    }
    let share = r.short_ascii("share", bounds::SHARE_TEXT_BYTES_MAX)?;
    Ok((flags & UNSEAL_FLAG_RESET != 0, ShareText::new(share)))
}

pub(super) fn encode_unseal(reset: bool, share: &ShareText, out: &mut Vec<u8>) {
    out.push(if reset { UNSEAL_FLAG_RESET } else { 0 });
    put_short(out, share.as_str().as_bytes());
}

/// What SEAL, UNSEAL and SEAL_STATUS answer. Times are Unix milliseconds (0: none).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SealInfo {
    pub state: SealStateCode,
    pub provider: ProviderCode,
    /// Shares submitted so far (`shamir`; 0 otherwise).
    pub shares_received: u8,
    /// Shares needed (k), and shares made (n); 0 for the other providers.
    pub threshold: u8,
    pub shares: u8,
    /// When the current state began (0 while unsealed and fresh).
    pub since_unix_ms: u64,
    /// When the serving key was unsealed (0: no key).
    pub key_unsealed_unix_ms: u64,
    /// Provider calls by result, and times the breaker opened.
    pub calls_ok: u64,
    pub calls_failed: u64,
    pub calls_timed_out: u64,
    pub breaker_opened: u64,
    /// The fingerprint of the seed last unsealed or (`shamir`) of the seed the shares must
    /// rebuild; all zero when not known yet. Compare it with the ceremony record.
    #[serde(serialize_with = "crate::hex::serialize")]
    pub fingerprint: [u8; 16],
    /// Why it is sealed by failure (empty otherwise).
    pub reason: String,
}

impl SealInfo {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.state as u8);
        out.push(self.provider as u8);
        out.push(self.shares_received);
        out.push(self.threshold);
        out.push(self.shares);
        for v in [
            self.since_unix_ms,
            self.key_unsealed_unix_ms,
            self.calls_ok,
            self.calls_failed,
            self.calls_timed_out,
            self.breaker_opened,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.fingerprint);
        put_text(out, &self.reason);
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<SealInfo, WireError> {
        let state = SealStateCode::from_u8(r.u8("state")?).ok_or(WireError::BadField {
            field: "state",
            reason: "unknown seal state",
        })?;
        let provider = ProviderCode::from_u8(r.u8("provider")?).ok_or(WireError::BadField {
            field: "provider",
            reason: "unknown seal provider",
        })?;
        Ok(SealInfo {
            state,
            provider,
            shares_received: r.u8("shares_received")?,
            threshold: r.u8("threshold")?,
            shares: r.u8("shares")?,
            since_unix_ms: r.u64("since_unix_ms")?,
            key_unsealed_unix_ms: r.u64("key_unsealed_unix_ms")?,
            calls_ok: r.u64("calls_ok")?,
            calls_failed: r.u64("calls_failed")?,
            calls_timed_out: r.u64("calls_timed_out")?,
            breaker_opened: r.u64("breaker_opened")?,
            fingerprint: r.array("fingerprint")?,
            reason: r.message("reason")?.to_owned(),
        })
    }
}

/// SEAL_STATUS: the seal state, from this core.
pub(super) fn status(a: &Asking<'_>) -> Handled {
    let info = seal_info(a.ctx.key.cache(), a.ctx.seal_provider);
    Handled::Now(Ok(Reply::Seal(info)))
}

/// SEAL: the seed dropped at once; this core's copy now, the others' within
/// CORE_KEY_REFRESH.
pub(super) fn seal(a: &Asking<'_>) -> Handled {
    let cache = a.ctx.key.cache();
    cache.seal();
    a.ctx.key.refresh();
    let (identity, request_id) = (a.identity, a.request_id);
    tracing::warn!(%identity, request_id, "sealed by an operator over the wire");
    Handled::Now(Ok(Reply::Seal(seal_info(cache, a.ctx.seal_provider))))
}

/// UNSEAL: the submitted shares discarded first if asked; then a share taken (`shamir`),
/// or the HSM provider asked to unseal now (an empty share).
pub(super) fn unseal(a: &Asking<'_>, reset: bool, share: ShareText) -> Handled {
    let cache = a.ctx.key.cache();
    let (identity, request_id) = (a.identity, a.request_id);
    if reset {
        cache.reset_shares();
        tracing::info!(%identity, request_id, "unseal: submitted shares discarded");
    }
    let outcome = if !share.as_str().is_empty() {
        cache.submit_share(share.as_str()).map(|progress| {
            tracing::info!(
                %identity,
                request_id,
                received = progress.received,
                threshold = progress.threshold,
                unsealed = progress.unsealed,
                "unseal: share accepted"
            );
            a.ctx.key.refresh();
        })
    } else if !cache.uses_shares() {
        tracing::info!(%identity, request_id, "unseal: asked the provider to unseal now");
        cache.unseal();
        Ok(())
    } else {
        Ok(())
    };
    drop(share);
    match outcome {
        Ok(()) => Handled::Now(Ok(Reply::Seal(seal_info(cache, a.ctx.seal_provider)))),
        Err(e) => {
            tracing::warn!(%identity, request_id, error = %e, "unseal: share refused");
            Handled::Now(Err(Refusal::new(share_status(&e), e.to_string())))
        }
    }
}

/// The status of a refused share.
fn share_status(e: &ShareError) -> Status {
    match e {
        ShareError::Repeated { .. } => Status::ShareRepeated,
        ShareError::SeedMismatch { .. } => Status::SeedMismatch,
        ShareError::AlreadyUnsealed => Status::AlreadyUnsealed,
        ShareError::Interrupted => Status::Sealed,
        ShareError::Memory(_) => Status::Internal,
        _ => Status::ShareInvalid,
    }
}

/// SEALED. The reason is for operators (the appliance logs it); a client learns only
/// which kind of seal, never the provider's details (paths, labels, token errors).
pub(super) fn sealed_refusal(cache: &SeedCache) -> Refusal {
    let why = match cache.status().state {
        SealState::SealedByOperator { .. } => "the seed is sealed by an operator",
        SealState::Sealed { .. } | SealState::Unsealing { .. } => {
            "the seed is sealed: the appliance is waiting for operators' unseal shares"
        }
        SealState::SealedByFailure { .. } => {
            "the seed is sealed: its provider could not be reached (see the appliance's log)"
        }
        SealState::Unsealed | SealState::ServingStale { .. } => {
            "the seed is sealed: its cached key expired"
        }
    };
    Refusal::new(Status::Sealed, why)
}

/// The seal state as SEAL, UNSEAL and SEAL_STATUS report it, with process-clock times
/// turned into Unix milliseconds.
pub fn seal_info(cache: &SeedCache, provider: ProviderCode) -> SealInfo {
    let status = cache.status();
    let (now_unix, now_clock) = (crate::audit::now_ms(), clock_ms());
    let unix = |at: u64| now_unix.saturating_sub(now_clock.saturating_sub(at));
    let set = cache.share_set();
    let (threshold, shares) = set.map_or((0, 0), |s| (s.threshold, s.shares));
    let (state, since, received, reason) = match status.state {
        SealState::Unsealed => (SealStateCode::Unsealed, 0, 0, String::new()),
        SealState::ServingStale { since_ms } => (
            SealStateCode::ServingStale,
            unix(since_ms),
            0,
            String::new(),
        ),
        SealState::Sealed { since_ms } => (SealStateCode::Sealed, unix(since_ms), 0, String::new()),
        SealState::Unsealing {
            since_ms, received, ..
        } => (
            SealStateCode::Unsealing,
            unix(since_ms),
            received,
            String::new(),
        ),
        SealState::SealedByOperator { since_ms } => (
            SealStateCode::SealedByOperator,
            unix(since_ms),
            0,
            String::new(),
        ),
        SealState::SealedByFailure { since_ms, reason } => {
            (SealStateCode::SealedByFailure, unix(since_ms), 0, reason)
        }
    };
    SealInfo {
        state,
        provider,
        shares_received: received,
        threshold,
        shares,
        since_unix_ms: since,
        key_unsealed_unix_ms: status.key_unsealed_ms.map_or(0, unix),
        fingerprint: status
            .fingerprint
            .as_deref()
            .and_then(crate::hex::decode)
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .unwrap_or([0; 16]),
        calls_ok: status.calls.ok,
        calls_failed: status.calls.failed,
        calls_timed_out: status.calls.timed_out,
        breaker_opened: status.calls.breaker_opened,
        reason,
    }
}

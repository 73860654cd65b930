//! RECONCILE and PROVE_RECEIPT (auditor, operator or admin): check the audit log against
//! its chain, its checkpoints and the counters now (from the last run's watermark, or in
//! full), and prove that a receipt's record is in the log under a checkpoint.
//!
//! ```text
//! RECONCILE request: flags (1: FULL)
//! RECONCILE reply:   status (2) | records_checked, checkpoints_checked, assets_checked,
//!                    assets_drifted (8 each) | macs_checked (1) | findings_total (4)
//!                    | count (1, ≤ 16) | finding (u16 len + UTF-8) each
//! PROVE_RECEIPT request: shard (2) | seq (8) | hash (32)
//! PROVE_RECEIPT reply:   status (2) | verdict (1) | checkpoint_seq (8)
//!                        | detail (u16 len + UTF-8)
//! ```

use super::{later, Asking, Handled, Reply};
use crate::wire::{put_text, Reader, WireError};
use crate::wire::{Receipt, Refusal, Status};

/// RECONCILE flag: a full run from the first record (else from the last run's watermark).
pub const RECONCILE_FLAG_FULL: u8 = 0x01;
/// Findings a RECONCILE reply carries at most (the appliance's log has every one).
pub const RECONCILE_FINDINGS_MAX: usize = 16;

pub(super) fn decode_flags(r: &mut Reader<'_>) -> Result<bool, WireError> {
    let flags = r.u8("flags")?;
    if flags & !RECONCILE_FLAG_FULL != 0 {
        return Err(WireError::BadField {
            field: "flags",
            reason: "unknown flag bits",
        });
    }
    Ok(flags & RECONCILE_FLAG_FULL != 0)
}

pub(super) fn encode_flags(full: bool, out: &mut Vec<u8>) {
    out.push(if full { RECONCILE_FLAG_FULL } else { 0 });
}

/// What RECONCILE answers (the drift ratio is `assets_drifted / assets_checked`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileSummary {
    pub records_checked: u64,
    pub checkpoints_checked: u64,
    pub assets_checked: u64,
    pub assets_drifted: u64,
    pub macs_checked: bool,
    /// Findings of the run in all.
    pub findings_total: u32,
    /// The first [`RECONCILE_FINDINGS_MAX`] of them, one line each.
    pub findings: Vec<String>,
}

impl ReconcileSummary {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.records_checked,
            self.checkpoints_checked,
            self.assets_checked,
            self.assets_drifted,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.push(u8::from(self.macs_checked));
        out.extend_from_slice(&self.findings_total.to_be_bytes());
        let n = self.findings.len().min(RECONCILE_FINDINGS_MAX);
        out.push(n as u8);
        for f in &self.findings[..n] {
            put_text(out, f);
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<ReconcileSummary, WireError> {
        let records_checked = r.u64("records_checked")?;
        let checkpoints_checked = r.u64("checkpoints_checked")?;
        let assets_checked = r.u64("assets_checked")?;
        let assets_drifted = r.u64("assets_drifted")?;
        let macs_checked = r.flag("macs_checked")?;
        let findings_total = r.u32("findings_total")?;
        let n = r.u8("findings")? as usize;
        if n > RECONCILE_FINDINGS_MAX {
            return Err(WireError::BadField {
                field: "findings",
                reason: "more than 16",
            });
        }
        let mut findings = Vec::with_capacity(n);
        for _ in 0..n {
            findings.push(r.message("finding")?.to_owned());
        }
        Ok(ReconcileSummary {
            records_checked,
            checkpoints_checked,
            assets_checked,
            assets_drifted,
            macs_checked,
            findings_total,
            findings,
        })
    }
}

/// What PROVE_RECEIPT answers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProofInfo {
    /// [`crate::reconcile::Verdict`]'s code.
    pub verdict: u8,
    /// The checkpoint that covers the record (0: none).
    pub checkpoint_seq: u64,
    pub detail: String,
}

impl ProofInfo {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.verdict);
        out.extend_from_slice(&self.checkpoint_seq.to_be_bytes());
        put_text(out, &self.detail);
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<ProofInfo, WireError> {
        Ok(ProofInfo {
            verdict: r.u8("verdict")?,
            checkpoint_seq: r.u64("checkpoint_seq")?,
            detail: r.message("detail")?.to_owned(),
        })
    }
}

/// RECONCILE: a run of the auditor thread (from its watermark, or full), answered with
/// its figures and its first findings.
pub(super) fn handle(a: &Asking<'_>, full: bool) -> Handled {
    let Some(pending) = a.ctx.auditor.as_ref().and_then(|au| au.request(full)) else {
        return super::busy(
            "reconciliations are queued already; ask again shortly",
            1000,
        );
    };
    let (identity, request_id) = (a.identity, a.request_id);
    tracing::info!(%identity, request_id, full, "reconciliation requested");
    later(
        pending,
        |report| {
            Reply::Reconciled(ReconcileSummary {
                records_checked: report.records_checked,
                checkpoints_checked: report.checkpoints_checked,
                assets_checked: report.assets_checked,
                assets_drifted: report.assets_drifted,
                macs_checked: report.macs_checked,
                findings_total: u32::try_from(report.findings.len()).unwrap_or(u32::MAX),
                findings: report
                    .findings
                    .iter()
                    .take(RECONCILE_FINDINGS_MAX)
                    .map(|f| f.to_string())
                    .collect(),
            })
        },
        |why| {
            Refusal::new(
                Status::StoreUnavailable,
                format!("reconciliation did not run: {why}"),
            )
        },
        "the auditor thread stopped",
    )
}

/// PROVE_RECEIPT: the auditor thread reads the receipt's record and the chain to the first
/// checkpoint after it, and says what it found.
pub(super) fn prove(a: &Asking<'_>, receipt: Receipt) -> Handled {
    let pending = a
        .ctx
        .auditor
        .as_ref()
        .and_then(|au| au.prove(receipt.shard, receipt.seq, receipt.hash));
    let Some(pending) = pending else {
        return super::busy(
            "the auditor has work queued already; ask again shortly",
            1000,
        );
    };
    later(
        pending,
        |p| {
            Reply::Proof(ProofInfo {
                verdict: p.verdict as u8,
                checkpoint_seq: p.checkpoint_seq,
                detail: p.detail,
            })
        },
        |why| Refusal::new(Status::StoreUnavailable, format!("no proof: {why}")),
        "the auditor thread stopped",
    )
}

//! Audit checkpoints: a shard's authenticated position in its hash chain (docs/audit.md).
//!
//! Each committed batch ends with a checkpoint: the shard's last sequence number and
//! record hash, MACed under the audit key derived from the root seed ([`crate::kdf`]
//! computes the MAC over [`message`]). The shard signs one as it seals a batch
//! ([`Signer`]), the store keeps it beside the records, and [`crate::reconcile`] and
//! `custody verify-log` check it.

/// Domain tag of the checkpoint MAC's message.
pub const DOMAIN_V1: &[u8; 28] = b"custody/audit-checkpoint/v1\0";

/// Length of [`message`]: domain, shard, sequence number, hash.
pub const MESSAGE_LEN: usize = DOMAIN_V1.len() + 2 + 8 + 32;

/// A shard's authenticated position in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub shard: u16,
    pub seq: u64,
    pub hash: [u8; 32],
    pub mac: [u8; 32],
    pub ts_ms: u64,
}

/// What a checkpoint's MAC covers: domain ‖ shard (u16) ‖ seq (u64) ‖ hash.
pub fn message(shard: u16, seq: u64, hash: &[u8; 32]) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[..28].copy_from_slice(DOMAIN_V1);
    m[28..30].copy_from_slice(&shard.to_be_bytes());
    m[30..38].copy_from_slice(&seq.to_be_bytes());
    m[38..].copy_from_slice(hash);
    m
}

/// Authenticates checkpoints: the MAC of a shard's (sequence number, chain hash) under
/// the audit key derived from the root seed, or `None` while sealed.
pub trait Signer {
    fn sign(&self, shard: u16, seq: u64, hash: &[u8; 32]) -> Option<[u8; 32]>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_domain_shard_seq_hash() {
        let m = message(0x0102, 0x0304_0506_0708_090a, &[0xee; 32]);
        assert_eq!(&m[..28], DOMAIN_V1);
        assert_eq!(&m[28..30], &[1, 2]);
        assert_eq!(&m[30..38], &[3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(&m[38..], &[0xee; 32]);
    }
}

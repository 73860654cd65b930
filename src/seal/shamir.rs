//! Shamir k-of-n shares of the root seed: the `shamir` seal provider's unseal, the
//! offline recovery's input, and the backup every `custody init` writes.
//!
//! The split is Shamir's scheme over GF(2^8), byte by byte (vsss-rs `Gf256`), with
//! participant numbers 1..=n. A share travels as one line of text an operator can keep on
//! paper or in a file and paste into `custody unseal`:
//!
//! ```text
//! custody-share/1:<seed id>:<threshold k>:<share number>:<64 hex digits>:<8 hex check>
//! ```
//!
//! The check is the first 4 bytes of SHA-256 over the other fields and the share bytes:
//! it catches a mistyped or damaged share at once (it is not a MAC; a forged share is
//! caught by the seed's fingerprint once k shares are in). Next to the shares, the share
//! set file (`custody-share-set/1`, JSON) names the seed, k, n and the seed's fingerprint,
//! so an appliance knows which seed its shares must rebuild.
//!
//! Pure apart from reading and writing those files: the [`ShareGate`] that collects shares
//! in the appliance keeps them in locked memory and never logs or echoes them.

use super::blob;
use crate::kdf::{RootSeed, SEED_LEN};
use crate::locked::{LockError, Locked};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;
use vsss_rs::Gf256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Format tag of a share line.
pub const SHARE_FORMAT: &str = "custody-share/1";
/// Format tag of a share set file.
pub const SET_FORMAT: &str = "custody-share-set/1";
/// Most shares a seed is split into (n).
pub const MAX_SHARES: u8 = 32;
/// Fewest shares that may rebuild a seed (k); one share alone would be the seed.
pub const MIN_THRESHOLD: u8 = 2;
/// Longest share text accepted (a share line is at most 132 bytes; whitespace around it allowed).
pub const SHARE_TEXT_MAX: usize = 512;
/// Submitted shares are discarded when the threshold is not reached within this time of
/// the first one (an unseal left half done does not keep shares in memory for ever).
pub const UNSEAL_PROGRESS_TIMEOUT: Duration = Duration::from_secs(600);
/// Length of a share's check, in bytes.
const CHECK_LEN: usize = 4;

/// Why a share, or a set of shares, is refused. Never carries share or seed bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    #[error("not a custody share: {0}")]
    Malformed(String),
    #[error("the share's check digits do not match: it is mistyped or damaged")]
    Checksum,
    #[error("this share belongs to seed {share}, not to this appliance's seed {expected}")]
    OtherSeed { share: Uuid, expected: Uuid },
    #[error("this share is from a {share}-of-n split, but this seed needs {expected} shares")]
    ThresholdMismatch { share: u8, expected: u8 },
    #[error("share number {index} does not exist: this seed was split into {shares} shares")]
    NoSuchShare { index: u8, shares: u8 },
    #[error("share number {index} was already submitted ({received} of {threshold} so far); submit a different share")]
    Repeated {
        index: u8,
        received: u8,
        threshold: u8,
    },
    #[error("the shares rebuild a seed with fingerprint {rebuilt}, not this appliance's seed {expected}; all submitted shares were discarded, start again")]
    SeedMismatch { rebuilt: String, expected: String },
    #[error("{0}")]
    Combine(String),
    #[error("this appliance does not unseal with shares: its seal provider unseals through the HSM (or the dev seed file)")]
    NotShamir,
    #[error("the appliance is already unsealed; the share was not used")]
    AlreadyUnsealed,
    #[error("the shares rebuilt the seed, but its key cannot be kept in locked memory ({0}); the shares were discarded: raise LimitMEMLOCK and submit them again")]
    Memory(String),
    #[error("the appliance was sealed or stopped while the last share was combined; the shares were discarded")]
    Interrupted,
}

/// Why a seed cannot be split, or a share set file used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    #[error("a {threshold}-of-{shares} split is not allowed: need {MIN_THRESHOLD} <= k <= n <= {MAX_SHARES}")]
    Parameters { threshold: u8, shares: u8 },
    #[error("no randomness from the operating system")]
    Random,
    #[error("splitting the seed failed: {0}")]
    Split(String),
    #[error("shares {0} do not rebuild the seed; nothing was written")]
    Verify(String),
    #[error("{0}")]
    Io(String),
    #[error("{path}: mode {mode:o} lets others read it; chmod 600 it")]
    TooOpen { path: String, mode: u32 },
    #[error("{0}: already exists; refusing to overwrite it")]
    Exists(String),
    #[error("{path}: not a share set this build reads: {reason}")]
    Format { path: String, reason: String },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Memory(#[from] LockError),
}

/// One share of a seed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Share {
    #[zeroize(skip)]
    pub seed_id: Uuid,
    pub threshold: u8,
    /// The participant number, 1..=n.
    pub index: u8,
    value: [u8; SEED_LEN],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Share({} #{} of k={}, <redacted>)",
            self.seed_id, self.index, self.threshold
        )
    }
}

fn check(seed_id: Uuid, threshold: u8, index: u8, value: &[u8; SEED_LEN]) -> [u8; CHECK_LEN] {
    let mut h = Sha256::new();
    h.update(format!("{SHARE_FORMAT}|{seed_id}|{threshold}|{index}|").as_bytes());
    h.update(value);
    let digest = h.finalize();
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest[..CHECK_LEN]);
    out
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex into `out` in place (no copy of the bytes outside `out`).
fn hex_into(text: &str, out: &mut [u8]) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * out.len() {
        return false;
    }
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        match (hex_digit(pair[0]), hex_digit(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

impl Share {
    /// A share from its parts (used by the split and by tests that forge shares).
    pub fn from_parts(seed_id: Uuid, threshold: u8, index: u8, value: [u8; SEED_LEN]) -> Share {
        Share {
            seed_id,
            threshold,
            index,
            value,
        }
    }

    /// The share as one line of text (no newline). Zeroized when dropped.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(160));
        let _ = write!(
            out,
            "{SHARE_FORMAT}:{}:{}:{}:",
            self.seed_id, self.threshold, self.index
        );
        for b in &self.value {
            let _ = write!(out, "{b:02x}");
        }
        let c = check(self.seed_id, self.threshold, self.index, &self.value);
        let _ = write!(out, ":{}", crate::hex::encode(&c));
        out
    }

    /// Decodes a share line (surrounding whitespace allowed). Pure; never panics (fuzzed).
    pub fn parse(text: &str) -> Result<Share, ShareError> {
        let bad = |why: &str| ShareError::Malformed(why.to_string());
        if text.len() > SHARE_TEXT_MAX {
            return Err(bad("longer than any share"));
        }
        let text = text.trim();
        let mut parts = text.split(':');
        let mut next = || {
            parts
                .next()
                .ok_or_else(|| bad("too few ':'-separated fields"))
        };
        let format = next()?;
        if format != SHARE_FORMAT {
            return Err(bad(&format!("it does not start with {SHARE_FORMAT:?}")));
        }
        let seed_id = Uuid::parse_str(next()?).map_err(|_| bad("the seed id is not a UUID"))?;
        let threshold: u8 = next()?
            .parse()
            .map_err(|_| bad("the threshold is not a number"))?;
        let index: u8 = next()?
            .parse()
            .map_err(|_| bad("the share number is not a number"))?;
        let value_hex = next()?;
        let check_hex = next()?;
        if parts.next().is_some() {
            return Err(bad("too many ':'-separated fields"));
        }
        if !(MIN_THRESHOLD..=MAX_SHARES).contains(&threshold) {
            return Err(bad(&format!(
                "threshold {threshold} is outside {MIN_THRESHOLD}..={MAX_SHARES}"
            )));
        }
        if !(1..=MAX_SHARES).contains(&index) {
            return Err(bad(&format!(
                "share number {index} is outside 1..={MAX_SHARES}"
            )));
        }
        let mut share = Share {
            seed_id,
            threshold,
            index,
            value: [0u8; SEED_LEN],
        };
        if !hex_into(value_hex, &mut share.value) {
            return Err(bad(&format!(
                "the share is not {} hex digits",
                2 * SEED_LEN
            )));
        }
        let mut given = [0u8; CHECK_LEN];
        if !hex_into(check_hex, &mut given) {
            return Err(bad(&format!(
                "the check is not {} hex digits",
                2 * CHECK_LEN
            )));
        }
        if given != check(seed_id, threshold, index, &share.value) {
            return Err(ShareError::Checksum);
        }
        Ok(share)
    }
}

/// An `impl CryptoRng` over the operating system's generator that cannot panic: a
/// failure is remembered, and the split that used it is thrown away.
struct OsRng {
    failed: bool,
}

impl getrandom::rand_core::TryRng for OsRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        if getrandom::fill(dst).is_err() {
            self.failed = true;
        }
        Ok(())
    }
}

impl getrandom::rand_core::TryCryptoRng for OsRng {}

/// Splits `seed` into `shares` shares, any `threshold` of which rebuild it, and checks
/// that they do: every run of `threshold` consecutive shares (wrapping), so each share
/// takes part in at least one check.
pub fn split(
    seed: &RootSeed,
    seed_id: Uuid,
    threshold: u8,
    shares: u8,
) -> Result<Vec<Share>, ShamirError> {
    if !(MIN_THRESHOLD..=MAX_SHARES).contains(&threshold)
        || !(threshold..=MAX_SHARES).contains(&shares)
    {
        return Err(ShamirError::Parameters { threshold, shares });
    }
    let mut rng = OsRng { failed: false };
    let mut raw = Gf256::split_bytes(threshold.into(), shares.into(), seed.expose(), &mut rng)
        .map_err(|e| ShamirError::Split(format!("{e:?}")))?;
    let failed = rng.failed;
    let mut out = Vec::with_capacity(shares.into());
    let mut shape_ok = raw.len() == usize::from(shares);
    for (i, v) in raw.iter().enumerate() {
        if v.len() != SEED_LEN + 1 || usize::from(v[0]) != i + 1 {
            shape_ok = false;
            break;
        }
        let mut share = Share {
            seed_id,
            threshold,
            index: v[0],
            value: [0u8; SEED_LEN],
        };
        share.value.copy_from_slice(&v[1..]);
        out.push(share);
    }
    raw.iter_mut().for_each(|v| v.zeroize());
    if failed {
        return Err(ShamirError::Random);
    }
    if !shape_ok {
        return Err(ShamirError::Split("unexpected share shape".into()));
    }
    let n = usize::from(shares);
    let k = usize::from(threshold);
    for start in 0..n {
        let subset: Vec<&Share> = (0..k).map(|j| &out[(start + j) % n]).collect();
        let numbers: Vec<String> = subset.iter().map(|s| s.index.to_string()).collect();
        let rebuilt = combine(&subset)
            .map_err(|e| ShamirError::Verify(format!("{} ({e})", numbers.join(", "))))?;
        if rebuilt.expose() != seed.expose() {
            return Err(ShamirError::Verify(numbers.join(", ")));
        }
    }
    Ok(out)
}

/// Rebuilds the seed from shares of one split: at least k of them, all of the same seed
/// and threshold, no number twice.
pub fn combine(shares: &[&Share]) -> Result<RootSeed, ShareError> {
    let first = shares
        .first()
        .ok_or_else(|| ShareError::Combine("no shares".into()))?;
    for s in shares {
        if s.seed_id != first.seed_id {
            return Err(ShareError::OtherSeed {
                share: s.seed_id,
                expected: first.seed_id,
            });
        }
        if s.threshold != first.threshold {
            return Err(ShareError::ThresholdMismatch {
                share: s.threshold,
                expected: first.threshold,
            });
        }
    }
    let received = shares.len();
    for (i, s) in shares.iter().enumerate() {
        if shares[..i].iter().any(|t| t.index == s.index) {
            return Err(ShareError::Repeated {
                index: s.index,
                received: received as u8,
                threshold: first.threshold,
            });
        }
    }
    if received < usize::from(first.threshold) {
        return Err(ShareError::Combine(format!(
            "{received} shares given, this seed needs {}",
            first.threshold
        )));
    }
    let mut raw: Vec<Vec<u8>> = shares
        .iter()
        .map(|s| {
            let mut v = Vec::with_capacity(SEED_LEN + 1);
            v.push(s.index);
            v.extend_from_slice(&s.value);
            v
        })
        .collect();
    let rebuilt = Gf256::combine_bytes(&raw).map(Zeroizing::new);
    raw.iter_mut().for_each(|v| v.zeroize());
    let rebuilt = rebuilt.map_err(|e| ShareError::Combine(format!("{e:?}")))?;
    if rebuilt.len() != SEED_LEN {
        return Err(ShareError::Combine(format!(
            "rebuilt {} bytes, not {SEED_LEN}",
            rebuilt.len()
        )));
    }
    let mut seed = RootSeed::zeroed();
    seed.expose_mut().copy_from_slice(&rebuilt);
    Ok(seed)
}

/// What an appliance (or an auditor) knows about a split: which seed, k, n and the
/// seed's fingerprint. Holds nothing secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSet {
    pub format: String,
    pub seed_id: Uuid,
    pub threshold: u8,
    pub shares: u8,
    pub fingerprint: String,
    pub created_at_ms: u64,
}

impl ShareSet {
    pub fn new(seed_id: Uuid, threshold: u8, shares: u8, fingerprint: String) -> ShareSet {
        ShareSet {
            format: SET_FORMAT.into(),
            seed_id,
            threshold,
            shares,
            fingerprint,
            created_at_ms: crate::audit::now_ms(),
        }
    }

    /// Decodes a share set file's text. Pure; never panics (fuzzed).
    pub fn parse(text: &str) -> Result<ShareSet, String> {
        let set: ShareSet = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if set.format != SET_FORMAT {
            return Err(format!("format {:?}, expected {SET_FORMAT:?}", set.format));
        }
        if !(MIN_THRESHOLD..=MAX_SHARES).contains(&set.threshold)
            || !(set.threshold..=MAX_SHARES).contains(&set.shares)
        {
            return Err(format!(
                "a {}-of-{} split is not allowed: need {MIN_THRESHOLD} <= k <= n <= {MAX_SHARES}",
                set.threshold, set.shares
            ));
        }
        if crate::hex::decode(&set.fingerprint).map_or(true, |f| f.len() != 16) {
            return Err("fingerprint is not 16 bytes of hex".into());
        }
        Ok(set)
    }

    /// Reads a share set file, refusing one others can write or read, or one owned by
    /// anyone but this process's user or root: the file names the seed the appliance
    /// will accept, so whoever may replace it could have it unsealed with their own shares.
    pub fn read(path: &Path) -> Result<ShareSet, ShamirError> {
        use std::os::unix::fs::MetadataExt;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| ShamirError::Io(format!("{shown}: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ShamirError::TooOpen { path: shown, mode });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me && meta.uid() != 0 {
            return Err(ShamirError::Io(format!(
                "{shown}: owned by uid {}, not by this user (uid {me}) or root; refusing a share set someone else could have written",
                meta.uid()
            )));
        }
        if meta.len() > blob::FILE_BYTES_MAX {
            return Err(ShamirError::Format {
                path: shown,
                reason: format!("{} bytes, more than {}", meta.len(), blob::FILE_BYTES_MAX),
            });
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| ShamirError::Io(format!("{shown}: {e}")))?;
        ShareSet::parse(&text).map_err(|reason| ShamirError::Format {
            path: shown,
            reason,
        })
    }

    /// Writes the share set (mode 0600, flushed); never overwrites a file.
    pub fn write_new(&self, path: &Path) -> Result<(), ShamirError> {
        let shown = path.display().to_string();
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| ShamirError::Io(format!("{shown}: {e}")))?;
        text.push('\n');
        write_new(path, text.as_bytes())
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), ShamirError> {
    super::write_private_new(path, bytes).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => ShamirError::Exists(path.display().to_string()),
        _ => ShamirError::Io(format!("{}: {e}", path.display())),
    })
}

/// The file name of share `index` in a share directory.
pub fn share_file_name(index: u8) -> String {
    format!("share-{index}.txt")
}

/// Writes each share to `dir/share-<n>.txt` (mode 0600, never over an existing file).
/// Every target is checked free before the first is written.
pub fn write_share_files(
    dir: &Path,
    shares: &[Share],
) -> Result<Vec<std::path::PathBuf>, ShamirError> {
    let paths: Vec<_> = shares
        .iter()
        .map(|s| dir.join(share_file_name(s.index)))
        .collect();
    if let Some(taken) = paths.iter().find(|p| p.exists()) {
        return Err(ShamirError::Exists(taken.display().to_string()));
    }
    for (i, (share, path)) in shares.iter().zip(&paths).enumerate() {
        let mut line = share.encode();
        line.push('\n');
        if let Err(e) = write_new(path, line.as_bytes()) {
            // No partial set is left behind: a set missing shares is worse than none.
            remove_share_files(&paths[..i]);
            return Err(e);
        }
    }
    Ok(paths)
}

/// Overwrites and removes share files (an init that failed after writing them).
pub fn remove_share_files(paths: &[std::path::PathBuf]) {
    for path in paths {
        if let Ok(meta) = std::fs::metadata(path) {
            let zeros = vec![0u8; meta.len() as usize];
            let _ = std::fs::write(path, zeros);
        }
        let _ = std::fs::remove_file(path);
    }
}

/// Reads one share from a file (a share line; mode 0600 required).
pub fn read_share_file(path: &Path) -> Result<Share, ShamirError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| ShamirError::Io(format!("{shown}: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ShamirError::TooOpen { path: shown, mode });
    }
    if meta.len() > SHARE_TEXT_MAX as u64 {
        return Err(ShamirError::Format {
            path: shown,
            reason: "longer than any share".into(),
        });
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| ShamirError::Io(format!("{shown}: {e}")))?,
    );
    Share::parse(&text).map_err(|e| ShamirError::Format {
        path: shown,
        reason: e.to_string(),
    })
}

/// The outcome of one accepted share.
pub enum Submitted {
    /// Accepted; more shares are needed.
    Progress { received: u8, threshold: u8 },
    /// The threshold was reached and the shares rebuilt this appliance's seed.
    Unsealed(RootSeed),
}

/// Collects shares in the appliance until k of them rebuild the seed of its share set.
/// A refused share changes nothing; the shares go (zeroized) once they are combined,
/// on [`ShareGate::reset`], or [`UNSEAL_PROGRESS_TIMEOUT`] after the first.
pub struct ShareGate {
    set: ShareSet,
    /// Share values by share number - 1, in locked memory.
    values: Locked<[u8; MAX_SHARES as usize * SEED_LEN]>,
    /// Share numbers received, in order.
    received: Vec<u8>,
    first_at: Option<Instant>,
}

impl ShareGate {
    pub fn new(set: ShareSet) -> Result<ShareGate, LockError> {
        Ok(ShareGate {
            set,
            values: Locked::new([0u8; MAX_SHARES as usize * SEED_LEN])?,
            received: Vec::with_capacity(MAX_SHARES.into()),
            first_at: None,
        })
    }

    pub fn set(&self) -> &ShareSet {
        &self.set
    }

    /// Shares received so far (0 after a timeout), and the threshold.
    pub fn progress(&mut self, now: Instant) -> (u8, u8) {
        self.expire(now);
        (self.received.len() as u8, self.set.threshold)
    }

    /// Discards every submitted share.
    pub fn reset(&mut self) {
        self.values.zeroize();
        self.received.clear();
        self.first_at = None;
    }

    fn expire(&mut self, now: Instant) {
        if let Some(first) = self.first_at {
            if now.duration_since(first) >= UNSEAL_PROGRESS_TIMEOUT {
                tracing::warn!(
                    received = self.received.len(),
                    threshold = self.set.threshold,
                    "unseal: shares discarded, the threshold was not reached within {} s",
                    UNSEAL_PROGRESS_TIMEOUT.as_secs()
                );
                self.reset();
            }
        }
    }

    /// Takes one share line. A refused share changes nothing, except that a complete set
    /// that rebuilds the wrong seed discards every share (which of them is wrong cannot be
    /// known).
    pub fn submit(&mut self, text: &str, now: Instant) -> Result<Submitted, ShareError> {
        self.expire(now);
        let share = Share::parse(text)?;
        let set = &self.set;
        if share.seed_id != set.seed_id {
            return Err(ShareError::OtherSeed {
                share: share.seed_id,
                expected: set.seed_id,
            });
        }
        if share.threshold != set.threshold {
            return Err(ShareError::ThresholdMismatch {
                share: share.threshold,
                expected: set.threshold,
            });
        }
        if share.index > set.shares {
            return Err(ShareError::NoSuchShare {
                index: share.index,
                shares: set.shares,
            });
        }
        if self.received.contains(&share.index) {
            return Err(ShareError::Repeated {
                index: share.index,
                received: self.received.len() as u8,
                threshold: set.threshold,
            });
        }
        let at = usize::from(share.index - 1) * SEED_LEN;
        self.values[at..at + SEED_LEN].copy_from_slice(&share.value);
        self.received.push(share.index);
        self.first_at.get_or_insert(now);
        if self.received.len() < usize::from(set.threshold) {
            return Ok(Submitted::Progress {
                received: self.received.len() as u8,
                threshold: set.threshold,
            });
        }
        let shares: Vec<Share> = self
            .received
            .iter()
            .map(|&index| {
                let at = usize::from(index - 1) * SEED_LEN;
                let mut value = [0u8; SEED_LEN];
                value.copy_from_slice(&self.values[at..at + SEED_LEN]);
                Share::from_parts(set.seed_id, set.threshold, index, value)
            })
            .collect();
        let refs: Vec<&Share> = shares.iter().collect();
        let rebuilt = combine(&refs);
        let expected = set.fingerprint.clone();
        drop(refs);
        drop(shares);
        self.reset();
        let seed = rebuilt?;
        let fingerprint = blob::fingerprint(&seed);
        if fingerprint != expected {
            return Err(ShareError::SeedMismatch {
                rebuilt: fingerprint,
                expected,
            });
        }
        Ok(Submitted::Unsealed(seed))
    }
}

/// Fuzz entry point: any bytes through the share and share-set decoders give a value or
/// an error, never a panic; what decodes re-encodes to the same value.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(share) = Share::parse(text) {
            let again = Share::parse(&share.encode()).expect("an encoded share parses");
            assert!(
                again.seed_id == share.seed_id
                    && again.threshold == share.threshold
                    && again.index == share.index
                    && again.value == share.value,
                "share codec round trip"
            );
        }
        if let Ok(set) = ShareSet::parse(text) {
            let json = serde_json::to_string(&set).expect("a share set serializes");
            assert_eq!(
                ShareSet::parse(&json).ok(),
                Some(set),
                "share set round trip"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(byte: u8) -> RootSeed {
        let mut s = RootSeed::zeroed();
        for (i, b) in s.expose_mut().iter_mut().enumerate() {
            *b = byte.wrapping_add(i as u8).wrapping_mul(31);
        }
        s
    }

    fn set_for(seed: &RootSeed, id: Uuid, k: u8, n: u8) -> ShareSet {
        ShareSet::new(id, k, n, blob::fingerprint(seed))
    }

    #[test]
    fn every_k_subset_rebuilds_and_fewer_do_not() {
        let s = seed(7);
        let id = Uuid::new_v4();
        let shares = split(&s, id, 3, 5).unwrap();
        assert_eq!(shares.len(), 5);
        assert_eq!(
            shares.iter().map(|s| s.index).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let got = combine(&[&shares[a], &shares[b], &shares[c]]).unwrap();
                    assert_eq!(got.expose(), s.expose());
                }
                // Two shares of a 3-of-5 split are refused, not combined into garbage.
                assert!(matches!(
                    combine(&[&shares[a], &shares[b]]),
                    Err(ShareError::Combine(_))
                ));
            }
        }
        // No single share equals the seed, and two splits of one seed differ.
        assert!(shares.iter().all(|sh| sh.value != *s.expose()));
        let again = split(&s, id, 3, 5).unwrap();
        assert!(shares.iter().zip(&again).any(|(a, b)| a.value != b.value));
    }

    #[test]
    fn split_parameters_are_bounded() {
        let s = seed(1);
        let id = Uuid::new_v4();
        for (k, n) in [
            (1, 3),
            (0, 0),
            (4, 3),
            (2, MAX_SHARES + 1),
            (MAX_SHARES + 1, MAX_SHARES + 1),
        ] {
            assert!(
                matches!(split(&s, id, k, n), Err(ShamirError::Parameters { .. })),
                "{k}-of-{n}"
            );
        }
        assert_eq!(split(&s, id, 2, 2).unwrap().len(), 2);
        assert_eq!(split(&s, id, MAX_SHARES, MAX_SHARES).unwrap().len(), 32);
    }

    #[test]
    fn share_text_round_trips_and_catches_damage() {
        let s = seed(3);
        let shares = split(&s, Uuid::new_v4(), 2, 3).unwrap();
        let line = shares[1].encode();
        assert_eq!(line.len(), 130, "{}", line.as_str());
        let back = Share::parse(&format!("  {}\n", line.as_str())).unwrap();
        assert_eq!(back.value, shares[1].value);
        assert_eq!((back.index, back.threshold), (2, 2));
        // One changed digit of the value is caught by the check.
        let mut typo = line.as_bytes().to_vec();
        let at = line.len() - 20;
        typo[at] = if typo[at] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            Share::parse(std::str::from_utf8(&typo).unwrap()).err(),
            Some(ShareError::Checksum)
        );
        for bad in [
            "",
            "custody-share/1",
            "custody-share/2:x",
            &line.replace("custody-share/1", "vault-share"),
            &format!("{}:00", line.as_str()),
            &line[..line.len() - 1],
        ] {
            assert!(
                matches!(Share::parse(bad), Err(ShareError::Malformed(_))),
                "{bad:?}"
            );
        }
        // Errors never echo the share.
        let e = Share::parse(&line[..line.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(!e.contains(&line[60..100]), "{e}");
    }

    #[test]
    fn gate_collects_refuses_and_unseals() {
        let s = seed(9);
        let id = Uuid::new_v4();
        let shares = split(&s, id, 3, 5).unwrap();
        let mut gate = ShareGate::new(set_for(&s, id, 3, 5)).unwrap();
        let t0 = Instant::now();
        let Ok(Submitted::Progress {
            received: 1,
            threshold: 3,
        }) = gate.submit(&shares[4].encode(), t0)
        else {
            panic!("first share")
        };
        // Repeated, damaged, other seed, other threshold: refused, progress unchanged.
        assert_eq!(
            gate.submit(&shares[4].encode(), t0).err(),
            Some(ShareError::Repeated {
                index: 5,
                received: 1,
                threshold: 3
            })
        );
        assert_eq!(
            gate.submit("nonsense", t0)
                .err()
                .map(|e| matches!(e, ShareError::Malformed(_))),
            Some(true)
        );
        let other = split(&s, Uuid::new_v4(), 3, 5).unwrap();
        assert!(matches!(
            gate.submit(&other[0].encode(), t0),
            Err(ShareError::OtherSeed { .. })
        ));
        let two_of = split(&s, id, 2, 5).unwrap();
        assert!(matches!(
            gate.submit(&two_of[0].encode(), t0),
            Err(ShareError::ThresholdMismatch {
                share: 2,
                expected: 3
            })
        ));
        let beyond = Share::from_parts(id, 3, 6, [1; SEED_LEN]);
        assert!(matches!(
            gate.submit(&beyond.encode(), t0),
            Err(ShareError::NoSuchShare {
                index: 6,
                shares: 5
            })
        ));
        assert_eq!(gate.progress(t0), (1, 3));
        assert!(matches!(
            gate.submit(&shares[0].encode(), t0),
            Ok(Submitted::Progress { received: 2, .. })
        ));
        match gate.submit(&shares[2].encode(), t0) {
            Ok(Submitted::Unsealed(got)) => assert_eq!(got.expose(), s.expose()),
            _ => panic!("third share should unseal"),
        }
        // The gate is empty again afterwards.
        assert_eq!(gate.progress(t0), (0, 3));
    }

    #[test]
    fn gate_refuses_a_forged_share_by_fingerprint_and_starts_again() {
        let s = seed(11);
        let id = Uuid::new_v4();
        let shares = split(&s, id, 2, 3).unwrap();
        let mut gate = ShareGate::new(set_for(&s, id, 2, 3)).unwrap();
        let t0 = Instant::now();
        // A well-formed share with a valid check but the wrong value.
        let mut value = shares[1].value;
        value[0] ^= 1;
        let forged = Share::from_parts(id, 2, 2, value);
        gate.submit(&shares[0].encode(), t0).ok().unwrap();
        match gate.submit(&forged.encode(), t0) {
            Err(ShareError::SeedMismatch { rebuilt, expected }) => {
                assert_ne!(rebuilt, expected);
                assert_eq!(expected, blob::fingerprint(&s));
            }
            _ => panic!("a forged share must not unseal"),
        }
        assert_eq!(gate.progress(t0), (0, 2));
        // A different seed's genuine shares with this seed's id: the same refusal.
        let other = seed(12);
        let theirs = split(&other, id, 2, 3).unwrap();
        gate.submit(&theirs[0].encode(), t0).ok().unwrap();
        assert!(matches!(
            gate.submit(&theirs[2].encode(), t0),
            Err(ShareError::SeedMismatch { .. })
        ));
    }

    #[test]
    fn gate_discards_progress_after_the_timeout() {
        let s = seed(13);
        let id = Uuid::new_v4();
        let shares = split(&s, id, 2, 2).unwrap();
        let mut gate = ShareGate::new(set_for(&s, id, 2, 2)).unwrap();
        let t0 = Instant::now();
        gate.submit(&shares[0].encode(), t0).ok().unwrap();
        let later = t0 + UNSEAL_PROGRESS_TIMEOUT;
        assert_eq!(gate.progress(later), (0, 2));
        assert!(matches!(
            gate.submit(&shares[1].encode(), later),
            Ok(Submitted::Progress { received: 1, .. })
        ));
    }

    #[test]
    fn share_set_file_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shares.json");
        let set = set_for(&seed(1), Uuid::new_v4(), 3, 5);
        set.write_new(&path).unwrap();
        assert!(matches!(set.write_new(&path), Err(ShamirError::Exists(_))));
        assert_eq!(ShareSet::read(&path).unwrap(), set);
        for (field, bad) in [
            ("threshold", "1"),
            ("shares", "2"),
            ("shares", "33"),
            ("fingerprint", "\"abc\""),
            ("format", "\"custody-share-set/9\""),
        ] {
            let mut v: serde_json::Value = serde_json::to_value(&set).unwrap();
            v[field] = serde_json::from_str(bad).unwrap();
            assert!(ShareSet::parse(&v.to_string()).is_err(), "{field}={bad}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ShareSet::read(&path),
            Err(ShamirError::TooOpen { .. })
        ));
    }

    #[test]
    fn share_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = seed(5);
        let shares = split(&s, Uuid::new_v4(), 2, 3).unwrap();
        let paths = write_share_files(dir.path(), &shares).unwrap();
        for (p, sh) in paths.iter().zip(&shares) {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert_eq!(read_share_file(p).unwrap().value, sh.value);
        }
        assert!(matches!(
            write_share_files(dir.path(), &shares),
            Err(ShamirError::Exists(_))
        ));
    }

    #[test]
    fn fuzz_entry_survives_mutations() {
        let s = seed(2);
        let shares = split(&s, Uuid::new_v4(), 2, 2).unwrap();
        let line = shares[0].encode();
        crate::testing::mutation_sweep(line.as_bytes(), 2000, 8, 0x5eed, fuzz_decode);
        let set = serde_json::to_string(&set_for(&s, Uuid::new_v4(), 2, 2)).unwrap();
        crate::testing::mutation_sweep(set.as_bytes(), 2000, 8, 0xfeed, fuzz_decode);
    }
}

//! The sealed seed as it rests on disk: the root seed encrypted by a seal provider, with
//! what an operator needs to recognise it and what a provider needs to open it. Pure: no
//! I/O beyond reading and writing the file.
//!
//! ```json
//! {
//!   "format": "custody-sealed-seed/1",
//!   "provider": "pkcs11",
//!   "seed_id": "5b0d…",            // names this seed; bound into the AAD
//!   "version": 1,                   // bumped when the same seed is sealed again
//!   "key_label": "custody-seed-wrap",
//!   "iv": "…",                      // 12 bytes, hex
//!   "ciphertext": "…",              // 32 bytes of seed + 16 bytes of GCM tag, hex
//!   "fingerprint": "…",             // HMAC-SHA256(seed, label), 16 bytes, hex
//!   "created_at_ms": 1795…
//! }
//! ```
//!
//! The fingerprint is a keyed hash of the seed under its own label: it tells operators
//! (and an unseal) whether two seeds are the same without saying anything about either.

use crate::kdf::{RootSeed, SEED_LEN};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use uuid::Uuid;

/// The format tag of a sealed-seed file this build reads and writes.
pub const FORMAT: &str = "custody-sealed-seed/1";
/// AES-GCM nonce length.
pub const IV_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Largest sealed-seed file read (it is a few hundred bytes).
pub const FILE_BYTES_MAX: u64 = 16 * 1024;
/// Label of the fingerprint's keyed hash.
const FINGERPRINT_LABEL: &[u8] = b"custody/seed-fingerprint/v1";

/// Why a sealed-seed file cannot be used. Never carries seed bytes.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0}")]
    Io(String),
    #[error("{path}: mode {mode:o} lets others read the sealed seed; chmod 600 it")]
    TooOpen { path: String, mode: u32 },
    #[error("{0}: already exists; refusing to overwrite a sealed seed (move it away first)")]
    Exists(String),
    #[error("{path}: not a sealed seed this build reads: {reason}")]
    Format { path: String, reason: String },
}

/// A sealed root seed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedSeed {
    pub format: String,
    pub provider: String,
    pub seed_id: Uuid,
    pub version: u32,
    pub key_label: String,
    pub iv: String,
    pub ciphertext: String,
    pub fingerprint: String,
    pub created_at_ms: u64,
}

impl SealedSeed {
    /// The additional authenticated data: binds the ciphertext to this seed id and
    /// version, so a blob cannot be passed off as another seed or an older sealing.
    pub fn aad(seed_id: Uuid, version: u32) -> Vec<u8> {
        format!("{FORMAT}|{seed_id}|{version}").into_bytes()
    }

    pub fn iv_bytes(&self) -> Result<[u8; IV_LEN], String> {
        let v = crate::hex::decode(&self.iv).ok_or("iv is not hex")?;
        v.try_into()
            .map_err(|_| format!("iv is not {IV_LEN} bytes"))
    }

    pub fn ciphertext_bytes(&self) -> Result<Vec<u8>, String> {
        let v = crate::hex::decode(&self.ciphertext).ok_or("ciphertext is not hex")?;
        if v.len() != SEED_LEN + TAG_LEN {
            return Err(format!(
                "ciphertext is {} bytes, not {}",
                v.len(),
                SEED_LEN + TAG_LEN
            ));
        }
        Ok(v)
    }

    /// Reads a sealed seed, refusing a file others can read.
    pub fn read(path: &Path) -> Result<SealedSeed, BlobError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| BlobError::Io(format!("{shown}: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(BlobError::TooOpen { path: shown, mode });
        }
        if meta.len() > FILE_BYTES_MAX {
            return Err(BlobError::Format {
                path: shown,
                reason: format!("{} bytes, more than {FILE_BYTES_MAX}", meta.len()),
            });
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| BlobError::Io(format!("{shown}: {e}")))?;
        SealedSeed::parse(&text).map_err(|reason| BlobError::Format {
            path: shown,
            reason,
        })
    }

    /// Decodes a sealed seed's text: the JSON object, the format tag, and the IV and
    /// ciphertext as hex of the right lengths. Pure; never panics (fuzzed).
    pub fn parse(text: &str) -> Result<SealedSeed, String> {
        let blob: SealedSeed = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if blob.format != FORMAT {
            return Err(format!("format {:?}, expected {FORMAT:?}", blob.format));
        }
        blob.iv_bytes()?;
        blob.ciphertext_bytes()?;
        if crate::hex::decode(&blob.fingerprint).map_or(true, |f| f.len() != 16) {
            return Err("fingerprint is not 16 bytes of hex".into());
        }
        Ok(blob)
    }

    /// Writes the sealed seed (mode 0600, flushed to disk); never overwrites a file.
    pub fn write_new(&self, path: &Path) -> Result<(), BlobError> {
        let shown = path.display().to_string();
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| BlobError::Io(format!("{shown}: {e}")))?;
        text.push('\n');
        super::write_private_new(path, text.as_bytes()).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => BlobError::Exists(shown.clone()),
            _ => BlobError::Io(format!("{shown}: {e}")),
        })
    }
}

/// The seed's fingerprint: HMAC-SHA256 keyed with the seed over a fixed label, first 16
/// bytes, hex.
pub fn fingerprint(seed: &RootSeed) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(seed.expose())
        .expect("HMAC takes a key of any length");
    mac.update(FINGERPRINT_LABEL);
    let tag = mac.finalize().into_bytes();
    crate::hex::encode(&tag[..16])
}

/// Fuzz entry point: any bytes through the sealed-seed and import-seed decoders give a
/// value or an error, never a panic. `fuzz/` and the unit tests call this.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(blob) = SealedSeed::parse(text) {
            let again = serde_json::to_string(&blob).expect("a parsed blob serialises");
            assert_eq!(SealedSeed::parse(&again).as_ref(), Ok(&blob));
        }
    }
    let _ = super::parse_import_seed(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SealedSeed {
        SealedSeed {
            format: FORMAT.into(),
            provider: "pkcs11".into(),
            seed_id: Uuid::from_u128(7),
            version: 1,
            key_label: "custody-seed-wrap".into(),
            iv: crate::hex::encode(&[1; IV_LEN]),
            ciphertext: crate::hex::encode(&[2; SEED_LEN + TAG_LEN]),
            fingerprint: "00".repeat(16),
            created_at_ms: 1,
        }
    }

    #[test]
    fn writes_0600_reads_back_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealed.json");
        sample().write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(SealedSeed::read(&path).unwrap(), sample());
        assert!(matches!(
            sample().write_new(&path),
            Err(BlobError::Exists(_))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            SealedSeed::read(&path),
            Err(BlobError::TooOpen { .. })
        ));
    }

    #[test]
    fn unknown_formats_and_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealed.json");
        let mut other = sample();
        other.format = "custody-sealed-seed/9".into();
        other.write_new(&path).unwrap();
        let e = SealedSeed::read(&path).unwrap_err();
        assert!(e.to_string().contains("custody-sealed-seed/9"), "{e}");
        let text = serde_json::to_string(&sample())
            .unwrap()
            .replace("\"version\"", "\"extra\":1,\"version\"");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            SealedSeed::read(&path),
            Err(BlobError::Format { .. })
        ));
    }

    #[test]
    fn lengths_and_hex_are_checked() {
        let mut b = sample();
        assert!(b.iv_bytes().is_ok() && b.ciphertext_bytes().is_ok());
        b.iv = "zz".repeat(IV_LEN);
        assert!(b.iv_bytes().is_err());
        assert_eq!(crate::hex::decode("+a"), None, "a sign is not a hex digit");
        b.ciphertext = "00".repeat(SEED_LEN);
        assert!(b.ciphertext_bytes().unwrap_err().contains("not 48"));
    }

    #[test]
    fn the_fingerprint_is_keyed_and_stable() {
        let a = RootSeed::from_bytes([1; SEED_LEN]);
        let b = RootSeed::from_bytes([2; SEED_LEN]);
        assert_eq!(
            fingerprint(&a),
            fingerprint(&RootSeed::from_bytes([1; SEED_LEN]))
        );
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 32);
        assert!(!fingerprint(&a).contains(&crate::hex::encode(&[1; 4])));
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        // A deterministic sweep standing in for the fuzzer on every test run.
        let valid = serde_json::to_string(&sample()).unwrap().into_bytes();
        crate::testing::mutation_sweep(&valid, 5_000, 5, 0x2545f4914f6cdd1d, fuzz_decode);
        fuzz_decode(&valid);
        assert!(SealedSeed::parse(std::str::from_utf8(&valid).unwrap()).is_ok());
    }

    #[test]
    fn aad_binds_id_and_version() {
        let id = Uuid::from_u128(1);
        assert_ne!(SealedSeed::aad(id, 1), SealedSeed::aad(id, 2));
        assert_ne!(
            SealedSeed::aad(id, 1),
            SealedSeed::aad(Uuid::from_u128(2), 1)
        );
    }
}

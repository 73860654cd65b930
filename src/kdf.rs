//! Key derivation: NIST SP 800-108r1 KBKDF in counter mode with HMAC-SHA256 (pure code).
//!
//! ```text
//! key     = HMAC-SHA256(root_seed, 0x00000001 ‖ Label ‖ 0x00 ‖ Context ‖ 0x00000100)
//! Label   = "custody/derive/v1"
//! Context = asset_id (16, RFC 4122 order) ‖ counter (u64 BE) ‖ depth (u8) ‖ index[i] (u32 BE)
//! ```
//!
//! This is exactly OpenSSL 3's `openssl kdf -kdfopt mac:HMAC -kdfopt digest:SHA2-256 …
//! KBKDF` with the label as salt and the context as info; `docs/derivation.md` has
//! known-answer vectors and the command line. The HMAC is keyed once per seed
//! ([`DerivationKey::new`]): the two SHA-256 states after absorbing `K ⊕ ipad` and
//! `K ⊕ opad` (RFC 2104) live in locked memory. A derivation copies them into a
//! [`Scratch`], also locked, one per core, and hashes there, so no keyed state is ever
//! copied onto a stack.

use crate::locked::{LockError, Locked};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The KBKDF label of scheme v1.
pub const LABEL_V1: &[u8; 17] = b"custody/derive/v1";
/// The scheme version recorded with every derivation (a v2 would get its own label).
pub const SCHEME_V1: u8 = 1;
/// KBKDF label of the audit checkpoint key (docs/audit.md): its own label, so the key
/// that authenticates the audit log is never a derived asset key.
pub const AUDIT_LABEL_V1: &[u8; 16] = b"custody/audit/v1";
/// Root seed length.
pub const SEED_LEN: usize = 32;
/// Levels in a BIP-44 path: purpose', coin', account', change', index.
pub const PATH_DEPTH: usize = 5;
/// Bit 31 marks a hardened index.
pub const HARDENED: u32 = 0x8000_0000;

const KBKDF_COUNTER_1: [u8; 4] = 1u32.to_be_bytes();
const KBKDF_L_256: [u8; 4] = 256u32.to_be_bytes();

/// The root seed. Zeroized on drop, never printed.
pub struct RootSeed(Zeroizing<[u8; SEED_LEN]>);

impl RootSeed {
    pub fn from_bytes(bytes: [u8; SEED_LEN]) -> RootSeed {
        RootSeed(Zeroizing::new(bytes))
    }

    /// An all-zero seed to be filled in place (so the bytes are never copied out of
    /// zeroizing memory on the way in).
    pub fn zeroed() -> RootSeed {
        RootSeed(Zeroizing::new([0u8; SEED_LEN]))
    }

    pub fn expose_mut(&mut self) -> &mut [u8; SEED_LEN] {
        &mut self.0
    }

    pub fn expose(&self) -> &[u8; SEED_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for RootSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootSeed(<redacted>)")
    }
}

/// A derived key. Zeroized on drop, never printed.
pub type DerivedKey = Zeroizing<[u8; 32]>;

/// A BIP-44 style path `m/44'/c'/a'/ch'/i`: four hardened levels, then one normal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DerivationPath {
    indices: [u32; PATH_DEPTH],
}

/// Why a path is refused, with the level at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with \"m/\"")]
    MissingRoot,
    #[error("path must have exactly {PATH_DEPTH} levels after m/, found {0}")]
    WrongDepth(usize),
    #[error("level {level}: index must be decimal digits")]
    NotDecimal { level: usize },
    #[error("level {level}: index must be below 2^31")]
    IndexTooLarge { level: usize },
    #[error("level {level}: must be hardened (end with ')")]
    MustBeHardened { level: usize },
    #[error("level 5 (address index) must not be hardened")]
    LastMustBeNormal,
    #[error("level 1 (purpose) must be 44'")]
    PurposeNot44,
}

impl DerivationPath {
    /// Parses the brief's rule `^m/44'/[0-9]+'/[0-9]+'/[0-9]+'/[0-9]+$`, every index < 2^31.
    pub fn parse(text: &str) -> Result<DerivationPath, PathError> {
        let rest = text.strip_prefix("m/").ok_or(PathError::MissingRoot)?;
        // On the stack: a path is parsed for every derive request and every audited
        // derivation a reconciliation reads.
        let mut levels = [""; PATH_DEPTH];
        let mut found = 0;
        for level_text in rest.split('/') {
            if let Some(slot) = levels.get_mut(found) {
                *slot = level_text;
            }
            found += 1;
        }
        if found != PATH_DEPTH {
            return Err(PathError::WrongDepth(found));
        }
        let mut indices = [0u32; PATH_DEPTH];
        for (i, level_text) in levels.iter().enumerate() {
            let level = i + 1;
            let (digits, hardened) = match level_text.strip_suffix('\'') {
                Some(d) => (d, true),
                None => (*level_text, false),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PathError::NotDecimal { level });
            }
            let value: u64 = digits
                .bytes()
                .try_fold(0u64, |acc, b| {
                    let next = acc * 10 + u64::from(b - b'0');
                    (next < u64::from(HARDENED)).then_some(next)
                })
                .ok_or(PathError::IndexTooLarge { level })?;
            let value = value as u32;
            if level < PATH_DEPTH && !hardened {
                return Err(PathError::MustBeHardened { level });
            }
            if level == PATH_DEPTH && hardened {
                return Err(PathError::LastMustBeNormal);
            }
            indices[i] = if hardened { value | HARDENED } else { value };
        }
        if indices[0] != 44 | HARDENED {
            return Err(PathError::PurposeNot44);
        }
        Ok(DerivationPath { indices })
    }

    pub fn indices(&self) -> &[u32; PATH_DEPTH] {
        &self.indices
    }
}

/// The longest canonical text of a path: "m" and five "/2147483647'"-like levels (the
/// audit encoding gives it a one-byte length).
pub const PATH_TEXT_MAX: usize = 1 + PATH_DEPTH * 12;
const _: () = assert!(PATH_TEXT_MAX <= 255);
// Every canonical path is accepted on the wire.
const _: () = assert!(PATH_TEXT_MAX <= crate::bounds::PATH_TEXT_BYTES_MAX);

impl DerivationPath {
    /// Appends the canonical text (see `Display`) to `out` without allocating: the audit
    /// chain encodes it for every record, in the shard and in every reconciliation.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        out.push(b'm');
        for index in self.indices {
            out.push(b'/');
            let mut digits = [0u8; 10];
            let mut n = index & !HARDENED;
            let mut at = digits.len();
            loop {
                at -= 1;
                digits[at] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            out.extend_from_slice(&digits[at..]);
            if index & HARDENED != 0 {
                out.push(b'\'');
            }
        }
    }
}

impl std::fmt::Display for DerivationPath {
    /// The canonical text (no leading zeros): what the audit log records.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("m")?;
        for index in self.indices {
            if index & HARDENED != 0 {
                write!(f, "/{}'", index & !HARDENED)?;
            } else {
                write!(f, "/{index}")?;
            }
        }
        Ok(())
    }
}

/// The KBKDF context for one derivation (RFC 4122 asset bytes, BE counter, depth, indices).
pub fn context_v1(
    asset: &Uuid,
    counter: u64,
    path: &DerivationPath,
) -> [u8; 16 + 8 + 1 + 4 * PATH_DEPTH] {
    let mut ctx = [0u8; 16 + 8 + 1 + 4 * PATH_DEPTH];
    ctx[..16].copy_from_slice(asset.as_bytes());
    ctx[16..24].copy_from_slice(&counter.to_be_bytes());
    ctx[24] = PATH_DEPTH as u8;
    for (i, index) in path.indices.iter().enumerate() {
        ctx[25 + 4 * i..29 + 4 * i].copy_from_slice(&index.to_be_bytes());
    }
    ctx
}

/// HMAC-SHA256's two keyed states: SHA-256 after absorbing `K ⊕ ipad`, and after
/// absorbing `K ⊕ opad` (the key is 32 bytes, under the 64-byte block, so it is only
/// padded with zeros).
#[derive(Clone)]
struct KeyedStates {
    inner: Sha256,
    outer: Sha256,
}

// SAFETY: `Sha256` (digest's `CoreWrapper` of the SHA-256 core) is integers and byte
// arrays: the chaining state, the block count and the block buffer; no heap, no drop
// glue (`Locked::new` asserts that), all-zero bytes a valid value, alignment of a u64.
unsafe impl crate::locked::Plain for KeyedStates {}

const HMAC_BLOCK: usize = 64;

/// Copies the bytes of `from` over `to` without a temporary (neither is dropped: both
/// are plain data).
fn copy_states(from: &Sha256, to: &mut Sha256) {
    // SAFETY: both are valid, aligned, distinct `Sha256` values; `Sha256` is plain data
    // (see `KeyedStates`), so a bitwise copy is a valid value and nothing leaks or is
    // dropped twice.
    unsafe { std::ptr::copy_nonoverlapping(from as *const Sha256, to as *mut Sha256, 1) };
}

/// HMAC-SHA256 keyed with the root seed, ready to derive. Keyed once per seed. The keyed
/// states are as sensitive as the seed: they live in locked, undumpable memory that is
/// zeroized when the key is dropped ([`Locked`]).
pub struct DerivationKey {
    keyed: Locked<KeyedStates>,
    /// HMAC-SHA256 keyed with the audit checkpoint key (KBKDF of the seed with
    /// [`AUDIT_LABEL_V1`]), locked like the seed's.
    audit: Locked<KeyedStates>,
}

/// Working memory for derivations, locked like the key: one per core (the appliance's
/// [`crate::seal::cache::CoreKey`] holds one). Between derivations it holds no keyed
/// state: both chaining states are reset to SHA-256's initial one (the block buffers keep
/// the last padded block: the context, or the inner hash).
pub struct Scratch(Locked<KeyedStates>);

impl Scratch {
    pub fn new() -> Result<Scratch, LockError> {
        Ok(Scratch(Locked::new(KeyedStates {
            inner: Sha256::new(),
            outer: Sha256::new(),
        })?))
    }
}

impl DerivationKey {
    /// Keys the HMAC with `seed` (and the audit checkpoint HMAC with the seed's audit
    /// key); fails only if memory cannot be locked.
    pub fn new(seed: &RootSeed) -> Result<DerivationKey, LockError> {
        let keyed = keyed_states(seed.expose())?;
        let audit_key = audit_key_with(&keyed);
        let audit = keyed_states(&audit_key)?;
        Ok(DerivationKey { keyed, audit })
    }

    /// The MAC of an audit checkpoint: HMAC-SHA256 under the audit key of the shard's
    /// last sequence number and record hash ([`crate::checkpoint::message`]).
    pub fn checkpoint_mac(&self, shard: u16, seq: u64, hash: &[u8; 32]) -> [u8; 32] {
        let mut work = KeyedStates {
            inner: Sha256::new(),
            outer: Sha256::new(),
        };
        let mac = self.checkpoint_mac_with(&mut work, shard, seq, hash);
        crate::locked::wipe(&mut work);
        mac
    }

    /// [`DerivationKey::checkpoint_mac`] in a locked scratch (the appliance's path).
    pub fn checkpoint_mac_in(
        &self,
        scratch: &mut Scratch,
        shard: u16,
        seq: u64,
        hash: &[u8; 32],
    ) -> [u8; 32] {
        self.checkpoint_mac_with(&mut scratch.0, shard, seq, hash)
    }

    fn checkpoint_mac_with(
        &self,
        work: &mut KeyedStates,
        shard: u16,
        seq: u64,
        hash: &[u8; 32],
    ) -> [u8; 32] {
        let mut inner = Zeroizing::new([0u8; 32]);
        copy_states(&self.audit.inner, &mut work.inner);
        work.inner
            .update(crate::checkpoint::message(shard, seq, hash));
        work.inner.finalize_into_reset((&mut inner[..]).into());
        let mut mac = [0u8; 32];
        copy_states(&self.audit.outer, &mut work.outer);
        work.outer.update(&inner[..]);
        work.outer.finalize_into_reset((&mut mac[..]).into());
        mac
    }

    /// Derives the v1 key of `asset` at `counter` and `path`, hashing in `scratch` (the
    /// appliance's path: the core's locked scratch).
    pub fn derive_in(
        &self,
        scratch: &mut Scratch,
        asset: &Uuid,
        counter: u64,
        path: &DerivationPath,
    ) -> DerivedKey {
        self.derive_with(&mut scratch.0, asset, counter, path)
    }

    /// Derives with a scratch on the stack, wiped afterwards: for one-off derivations
    /// (`custody recover`, tests, benches). The appliance uses [`DerivationKey::derive_in`].
    pub fn derive(&self, asset: &Uuid, counter: u64, path: &DerivationPath) -> DerivedKey {
        let mut work = KeyedStates {
            inner: Sha256::new(),
            outer: Sha256::new(),
        };
        let key = self.derive_with(&mut work, asset, counter, path);
        crate::locked::wipe(&mut work);
        key
    }

    fn derive_with(
        &self,
        work: &mut KeyedStates,
        asset: &Uuid,
        counter: u64,
        path: &DerivationPath,
    ) -> DerivedKey {
        let mut inner = Zeroizing::new([0u8; 32]);
        copy_states(&self.keyed.inner, &mut work.inner);
        work.inner.update(KBKDF_COUNTER_1);
        work.inner.update(LABEL_V1);
        work.inner.update([0x00]);
        work.inner.update(context_v1(asset, counter, path));
        work.inner.update(KBKDF_L_256);
        work.inner.finalize_into_reset((&mut inner[..]).into());
        let mut key = Zeroizing::new([0u8; 32]);
        copy_states(&self.keyed.outer, &mut work.outer);
        work.outer.update(&inner[..]);
        work.outer.finalize_into_reset((&mut key[..]).into());
        key
    }
}

/// HMAC-SHA256's keyed states for a 32-byte key, in locked memory.
fn keyed_states(key: &[u8; 32]) -> Result<Locked<KeyedStates>, LockError> {
    let mut keyed = Locked::new(KeyedStates {
        inner: Sha256::new(),
        outer: Sha256::new(),
    })?;
    let mut block = Zeroizing::new([0u8; HMAC_BLOCK]);
    block[..key.len()].copy_from_slice(key);
    block.iter_mut().for_each(|b| *b ^= 0x36);
    keyed.inner.update(&block[..]);
    block.iter_mut().for_each(|b| *b ^= 0x36 ^ 0x5c);
    keyed.outer.update(&block[..]);
    Ok(keyed)
}

/// The audit checkpoint key: KBKDF (one block, as [`DerivationKey::derive`]) of the seed
/// with [`AUDIT_LABEL_V1`] and an empty context.
fn audit_key_with(keyed: &KeyedStates) -> Zeroizing<[u8; 32]> {
    let mut work = keyed.clone();
    let mut inner = Zeroizing::new([0u8; 32]);
    work.inner.update(KBKDF_COUNTER_1);
    work.inner.update(AUDIT_LABEL_V1);
    work.inner.update([0x00]);
    work.inner.update(KBKDF_L_256);
    work.inner.finalize_into_reset((&mut inner[..]).into());
    let mut key = Zeroizing::new([0u8; 32]);
    work.outer.update(&inner[..]);
    work.outer.finalize_into_reset((&mut key[..]).into());
    crate::locked::wipe(&mut work);
    key
}

/// The audit checkpoint key of `seed` (for an offline verifier: `custody reconcile
/// --offline`, the tests). Treat it as a secret: with it, checkpoints can be forged.
pub fn audit_key(seed: &RootSeed) -> Result<Zeroizing<[u8; 32]>, LockError> {
    let keyed = keyed_states(seed.expose())?;
    Ok(audit_key_with(&keyed))
}

impl std::fmt::Debug for DerivationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DerivationKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    fn seed() -> RootSeed {
        let mut s = [0u8; 32];
        for (i, b) in s.iter_mut().enumerate() {
            *b = i as u8;
        }
        RootSeed::from_bytes(s)
    }

    #[test]
    fn brief_example_path() {
        let p = DerivationPath::parse("m/44'/0'/0'/0'/7").unwrap();
        assert_eq!(
            p.indices(),
            &[0x8000002C, 0x80000000, 0x80000000, 0x80000000, 0x00000007]
        );
        assert_eq!(p.to_string(), "m/44'/0'/0'/0'/7");
    }

    #[test]
    fn the_canonical_text_written_in_place_is_the_displayed_text() {
        // Every digit count at every level: 0, 9, 10, 99, 100, ... 10^9, 2^31 - 1.
        let mut edges = vec![0u32, HARDENED - 1];
        let mut p10 = 1u32;
        while p10 <= 1_000_000_000 {
            edges.extend([p10 - 1, p10]);
            p10 = p10.saturating_mul(10);
        }
        let mut texts = Vec::new();
        for &e in &edges {
            texts.push(format!("m/44'/{e}'/0'/0'/0"));
            texts.push(format!("m/44'/0'/{e}'/0'/0"));
            texts.push(format!("m/44'/0'/0'/{e}'/0"));
            texts.push(format!("m/44'/0'/0'/0'/{e}"));
            texts.push(format!("m/44'/{e}'/{e}'/{e}'/{e}"));
        }
        for text in &texts {
            let p = DerivationPath::parse(text).unwrap();
            let mut out = vec![0xAA];
            p.write_canonical(&mut out);
            assert_eq!(&out[1..], text.as_bytes());
            assert_eq!(&p.to_string(), text);
            assert!(out.len() - 1 <= PATH_TEXT_MAX);
        }
    }

    #[test]
    fn paths_refused_with_the_level_at_fault() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("", MissingRoot),
            ("m", MissingRoot),
            ("m/", WrongDepth(1)),
            ("m//", WrongDepth(2)),
            ("m/44'/0'/0'/0'/7/", WrongDepth(6)),
            ("m/44'/0'/0'/0'/7///", WrongDepth(8)),
            ("44'/0'/0'/0'/7", MissingRoot),
            ("m/44'/0'/0'/0'", WrongDepth(4)),
            ("m/44'/0'/0'/0'/7/1", WrongDepth(6)),
            ("m/44'/0'/0'/0'/7/", WrongDepth(6)),
            ("m/44'/x'/0'/0'/7", NotDecimal { level: 2 }),
            ("m/44'/'/0'/0'/7", NotDecimal { level: 2 }),
            ("m/44'/-1'/0'/0'/7", NotDecimal { level: 2 }),
            ("m/44'/+1'/0'/0'/7", NotDecimal { level: 2 }),
            ("m/44'/0'/0'/0'/2147483648", IndexTooLarge { level: 5 }),
            (
                "m/44'/99999999999999999999999'/0'/0'/1",
                IndexTooLarge { level: 2 },
            ),
            ("m/44'/0/0'/0'/7", MustBeHardened { level: 2 }),
            ("m/44'/0'/0'/0'/7'", LastMustBeNormal),
            ("m/45'/0'/0'/0'/7", PurposeNot44),
            ("m/44/0'/0'/0'/7", MustBeHardened { level: 1 }),
            ("m/44''/0'/0'/0'/7", NotDecimal { level: 1 }),
        ];
        for (text, err) in cases {
            assert_eq!(DerivationPath::parse(text).as_ref(), Err(err), "{text}");
        }
        let max = DerivationPath::parse("m/44'/2147483647'/0'/0'/2147483647").unwrap();
        assert_eq!(max.indices()[1], u32::MAX);
        assert_eq!(max.indices()[4], 0x7fff_ffff);
    }

    #[test]
    fn leading_zeros_canonicalize() {
        let p = DerivationPath::parse("m/44'/000'/0'/0'/007").unwrap();
        assert_eq!(p.to_string(), "m/44'/0'/0'/0'/7");
    }

    #[test]
    fn keyed_once_equals_keyed_each_time() {
        let key = DerivationKey::new(&seed()).unwrap();
        let asset = Uuid::parse_str("6ba7b810-9dad-11d1-80b4-00c04fd430c8").unwrap();
        let path = DerivationPath::parse("m/44'/60'/1'/0'/3").unwrap();
        let mut fresh = <Hmac<Sha256> as Mac>::new_from_slice(seed().expose()).unwrap();
        let mut input = Vec::new();
        input.extend_from_slice(&[0, 0, 0, 1]);
        input.extend_from_slice(b"custody/derive/v1");
        input.push(0);
        input.extend_from_slice(asset.as_bytes());
        input.extend_from_slice(&5u64.to_be_bytes());
        input.push(5);
        for i in path.indices() {
            input.extend_from_slice(&i.to_be_bytes());
        }
        input.extend_from_slice(&[0, 0, 1, 0]);
        fresh.update(&input);
        let expected: [u8; 32] = fresh.finalize().into_bytes().into();
        assert_eq!(*key.derive(&asset, 5, &path), expected);
        // The same inputs again give the same key; any input changed gives another.
        assert_eq!(key.derive(&asset, 5, &path), key.derive(&asset, 5, &path));
        assert_ne!(key.derive(&asset, 5, &path), key.derive(&asset, 6, &path));
        let other_asset = Uuid::from_bytes([1; 16]);
        assert_ne!(
            key.derive(&asset, 5, &path),
            key.derive(&other_asset, 5, &path)
        );
    }

    #[test]
    fn the_core_scratch_derives_the_same_and_keeps_no_key_between_derivations() {
        let key = DerivationKey::new(&seed()).unwrap();
        let mut scratch = Scratch::new().unwrap();
        let asset = Uuid::from_bytes([7; 16]);
        let path = DerivationPath::parse("m/44'/0'/0'/0'/9").unwrap();
        for counter in [0, 1, u64::MAX] {
            assert_eq!(
                key.derive_in(&mut scratch, &asset, counter, &path),
                key.derive(&asset, counter, &path)
            );
        }
        // Both working states are back at SHA-256's initial state: hashing nothing more
        // gives SHA-256 of the empty string, not anything keyed.
        let empty: [u8; 32] = Sha256::new().finalize().into();
        let inner: [u8; 32] = scratch.0.inner.clone().finalize().into();
        let outer: [u8; 32] = scratch.0.outer.clone().finalize().into();
        assert_eq!((inner, outer), (empty, empty));
    }

    #[test]
    fn errata_flaw_1_is_not_repeated() {
        // The article fed path ‖ decimal(counter): ".../12" with counter 3 collided with
        // ".../1" with counter 23. The fixed-layout context keeps them apart.
        let key = DerivationKey::new(&seed()).unwrap();
        let asset = Uuid::from_bytes([2; 16]);
        let a = DerivationPath::parse("m/44'/0'/0'/0'/12").unwrap();
        let b = DerivationPath::parse("m/44'/0'/0'/0'/1").unwrap();
        assert_ne!(key.derive(&asset, 3, &a), key.derive(&asset, 23, &b));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = seed();
        assert_eq!(format!("{s:?}"), "RootSeed(<redacted>)");
        assert_eq!(
            format!("{:?}", DerivationKey::new(&s).unwrap()),
            "DerivationKey(<redacted>)"
        );
    }
}

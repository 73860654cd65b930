//! The `pkcs11` seal provider: the root seed sealed with AES-256-GCM by a key that never
//! leaves the HSM.
//!
//! The wrapping key is an AES-256 secret key on the token, found by its label; it must
//! be sensitive and non-extractable (a key that could leave the token is refused). The
//! seed is encrypted and decrypted on the token (`CKM_AES_GCM`, 96-bit IV from the
//! token's generator, 128-bit tag) with AAD that binds the seed id and the sealing's
//! version ([`SealedSeed::aad`]); the fingerprint in the sealed file is checked after
//! every unseal. The PIN is read when it is needed (from a file, an environment variable
//! or a systemd credential) and is never kept.
//!
//! PKCS#11 initialisation is process-global and a session is bound to its thread: an
//! [`Hsm`] lives on the thread that opened it.

use super::blob::{self, SealedSeed, IV_LEN, TAG_LEN};
use super::SealError;
use crate::config::{PinSource, Pkcs11Config};
use crate::kdf::{RootSeed, SEED_LEN};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::path::PathBuf;
use uuid::Uuid;
use zeroize::Zeroize;

/// Reads the PIN from where `source` says (it is never kept).
fn read_pin(source: &PinSource) -> Result<AuthPin, SealError> {
    let pin_err = |what: String| SealError::Hsm(format!("PIN: {what}"));
    let mut text = match source {
        PinSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| pin_err(format!("cannot read {}: {e}", path.display())))?,
        PinSource::Env(var) => std::env::var(var)
            .map_err(|_| pin_err(format!("environment variable {var} is not set")))?,
        PinSource::Credential(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    pin_err(format!(
                        "credential {name:?}: CREDENTIALS_DIRECTORY is not set (is the unit's LoadCredential= in place?)"
                    ))
                })?;
            let path = PathBuf::from(dir).join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| pin_err(format!("cannot read {}: {e}", path.display())))?
        }
    };
    let pin = text.trim_end_matches(['\r', '\n']).to_owned();
    text.zeroize();
    if pin.is_empty() {
        return Err(pin_err("empty".into()));
    }
    Ok(AuthPin::from(pin))
}

/// A logged-in session on the token. Lives on the thread that opened it.
pub struct Hsm {
    session: Session,
    token_label: String,
}

fn hsm_err(what: &str, e: CkError) -> SealError {
    SealError::Hsm(format!("{what}: {e}"))
}

impl Hsm {
    /// Loads the module and initialises it (once per process: an already initialised
    /// module is fine).
    pub fn load(config: &Pkcs11Config) -> Result<Pkcs11, SealError> {
        let module = &config.module;
        let ctx = Pkcs11::new(module).map_err(|e| {
            SealError::Hsm(format!(
                "cannot load the PKCS#11 module {}: {e} (seal.pkcs11_module)",
                module.display()
            ))
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
            Err(e) => Err(hsm_err("C_Initialize", e)),
        }
    }

    /// Loads the module, finds the token by label and logs in as its user.
    pub fn open(config: &Pkcs11Config) -> Result<Hsm, SealError> {
        Hsm::open_with(&Hsm::load(config)?, config)
    }

    /// Finds the token by label in a loaded module and logs in as its user.
    pub fn open_with(ctx: &Pkcs11, config: &Pkcs11Config) -> Result<Hsm, SealError> {
        let module = &config.module;
        let mut found = Vec::new();
        let mut labels = Vec::new();
        for slot in ctx
            .get_slots_with_token()
            .map_err(|e| hsm_err("listing slots", e))?
        {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| hsm_err("reading token info", e))?;
            let label = info.label().trim_end().to_owned();
            if label == config.token_label {
                found.push(slot);
            }
            labels.push(label);
        }
        let slot = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(SealError::Hsm(format!(
                    "no token labelled {:?} in {} (tokens present: {labels:?}; seal.pkcs11_token_label)",
                    config.token_label,
                    module.display()
                )))
            }
            more => {
                return Err(SealError::Hsm(format!(
                    "{} tokens labelled {:?} in {}; the label must name one",
                    more.len(),
                    config.token_label,
                    module.display()
                )))
            }
        };
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| hsm_err("opening a session", e))?;
        let pin = read_pin(&config.pin)?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(SealError::Hsm(format!(
                    "token {:?} refused the PIN (wrong PIN; repeated failures may lock the token)",
                    config.token_label
                )))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(SealError::Hsm(format!(
                    "token {:?}: the user PIN is locked; the security officer must reset it",
                    config.token_label
                )))
            }
            Err(e) => return Err(hsm_err("login", e)),
        }
        Ok(Hsm {
            session,
            token_label: config.token_label.clone(),
        })
    }

    /// `len` bytes from the token's random generator.
    fn random(&self, len: usize) -> Result<Vec<u8>, SealError> {
        let v = self
            .session
            .generate_random_vec(len as u32)
            .map_err(|e| hsm_err("C_GenerateRandom", e))?;
        if v.len() != len {
            return Err(SealError::Hsm(format!(
                "C_GenerateRandom gave {} bytes, asked for {len}",
                v.len()
            )));
        }
        Ok(v)
    }

    /// A new root seed from the token's generator.
    pub fn generate_seed(&self) -> Result<RootSeed, SealError> {
        let mut bytes = self.random(SEED_LEN)?;
        let mut seed = RootSeed::zeroed();
        seed.expose_mut().copy_from_slice(&bytes);
        bytes.zeroize();
        Ok(seed)
    }

    fn find(&self, label: &str) -> Result<Vec<ObjectHandle>, SealError> {
        self.session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| hsm_err("C_FindObjects", e))
    }

    /// The wrapping key: exactly one AES-256 secret key with this label, sensitive and
    /// never extractable.
    pub fn wrapping_key(&self, label: &str) -> Result<ObjectHandle, SealError> {
        let keys = self.find(label)?;
        let key = match keys.as_slice() {
            [] => {
                return Err(SealError::Hsm(format!(
                    "no secret key labelled {label:?} on token {:?} (seal.pkcs11_key_label; make it with appliance/softhsm2-provision.sh or `custody init --create-key`)",
                    self.token_label
                )))
            }
            [one] => *one,
            more => {
                return Err(SealError::Hsm(format!(
                    "{} secret keys labelled {label:?} on token {:?}; the label must name one",
                    more.len(),
                    self.token_label
                )))
            }
        };
        let attrs = self
            .session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| hsm_err("reading the key's attributes", e))?;
        let mut problems = Vec::new();
        for a in &attrs {
            match a {
                Attribute::KeyType(t) if *t != KeyType::AES => problems.push("not an AES key"),
                Attribute::ValueLen(n) if u64::from(*n) != 32 => problems.push("not 256 bits long"),
                Attribute::Sensitive(false) => problems.push("not sensitive"),
                Attribute::Extractable(true) => problems.push("extractable"),
                _ => {}
            }
        }
        if !problems.is_empty() {
            return Err(SealError::Hsm(format!(
                "key {label:?} on token {:?} cannot seal the root seed: it is {}",
                self.token_label,
                problems.join(", ")
            )));
        }
        Ok(key)
    }

    /// Makes the wrapping key on the token: AES-256, sensitive, never extractable, for
    /// encryption and decryption only. Refuses if a key with the label exists.
    pub fn create_wrapping_key(&self, label: &str) -> Result<ObjectHandle, SealError> {
        if !self.find(label)?.is_empty() {
            return Err(SealError::Hsm(format!(
                "token {:?} already has a key labelled {label:?}; use it (leave out --create-key) or pick another label",
                self.token_label
            )));
        }
        self.session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .map_err(|e| hsm_err("creating the wrapping key", e))
    }

    /// Seals `seed` under the key labelled `key_label`.
    pub fn seal(
        &self,
        key_label: &str,
        seed: &RootSeed,
        seed_id: Uuid,
        version: u32,
    ) -> Result<SealedSeed, SealError> {
        let key = self.wrapping_key(key_label)?;
        let mut iv: [u8; IV_LEN] = self
            .random(IV_LEN)?
            .try_into()
            .map_err(|_| SealError::Hsm("IV of the wrong length".into()))?;
        let stored_iv = iv;
        let aad = SealedSeed::aad(seed_id, version);
        let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())
            .map_err(|e| hsm_err("GCM parameters", e))?;
        let ciphertext = self
            .session
            .encrypt(&Mechanism::AesGcm(params), key, seed.expose())
            .map_err(|e| hsm_err("sealing the seed (C_Encrypt, AES-GCM)", e))?;
        if ciphertext.len() != SEED_LEN + TAG_LEN {
            return Err(SealError::Hsm(format!(
                "AES-GCM gave {} bytes, expected {}",
                ciphertext.len(),
                SEED_LEN + TAG_LEN
            )));
        }
        Ok(SealedSeed {
            format: blob::FORMAT.into(),
            provider: "pkcs11".into(),
            seed_id,
            version,
            key_label: key_label.to_owned(),
            iv: crate::hex::encode(&stored_iv),
            ciphertext: crate::hex::encode(&ciphertext),
            fingerprint: blob::fingerprint(seed),
            created_at_ms: crate::audit::now_ms(),
        })
    }

    /// Opens a sealed seed with the key labelled `key_label` and checks its fingerprint.
    pub fn unseal(&self, key_label: &str, sealed: &SealedSeed) -> Result<RootSeed, SealError> {
        let corrupt = |why: String| SealError::Sealed(why);
        if sealed.provider != "pkcs11" {
            return Err(corrupt(format!(
                "the sealed seed was made by the {:?} provider, not pkcs11",
                sealed.provider
            )));
        }
        let key = self.wrapping_key(key_label)?;
        if sealed.key_label != key_label {
            return Err(corrupt(format!(
                "the sealed seed was sealed by key {:?}, but seal.pkcs11_key_label is {key_label:?}",
                sealed.key_label
            )));
        }
        let mut iv = sealed.iv_bytes().map_err(corrupt)?;
        let ciphertext = sealed.ciphertext_bytes().map_err(corrupt)?;
        let aad = SealedSeed::aad(sealed.seed_id, sealed.version);
        let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())
            .map_err(|e| hsm_err("GCM parameters", e))?;
        let mut plain = self
            .session
            .decrypt(&Mechanism::AesGcm(params), key, &ciphertext)
            .map_err(|e| match e {
                // The tag does not verify: the file (or its id or version) was altered,
                // or another key sealed it. (SoftHSM2 reports a bad GCM tag as a general
                // error, which a failing token can also give: the message says both.)
                CkError::Pkcs11(
                    RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::FunctionFailed
                    | RvError::GeneralError,
                    _,
                ) => corrupt(format!(
                    "the sealed seed does not open with key {key_label:?} on token {:?}: it was altered, or sealed by another key (or the token failed: {e})",
                    self.token_label
                )),
                other => hsm_err("unsealing the seed (C_Decrypt, AES-GCM)", other),
            })?;
        if plain.len() != SEED_LEN {
            plain.zeroize();
            return Err(corrupt("the sealed seed opened to the wrong length".into()));
        }
        let mut seed = RootSeed::zeroed();
        seed.expose_mut().copy_from_slice(&plain);
        plain.zeroize();
        if blob::fingerprint(&seed) != sealed.fingerprint {
            return Err(corrupt(format!(
                "the unsealed seed's fingerprint is not {} (the file's fingerprint was altered)",
                sealed.fingerprint
            )));
        }
        Ok(seed)
    }
}

//! `[seal]`: where the root seed comes from (a dev seed file, a seed sealed by an HSM key
//! through PKCS#11, or Shamir shares) and the seed cache's timing.

use super::resolver::{absolute, Resolver};
use super::{CacheTiming, PinSource, Pkcs11Config, SealConfig};
use std::path::Path;
use std::time::Duration;

/// The seal settings before the state directory is known.
enum SealSpec {
    Dev(String),
    Pkcs11 {
        config: Pkcs11Config,
        sealed: String,
    },
    Shamir(String),
}

/// `[seal]` as resolved: the provider and the cache timing, each if its keys resolved.
pub(super) struct SealKeys {
    spec: Option<SealSpec>,
    timing: Option<CacheTiming>,
}

impl SealKeys {
    /// The provider (its files in `state_dir`) and the timing, if every key resolved.
    pub(super) fn finish(self, state_dir: &Path) -> Option<(SealConfig, CacheTiming)> {
        let seal = match self.spec? {
            SealSpec::Dev(file) => SealConfig::Dev {
                seed_file: absolute(state_dir, &file),
            },
            SealSpec::Pkcs11 { config, sealed } => SealConfig::Pkcs11 {
                pkcs11: config,
                sealed_seed_file: absolute(state_dir, &sealed),
            },
            SealSpec::Shamir(file) => SealConfig::Shamir {
                share_set_file: absolute(state_dir, &file),
            },
        };
        Some((seal, self.timing?))
    }
}

/// `[seal]`.
pub(super) fn resolve_seal(r: &mut Resolver<'_>, base_dir: &Path) -> SealKeys {
    let provider = r.string("seal.provider");
    let dev_seed_file = r.string("seal.dev_seed_file");
    let sealed_seed_file = r.string("seal.sealed_seed_file");
    let share_set_file = r.string("seal.share_set_file");
    let timing = cache_timing(r);
    let pkcs11 = Pkcs11Keys::read(r);
    let spec = match provider.as_deref() {
        None => None,
        Some("dev") => dev_seed_file.map(SealSpec::Dev),
        Some("shamir") => match share_set_file {
            Some(f) if f.is_empty() => r.problem("seal.share_set_file", "must not be empty".into()),
            other => other.map(SealSpec::Shamir),
        },
        Some("pkcs11") => pkcs11.resolve(r, base_dir, sealed_seed_file),
        Some(other) => r.problem(
            "seal.provider",
            format!("{other:?} is not a seal provider this build has (\"pkcs11\", \"shamir\" or \"dev\")"),
        ),
    };
    SealKeys { spec, timing }
}

/// The seed cache's TTL, staleness bound, provider timeout and breaker.
fn cache_timing(r: &mut Resolver<'_>) -> Option<CacheTiming> {
    match (
        r.int("seal.cache_ttl_s", 1, 86_400),
        r.int("seal.max_stale_s", 0, 86_400),
        r.int("seal.hsm_timeout_ms", 10, 60_000),
        r.int("seal.breaker_failures", 1, 100),
        r.int("seal.breaker_open_ms", 10, 600_000),
    ) {
        (Some(ttl), Some(stale), Some(timeout), Some(failures), Some(open)) => Some(CacheTiming {
            ttl: Duration::from_secs(ttl as u64),
            hsm_timeout: Duration::from_millis(timeout as u64),
            max_stale: Duration::from_secs(stale as u64),
            breaker_failures: failures as u32,
            breaker_open: Duration::from_millis(open as u64),
        }),
        _ => None,
    }
}

/// The `seal.pkcs11_*` keys as written (read whatever the provider).
struct Pkcs11Keys {
    module: Option<String>,
    token: Option<String>,
    key: Option<String>,
    pin_file: Option<String>,
    pin_env: Option<String>,
    pin_credential: Option<String>,
}

impl Pkcs11Keys {
    fn read(r: &mut Resolver<'_>) -> Pkcs11Keys {
        Pkcs11Keys {
            module: r.string("seal.pkcs11_module"),
            token: r.string("seal.pkcs11_token_label"),
            key: r.string("seal.pkcs11_key_label"),
            pin_file: r.string("seal.pkcs11_pin_file"),
            pin_env: r.string("seal.pkcs11_pin_env"),
            pin_credential: r.string("seal.pkcs11_pin_credential"),
        }
    }

    /// The `pkcs11` provider: exactly one PIN source, and no label, module or sealed
    /// seed file empty.
    fn resolve(
        self,
        r: &mut Resolver<'_>,
        base_dir: &Path,
        sealed_seed_file: Option<String>,
    ) -> Option<SealSpec> {
        let pin = pin_source(
            r,
            base_dir,
            [self.pin_file, self.pin_env, self.pin_credential],
        );
        for (key, value) in [
            ("seal.pkcs11_token_label", &self.token),
            ("seal.pkcs11_key_label", &self.key),
            ("seal.pkcs11_module", &self.module),
            ("seal.sealed_seed_file", &sealed_seed_file),
        ] {
            if value.as_deref() == Some("") {
                r.problem::<()>(key, "must not be empty".into());
            }
        }
        match (self.module, self.token, self.key, pin, sealed_seed_file) {
            (Some(module), Some(token_label), Some(key_label), Some(pin), Some(sealed))
                if !module.is_empty()
                    && !token_label.is_empty()
                    && !key_label.is_empty()
                    && !sealed.is_empty() =>
            {
                Some(SealSpec::Pkcs11 {
                    config: Pkcs11Config {
                        module: absolute(base_dir, &module),
                        token_label,
                        key_label,
                        pin,
                    },
                    sealed,
                })
            }
            _ => None,
        }
    }
}

/// The one PIN source given of `[pkcs11_pin_file, pkcs11_pin_env, pkcs11_pin_credential]`.
fn pin_source(
    r: &mut Resolver<'_>,
    base_dir: &Path,
    [file, env, credential]: [Option<String>; 3],
) -> Option<PinSource> {
    let pins: Vec<(&'static str, String)> = [
        ("seal.pkcs11_pin_file", file),
        ("seal.pkcs11_pin_env", env),
        ("seal.pkcs11_pin_credential", credential),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v)))
    .collect();
    match pins.as_slice() {
        [("seal.pkcs11_pin_file", f)] => Some(PinSource::File(absolute(base_dir, f))),
        [("seal.pkcs11_pin_env", v)] => Some(PinSource::Env(v.clone())),
        [(_, name)] => Some(PinSource::Credential(name.clone())),
        [] => r.problem(
            "seal.pkcs11_pin_file",
            "the pkcs11 provider needs the PIN from one of pkcs11_pin_file, pkcs11_pin_env or pkcs11_pin_credential".into(),
        ),
        _ => r.problem(
            "seal.pkcs11_pin_file",
            "give the PIN one way only: pkcs11_pin_file, pkcs11_pin_env or pkcs11_pin_credential".into(),
        ),
    }
}

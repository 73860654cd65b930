//! OpenSSL 3 as the independent check of derivations: its KBKDF, asked with the label
//! and context exactly as docs/derivation.md writes them.

use custody::kdf::PATH_DEPTH;
use std::ffi::OsString;
use std::process::Command;

/// The label as the spec writes it, kept apart from `LABEL_V1` so a changed constant in
/// the code cannot also change what OpenSSL is asked.
pub const SPEC_LABEL: &[u8] = b"custody/derive/v1";
pub const CONTEXT_LEN: usize = 16 + 8 + 1 + 4 * PATH_DEPTH;

// ---------------------------------------------------------------------------------------
// the spec's context, written from docs/derivation.md rather than from src/kdf.rs

pub fn spec_context(
    asset: &[u8; 16],
    counter: u64,
    indices: &[u32; PATH_DEPTH],
) -> [u8; CONTEXT_LEN] {
    let mut ctx = Vec::with_capacity(CONTEXT_LEN);
    ctx.extend_from_slice(asset);
    ctx.extend_from_slice(&counter.to_be_bytes());
    ctx.push(PATH_DEPTH as u8);
    for index in indices {
        ctx.extend_from_slice(&index.to_be_bytes());
    }
    ctx.try_into().expect("context is 45 bytes")
}

// ---------------------------------------------------------------------------------------
// OpenSSL

/// The `openssl` binary to run, or `None` (after a notice) when there is no usable one
/// and the environment does not require it.
pub fn openssl_or_skip(part: &str) -> Option<OsString> {
    let bin = std::env::var_os("CUSTODY_OPENSSL").unwrap_or_else(|| "openssl".into());
    let shown = bin.to_string_lossy().into_owned();
    let version = match Command::new(&bin).arg("version").output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "`{shown} version` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return unavailable(part, &format!("`{shown}` not found"));
        }
        Err(e) => panic!("cannot run `{shown} version`: {e}"),
    };
    // "OpenSSL 3.0.19 27 Jan 2026 (Library: …)": KBKDF in `openssl kdf` needs 3.0 or later.
    let major = version
        .strip_prefix("OpenSSL ")
        .and_then(|rest| rest.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    match major {
        Some(major) if major >= 3 => Some(bin),
        _ => unavailable(
            part,
            &format!("`{shown}` is {version:?}, not OpenSSL 3 or later"),
        ),
    }
}

pub fn unavailable(part: &str, reason: &str) -> Option<OsString> {
    super::missing(&format!("OpenSSL 3 ({part})"), &reason);
    None
}

/// The command of docs/derivation.md, with the label from the spec.
pub fn openssl_kbkdf(openssl: &OsString, seed: &[u8], context: &[u8]) -> [u8; 32] {
    let opts = [
        "mac:HMAC".to_owned(),
        "digest:SHA2-256".to_owned(),
        format!("hexkey:{}", hex(seed)),
        format!("hexsalt:{}", hex(SPEC_LABEL)),
        format!("hexinfo:{}", hex(context)),
    ];
    let mut args = vec!["kdf".to_owned(), "-keylen".to_owned(), "32".to_owned()];
    for opt in opts {
        args.push("-kdfopt".to_owned());
        args.push(opt);
    }
    args.push("KBKDF".to_owned());
    let shown = format!("{} {}", openssl.to_string_lossy(), args.join(" "));
    let out = Command::new(openssl)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e}"));
    assert!(
        out.status.success(),
        "`{shown}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_openssl_hex(stdout.trim())
        .unwrap_or_else(|| panic!("`{shown}` printed {stdout:?}, not 32 colon-separated hex bytes"))
}

/// OpenSSL prints `85:11:3F:…:72`: exactly 32 two-digit groups.
pub fn parse_openssl_hex(text: &str) -> Option<[u8; 32]> {
    let groups: Vec<&str> = text.split(':').collect();
    if groups.len() != 32 {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, group) in key.iter_mut().zip(groups) {
        if group.len() != 2 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(group, 16).ok()?;
    }
    Some(key)
}

pub use custody::hex::encode as hex;

//! The Python client's own tests (clients/python/tests, pytest) against a development
//! appliance they start themselves, run from the README's test command. They need
//! Python 3.9+ with pytest (`.ci/run` installs it); without it they are skipped with a
//! notice, unless CUSTODY_REQUIRE_SERVICES=1.

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_python_client_passes_its_tests_against_a_real_appliance() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let has_pytest = Command::new("python3")
        .args([
            "-c",
            "import sys, pytest; sys.exit(sys.version_info < (3, 9))",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pytest {
        common::missing(
            "python3 (3.9 or later) with pytest",
            &"`python3 -c 'import pytest'` fails (pip install pytest)",
        );
        return;
    }
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_custodyd"))
        .parent()
        .unwrap()
        .to_owned();
    let out = Command::new("timeout")
        .args([
            "600",
            "python3",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests",
        ])
        .current_dir(repo.join("clients/python"))
        .env("CUSTODY_BIN_DIR", &bin_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "pytest failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

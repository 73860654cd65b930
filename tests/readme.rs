//! README.md runs as written: its two set-up commands are the ones CI runs, and every
//! fenced command block (```sh, ```python) runs, in order, in a fresh directory laid out
//! like a clone (target/, appliance/, clients/ linked in), with the development appliance
//! its first block starts kept in the background. A README that no longer runs fails here.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The set-up commands the README opens with (CI's `.ci/run` runs the same two).
const RUN_COMMAND: &str = "cargo build --release && ./target/release/custody-load demo";
const TEST_COMMAND: &str = "cargo test --workspace --release";

/// The most one block may take (the PostgreSQL comparison runs two 10 s schedules and a
/// reconciliation each).
const BLOCK_TIMEOUT_S: u32 = 300;

/// The development appliance's fixed addresses (`custodyd dev`'s defaults).
const DEV_LISTEN: &str = "127.0.0.1:7443";
const DEV_ADMIN: &str = "127.0.0.1:7480";

#[derive(Debug)]
struct Block {
    lang: String,
    text: String,
    /// The heading it is under.
    section: String,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fenced blocks and the 4-space indented ones (with the heading above each).
fn blocks(readme: &str) -> (Vec<Block>, Vec<Block>) {
    let mut fenced = Vec::new();
    let mut indented = Vec::new();
    let mut section = String::new();
    let mut lines = readme.lines().peekable();
    let mut previous_blank = true;
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_owned();
        }
        if let Some(lang) = line.strip_prefix("```") {
            let mut text = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                text.push_str(l);
                text.push('\n');
            }
            fenced.push(Block {
                lang: lang.trim().to_owned(),
                text,
                section: section.clone(),
            });
            previous_blank = false;
            continue;
        }
        if previous_blank && line.starts_with("    ") && !line.trim().is_empty() {
            let mut text = format!("{}\n", &line[4..]);
            while let Some(l) = lines.peek() {
                if !l.starts_with("    ") {
                    break;
                }
                text.push_str(&l[4..]);
                text.push('\n');
                lines.next();
            }
            indented.push(Block {
                lang: String::new(),
                text,
                section: section.clone(),
            });
        }
        previous_blank = line.trim().is_empty();
    }
    (fenced, indented)
}

/// A directory laid out like a fresh clone after `cargo build --release`.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("custody-readme-")
        .tempdir()
        .unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_custodyd"));
    // .../target/release/custodyd: link the whole target directory.
    let target = bin.parent().and_then(Path::parent).unwrap();
    std::os::unix::fs::symlink(target, dir.path().join("target")).unwrap();
    for name in ["appliance", "clients", "docs", "README.md"] {
        let from = repo().join(name);
        if from.exists() {
            std::os::unix::fs::symlink(&from, dir.path().join(name)).unwrap();
        }
    }
    dir
}

/// Runs `script` with `interpreter` in `cwd` within the block timeout; panics with its
/// output unless it exits 0.
fn run(interpreter: &[&str], script: &str, cwd: &Path, what: &str) -> String {
    let started = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.arg(BLOCK_TIMEOUT_S.to_string())
        .args(interpreter)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "README {what} failed ({}, after {:.1} s):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status,
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "README {what}: ok in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stdout
}

/// `custodyd dev` in the background, as the README starts it; stopped (and checked to
/// stop cleanly) on drop.
struct DevAppliance {
    child: Child,
    banner: String,
}

impl DevAppliance {
    fn start(line: &str, cwd: &Path) -> DevAppliance {
        for addr in [DEV_LISTEN, DEV_ADMIN] {
            assert!(
                std::net::TcpListener::bind(addr).is_ok(),
                "{addr} is taken: stop whatever listens there (a `custodyd dev` of your own?) and run the test again"
            );
        }
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!("exec {line}"))
            .current_dir(cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Killed on drop, however this start ends.
        let mut dev = DevAppliance {
            child,
            banner: String::new(),
        };
        let child = &mut dev.child;
        // The banner comes before it serves; then /readyz says when it does.
        let mut banner = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut l = String::new();
            if out.read_line(&mut l).unwrap_or(0) == 0 {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("`{line}` ended before it served:\n{banner}\n{err}");
            }
            banner.push_str(&l);
            if l.starts_with("Stop with Ctrl-C") {
                break;
            }
        }
        // Keep draining stdout so the appliance never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut BufReader::new(err), &mut std::io::sink()));
        let admin = DEV_ADMIN.parse().unwrap();
        while std::net::TcpStream::connect(admin).is_err()
            || common::http_get(admin, "/readyz").0 != 200
        {
            assert!(
                Instant::now() < deadline,
                "`{line}` was not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        dev.banner = banner;
        dev
    }

    fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SIGTERM, as Ctrl-C's SIGINT would: it drains and exits 0.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "custodyd dev did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DevAppliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the PostgreSQL server the README names answers; a notice (or a failure under
/// CUSTODY_REQUIRE_SERVICES=1) when it does not.
fn postgres_up() -> bool {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5432".parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_ok();
    if !up {
        common::missing(
            "PostgreSQL (the README's block)",
            &"nothing answers on 127.0.0.1:5432",
        );
    }
    up
}

#[test]
fn the_readme_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (fenced, indented) = blocks(&readme);

    // The two set-up commands, and nothing else indented: every other command is in a
    // fenced block this test runs.
    let setup: Vec<&str> = indented.iter().map(|b| b.text.trim()).collect();
    assert_eq!(
        setup,
        [RUN_COMMAND, TEST_COMMAND],
        "README.md's indented blocks must be exactly the two set-up commands"
    );
    assert!(indented.iter().all(|b| b.section == "Two commands"));
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.contains(TEST_COMMAND),
        ".ci/run runs the README's test command"
    );

    let dir = workspace();
    // The run command (its build half built this test's binaries): the demo, as written.
    let demo = RUN_COMMAND.split(" && ").nth(1).unwrap();
    let out = run(
        &["bash", "-euo", "pipefail"],
        demo,
        dir.path(),
        "run command",
    );
    assert!(
        out.contains("req/s"),
        "the demo prints what it achieved:\n{out}"
    );

    let mut dev: Option<DevAppliance> = None;
    let mut ran = 0;
    for (i, block) in fenced.iter().enumerate() {
        let what = format!(
            "block {} ({}, under \"{}\")",
            i + 1,
            block.lang,
            block.section
        );
        match block.lang.as_str() {
            "sh" => {
                let first = block.text.lines().next().unwrap_or("");
                if first.contains("custodyd dev") {
                    assert_eq!(
                        block.text.lines().count(),
                        1,
                        "{what}: the dev appliance's block is that one command"
                    );
                    assert!(dev.is_none(), "{what}: a second development appliance");
                    let d = DevAppliance::start(first, dir.path());
                    assert!(d.banner.contains("NOT FOR PRODUCTION"), "{}", d.banner);
                    dev = Some(d);
                } else if block.text.contains("--postgres") && !postgres_up() {
                    continue;
                } else {
                    run(
                        &["bash", "-euo", "pipefail"],
                        &block.text,
                        dir.path(),
                        &what,
                    );
                }
            }
            "python" => {
                run(&["python3", "-"], &block.text, dir.path(), &what);
            }
            "toml" | "text" | "" => continue,
            other => {
                panic!("{what}: a block in {other:?}: mark commands sh or python, other text text")
            }
        }
        ran += 1;
    }
    assert!(ran >= 4, "the README has its command blocks ({ran} ran)");
    let dev = dev.expect("the README starts a development appliance (custodyd dev)");
    let status = dev.stop();
    assert!(status.success(), "custodyd dev stopped with {status}");
}

#[test]
fn the_readme_parser_finds_fenced_and_indented_blocks() {
    let text =
        "## A\n\n    one\n    two\n\ntext\n\n```sh\nx\ny\n```\n## B\n```python\nprint(1)\n```\n";
    let (fenced, indented) = blocks(text);
    assert_eq!(indented.len(), 1);
    assert_eq!(indented[0].text, "one\ntwo\n");
    assert_eq!(fenced.len(), 2);
    assert_eq!(
        (fenced[0].lang.as_str(), fenced[0].text.as_str()),
        ("sh", "x\ny\n")
    );
    assert_eq!(fenced[1].section, "B");
}

//! The live line (once a second, unless `--json`) and the resident memory it samples:
//! the harness's own and (demo) the appliance's.

use crate::schedule::lock;
use crate::target::SharedRecorder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Resident memory seen during the run (the live line samples it every second).
#[derive(Clone, Copy, Default)]
pub struct Memory {
    pub harness_max_kib: u64,
    /// The appliance's (demo): at the first and last sample, and the largest.
    pub appliance_first_kib: Option<u64>,
    pub appliance_last_kib: Option<u64>,
    pub appliance_max_kib: u64,
}

impl Memory {
    pub fn sample(&mut self, appliance_pid: Option<u32>) {
        if let Some(kib) = rss_kib("self") {
            self.harness_max_kib = self.harness_max_kib.max(kib);
        }
        if let Some(kib) = appliance_pid.and_then(|pid| rss_kib(&pid.to_string())) {
            self.appliance_first_kib.get_or_insert(kib);
            self.appliance_last_kib = Some(kib);
            self.appliance_max_kib = self.appliance_max_kib.max(kib);
        }
    }
}

/// VmRSS of /proc/`pid`, KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Prints the live line every second (unless `json`) and samples resident memory.
pub fn spawn_reporter(
    rec: SharedRecorder,
    finished: Arc<AtomicBool>,
    memory: Arc<Mutex<Memory>>,
    start: Instant,
    json: bool,
    appliance_pid: Option<u32>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("custody-load-live".into())
        .spawn(move || {
            let mut next = start + Duration::from_secs(1);
            while !finished.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                next += Duration::from_secs(1);
                let live = lock(&rec).take_live();
                let mem = {
                    let mut m = lock(&memory);
                    m.sample(appliance_pid);
                    *m
                };
                if !json {
                    let appliance = mem
                        .appliance_last_kib
                        .map(|k| format!(", custodyd {} MiB", k / 1024))
                        .unwrap_or_default();
                    eprintln!(
                        "  {:>5.0}s  {:>6} req/s  errors {:>5}  p99 {:>7.3} ms  rss {} MiB{appliance}",
                        start.elapsed().as_secs_f64(),
                        live.ok,
                        live.errors,
                        live.p99_ms,
                        rss_kib("self").unwrap_or(0) / 1024,
                    );
                }
            }
        })
}

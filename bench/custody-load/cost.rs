//! What a run costs (issue 20): the CPU time, user and system, of the harness and of the
//! appliance (when its process is known: `demo` starts it, `run --server-pid` names it)
//! over the measured window, the appliance's context switches (every thread's, voluntary
//! and not), and the machine's idle share over the same seconds. All read from /proc at
//! the window's start and end by a thread of its own, so the figures cover the window
//! exactly whatever the load does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A process's CPU time and context switches, as /proc gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcTimes {
    /// Clock ticks (`utime`, `stime` of /proc/PID/stat: every thread, live and exited).
    pub user_ticks: u64,
    pub system_ticks: u64,
    /// Summed over /proc/PID/task/*/status (threads alive at the reading).
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

/// The machine's CPU time (/proc/stat's `cpu` line): idle (idle + iowait) and all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTimes {
    pub idle_ticks: u64,
    pub total_ticks: u64,
}

/// One reading at an instant.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    harness: Option<ProcTimes>,
    appliance: Option<ProcTimes>,
    machine: Option<MachineTimes>,
}

/// The window's cost: the difference of two readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub seconds: f64,
    pub harness_user_s: f64,
    pub harness_system_s: f64,
    /// The appliance's, when its process is known.
    pub appliance: Option<ApplianceCost>,
    /// The machine's idle share over the window (0..1).
    pub idle_share: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ApplianceCost {
    pub user_s: f64,
    pub system_s: f64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

impl Cost {
    /// Per request, for `requests` answered in the window: (harness µs, appliance µs,
    /// appliance context switches).
    pub fn per_request(&self, requests: u64) -> PerRequest {
        let n = requests.max(1) as f64;
        PerRequest {
            harness_us: (self.harness_user_s + self.harness_system_s) * 1e6 / n,
            harness_user_us: self.harness_user_s * 1e6 / n,
            harness_system_us: self.harness_system_s * 1e6 / n,
            appliance: self.appliance.map(|a| AppliancePerRequest {
                cpu_us: (a.user_s + a.system_s) * 1e6 / n,
                user_us: a.user_s * 1e6 / n,
                system_us: a.system_s * 1e6 / n,
                switches: (a.voluntary_switches + a.involuntary_switches) as f64 / n,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PerRequest {
    pub harness_us: f64,
    pub harness_user_us: f64,
    pub harness_system_us: f64,
    pub appliance: Option<AppliancePerRequest>,
}

#[derive(Clone, Copy, Debug)]
pub struct AppliancePerRequest {
    pub cpu_us: f64,
    pub user_us: f64,
    pub system_us: f64,
    pub switches: f64,
}

/// Reads the window's cost on a thread of its own: at `from`, then at `until` (or when
/// `finished` is set first). Join it for the cost (`None` if a reading failed).
pub fn spawn_sampler(
    from: Instant,
    until: Instant,
    appliance_pid: Option<u32>,
    finished: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<Option<Cost>>> {
    std::thread::Builder::new()
        .name("custody-load-cost".into())
        .spawn(move || {
            sleep_until(from, &finished);
            let start = read(appliance_pid);
            sleep_until(until, &finished);
            let end = read(appliance_pid);
            difference(&start, &end)
        })
}

/// Sleeps until `t` (in steps of at most 50 ms, so that a run that ends early is not
/// waited for).
fn sleep_until(t: Instant, finished: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= t || finished.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(50)));
    }
}

fn read(appliance_pid: Option<u32>) -> Reading {
    Reading {
        at: Instant::now(),
        harness: proc_times("self"),
        appliance: appliance_pid.and_then(|pid| proc_times(&pid.to_string())),
        machine: std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| machine_times(&s)),
    }
}

fn difference(a: &Reading, b: &Reading) -> Option<Cost> {
    let hz = ticks_per_second();
    let seconds = b.at.saturating_duration_since(a.at).as_secs_f64();
    let (ha, hb) = (a.harness?, b.harness?);
    let s = |ticks: u64| ticks as f64 / hz;
    let appliance = match (a.appliance, b.appliance) {
        (Some(x), Some(y)) => Some(ApplianceCost {
            user_s: s(y.user_ticks.saturating_sub(x.user_ticks)),
            system_s: s(y.system_ticks.saturating_sub(x.system_ticks)),
            voluntary_switches: y.voluntary_switches.saturating_sub(x.voluntary_switches),
            involuntary_switches: y
                .involuntary_switches
                .saturating_sub(x.involuntary_switches),
        }),
        _ => None,
    };
    let idle_share = match (a.machine, b.machine) {
        (Some(x), Some(y)) if y.total_ticks > x.total_ticks => Some(
            y.idle_ticks.saturating_sub(x.idle_ticks) as f64
                / (y.total_ticks - x.total_ticks) as f64,
        ),
        _ => None,
    };
    Some(Cost {
        seconds,
        harness_user_s: s(hb.user_ticks.saturating_sub(ha.user_ticks)),
        harness_system_s: s(hb.system_ticks.saturating_sub(ha.system_ticks)),
        appliance,
        idle_share,
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// /proc/`pid`'s CPU ticks and its threads' context switches.
pub fn proc_times(pid: &str) -> Option<ProcTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (user_ticks, system_ticks) = stat_ticks(&stat)?;
    let mut t = ProcTimes {
        user_ticks,
        system_ticks,
        ..ProcTimes::default()
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            let (v, n) = switches(&status);
            t.voluntary_switches += v;
            t.involuntary_switches += n;
        }
    }
    Some(t)
}

/// `utime` and `stime` (fields 14 and 15) of a /proc/PID/stat line; the command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a status file.
pub fn switches(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// The `cpu` line of /proc/stat: idle + iowait, and the sum of every field.
pub fn machine_times(stat: &str) -> Option<MachineTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest, guest_nice are in user, nice)
    let total = values.iter().take(8).sum();
    Some(MachineTimes {
        idle_ticks: values.get(3)? + values.get(4).copied().unwrap_or(0),
        total_ticks: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (custody (core) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 4 0 1 0 0";
        assert_eq!(stat_ticks(line), Some((1234, 567)));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn switches_and_machine_lines_parse() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t4\n";
        assert_eq!(switches(status), (17, 4));
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(
            machine_times(stat),
            Some(MachineTimes {
                idle_ticks: 820,
                total_ticks: 981
            })
        );
    }

    #[test]
    fn this_process_reads_and_costs_per_request() {
        let t = proc_times("self").expect("/proc/self");
        assert!(t.voluntary_switches + t.involuntary_switches > 0 || t.user_ticks > 0);
        let cost = Cost {
            seconds: 2.0,
            harness_user_s: 0.1,
            harness_system_s: 0.1,
            appliance: Some(ApplianceCost {
                user_s: 0.3,
                system_s: 0.1,
                voluntary_switches: 2_000,
                involuntary_switches: 0,
            }),
            idle_share: Some(0.5),
        };
        let p = cost.per_request(10_000);
        assert!((p.harness_us - 20.0).abs() < 1e-9);
        let a = p.appliance.unwrap();
        assert!((a.cpu_us - 40.0).abs() < 1e-9);
        assert!((a.switches - 0.2).abs() < 1e-9);
    }
}

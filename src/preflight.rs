//! Start-up checks of the host, before anything starts: each failure names what is wrong
//! and the line that fixes it, instead of an executor's error from deep inside glommio.
//!
//! - io_uring must be available to this process (every core's executor runs on it);
//! - RLIMIT_MEMLOCK must cover what the executors and the keyed state lock;
//! - the process must be allowed at least `server.cores` CPUs (thread-per-core: each
//!   executor pinned to a CPU of its own).
//!
//! The TLS files are checked when the TLS configuration is built
//! ([`crate::tls::server_config`]), the store when it is opened.

/// Why the appliance will not start on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    #[error("io_uring is not available to custodyd: {0}")]
    IoUring(String),
    #[error("RLIMIT_MEMLOCK is {have} bytes; custodyd needs at least {need} bytes to start with {cores} cores (glommio's floor, each executor's io_uring rings and the locked keyed state). Raise it: under systemd `LimitMEMLOCK={suggest}` in the unit (`systemctl edit custodyd`, section [Service]); in a shell `ulimit -l {suggest_kib}` (as root, or raise the hard limit in /etc/security/limits.conf)")]
    MemLock {
        have: u64,
        need: u64,
        cores: usize,
        suggest: String,
        suggest_kib: u64,
    },
    #[error("server.cores is {configured} but this process may run on only {allowed} CPU(s) ({cpus}): thread-per-core needs a CPU for each executor. Set server.cores = 0 (one executor per CPU allowed) or at most {allowed}, or allow more CPUs (systemd: CPUAffinity= / AllowedCPUs=; taskset; the container's CPU set)")]
    Cores {
        configured: usize,
        allowed: usize,
        cpus: String,
    },
}

/// glommio refuses to start an executor when the soft RLIMIT_MEMLOCK is below this.
pub const GLOMMIO_MEMLOCK_FLOOR_BYTES: u64 = 512 * 1024;
/// What one executor's three io_uring rings (main, latency, poll) may lock on kernels
/// that still charge rings to RLIMIT_MEMLOCK (before 5.12), at the ring depth custodyd
/// uses: the submission and completion arrays, rounded up generously.
pub const RING_MEMLOCK_BYTES_PER_CORE: u64 = 3 * 64 * 1024;
/// Locked memory the keyed state takes beyond one page per core: the derivation and audit
/// keys (twice, while a refresh swaps them), the shamir share buffer, the auditor's
/// scratch.
pub const LOCKED_SECRETS_BYTES: u64 = 128 * 1024;

/// What the executors and secrets must be able to lock for the appliance to start with
/// `cores` executors: below it an executor or the key fails.
pub fn memlock_needed(cores: usize, page: u64) -> u64 {
    let cores = cores as u64;
    let needed = cores * (RING_MEMLOCK_BYTES_PER_CORE + page) + LOCKED_SECRETS_BYTES;
    needed.max(GLOMMIO_MEMLOCK_FLOOR_BYTES)
}

/// What lets every executor also register its `io_memory` buffers with its three rings
/// (below it glommio logs a warning and runs without registered buffers, which custody,
/// doing no file I/O through glommio, does not use).
pub fn memlock_recommended(cores: usize, page: u64, io_memory: u64) -> u64 {
    memlock_needed(cores, page) + cores as u64 * 3 * io_memory
}

/// Checks `have` (the soft RLIMIT_MEMLOCK; `None`: unlimited) against what `cores`
/// executors need.
pub fn check_memlock(have: Option<u64>, cores: usize, page: u64) -> Result<(), PreflightError> {
    let need = memlock_needed(cores, page);
    match have {
        Some(have) if have < need => {
            // A round figure with room to spare: the next power of two MiB, at least 64M.
            let mib = need.div_ceil(1024 * 1024).next_power_of_two().max(64);
            Err(PreflightError::MemLock {
                have,
                need,
                cores,
                suggest: format!("{mib}M"),
                suggest_kib: mib * 1024,
            })
        }
        _ => Ok(()),
    }
}

/// The soft RLIMIT_MEMLOCK (`None`: unlimited).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(r.rlim_cur)
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// What an `io_uring_setup` failure means, and what to do about it.
pub fn io_uring_problem(errno: i32) -> String {
    match errno {
        libc::ENOSYS => "the kernel has no io_uring (io_uring_setup: ENOSYS): custodyd needs Linux 5.8 or newer built with CONFIG_IO_URING".into(),
        libc::EPERM => "io_uring_setup was refused (EPERM): io_uring is switched off for this process: check the sysctl kernel.io_uring_disabled (0 allows it; 1 allows only the group in kernel.io_uring_group), and a seccomp filter (systemd: SystemCallFilter= must keep io_uring_setup, io_uring_enter and io_uring_register; containers: the runtime's seccomp profile)".into(),
        libc::ENOMEM => "io_uring_setup failed with ENOMEM: the locked-memory limit is too low for a ring (raise RLIMIT_MEMLOCK: systemd LimitMEMLOCK=, shell ulimit -l)".into(),
        libc::EMFILE | libc::ENFILE => "io_uring_setup failed: out of file descriptors (raise LimitNOFILE=)".into(),
        e => format!(
            "io_uring_setup failed: {}",
            std::io::Error::from_raw_os_error(e)
        ),
    }
}

/// Sets up and closes a one-entry io_uring: what every executor will do.
pub fn check_io_uring() -> Result<(), PreflightError> {
    // struct io_uring_params: 120 bytes, all zero asks for the defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(entries, params) reads and writes the 120-byte params struct
    // it is given; the descriptor it returns is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(PreflightError::IoUring(io_uring_problem(errno)));
    }
    // SAFETY: closing the descriptor io_uring_setup just returned.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size is the set's.
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    if !ok {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within its size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Checks that `cores` executors each get a CPU of their own among `allowed`.
pub fn check_cores(cores: usize, allowed: &[usize]) -> Result<(), PreflightError> {
    if allowed.is_empty() || cores <= allowed.len() {
        return Ok(());
    }
    Err(PreflightError::Cores {
        configured: cores,
        allowed: allowed.len(),
        cpus: cpu_list(allowed),
    })
}

/// `0-3,6` for [0, 1, 2, 3, 6].
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Every check, in the order the start would meet them. `io_memory` is what each executor
/// registers; a limit that lets the appliance start but not register it is logged.
pub fn check_host(cores: usize, io_memory: u64) -> Result<Vec<usize>, PreflightError> {
    let allowed = allowed_cpus();
    check_cores(cores, &allowed)?;
    check_io_uring()?;
    let page = page_size();
    let have = memlock_limit();
    check_memlock(have, cores, page)?;
    let recommended = memlock_recommended(cores, page, io_memory);
    if let Some(have) = have.filter(|&h| h < recommended) {
        tracing::warn!(
            have,
            recommended,
            "RLIMIT_MEMLOCK lets custodyd start but not register each executor's I/O buffers with io_uring (glommio says so below and runs without them; custody does no file I/O through them): raise it to silence this (systemd: LimitMEMLOCK=)"
        );
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_below_the_need_names_the_need_and_the_systemd_line() {
        let page = 4096;
        let need = memlock_needed(2, page);
        assert!(need >= GLOMMIO_MEMLOCK_FLOOR_BYTES);
        assert_eq!(check_memlock(None, 2, page), Ok(()));
        assert_eq!(check_memlock(Some(need), 2, page), Ok(()));
        let e = check_memlock(Some(64 * 1024), 2, page).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("RLIMIT_MEMLOCK is 65536 bytes"), "{text}");
        assert!(text.contains(&format!("at least {need} bytes")), "{text}");
        assert!(text.contains("LimitMEMLOCK=64M"), "{text}");
        assert!(text.contains("ulimit -l 65536"), "{text}");
        // Many cores need more than the floor, and the suggestion covers it.
        let big = memlock_needed(256, page);
        assert!(big > 64 * 1024 * 1024 / 2);
        let PreflightError::MemLock { suggest_kib, .. } =
            check_memlock(Some(GLOMMIO_MEMLOCK_FLOOR_BYTES), 256, page).unwrap_err()
        else {
            panic!("not a memlock error");
        };
        assert!(suggest_kib * 1024 >= big);
        assert!(memlock_recommended(2, page, 512 * 1024) > need);
    }

    #[test]
    fn more_cores_than_allowed_cpus_is_refused_with_the_cpu_list() {
        assert_eq!(check_cores(2, &[0, 1]), Ok(()));
        assert_eq!(check_cores(1, &[3]), Ok(()));
        assert_eq!(check_cores(4, &[0, 1, 2, 6]), Ok(()));
        let text = check_cores(5, &[0, 1, 2, 6]).unwrap_err().to_string();
        assert!(text.contains("server.cores is 5"), "{text}");
        assert!(text.contains("only 4 CPU(s) (0-2,6)"), "{text}");
        assert!(text.contains("server.cores = 0"), "{text}");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn io_uring_problems_say_what_to_change() {
        assert!(io_uring_problem(libc::ENOSYS).contains("5.8"));
        assert!(io_uring_problem(libc::EPERM).contains("kernel.io_uring_disabled"));
        assert!(io_uring_problem(libc::EPERM).contains("SystemCallFilter"));
        assert!(io_uring_problem(libc::ENOMEM).contains("LimitMEMLOCK"));
        assert!(io_uring_problem(libc::EINVAL).contains("io_uring_setup failed"));
    }

    #[test]
    fn this_host_passes_the_checks_it_runs_on() {
        // The test machine runs the appliance's own tests: io_uring is there.
        check_io_uring().unwrap();
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        check_cores(allowed.len(), &allowed).unwrap();
    }
}

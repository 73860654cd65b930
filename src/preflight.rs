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
/// that still charge rings to RLIMIT_MEMLOCK (before 5.12, which the probe tells by the
/// absence of `IORING_FEAT_NATIVE_WORKERS`), at the ring depth custodyd uses: the
/// submission and completion arrays, rounded up generously.
pub const RING_MEMLOCK_BYTES_PER_CORE: u64 = 3 * 64 * 1024;
/// Locked memory the keyed state takes beyond one page per core: the derivation and audit
/// keys (twice, while a refresh swaps them), the shamir share buffer, the auditor's
/// scratch.
pub const LOCKED_SECRETS_BYTES: u64 = 128 * 1024;

/// What the executors and secrets must be able to lock for the appliance to start with
/// `cores` executors (`rings_charged`: the kernel charges io_uring rings to the limit):
/// below it an executor or the key fails.
pub fn memlock_needed(cores: usize, page: u64, rings_charged: bool) -> u64 {
    let cores = cores as u64;
    let rings = if rings_charged {
        RING_MEMLOCK_BYTES_PER_CORE
    } else {
        0
    };
    let needed = cores * (rings + page) + LOCKED_SECRETS_BYTES;
    needed.max(GLOMMIO_MEMLOCK_FLOOR_BYTES)
}

/// What lets every executor also register its `io_memory` buffers with its three rings
/// (below it glommio logs a warning and runs without registered buffers, which custody,
/// doing no file I/O through glommio, does not use).
pub fn memlock_recommended(cores: usize, page: u64, rings_charged: bool, io_memory: u64) -> u64 {
    memlock_needed(cores, page, rings_charged) + cores as u64 * 3 * io_memory
}

/// Checks `have` (the soft RLIMIT_MEMLOCK; `None`: unlimited) against what `cores`
/// executors need.
pub fn check_memlock(
    have: Option<u64>,
    cores: usize,
    page: u64,
    rings_charged: bool,
) -> Result<(), PreflightError> {
    let need = memlock_needed(cores, page, rings_charged);
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

/// The io_uring operations glommio 0.9 requires of the kernel (it exits the process when
/// one is missing): NOP, READV, WRITEV, FSYNC, READ_FIXED, WRITE_FIXED, POLL_ADD,
/// POLL_REMOVE, SENDMSG, RECVMSG, TIMEOUT, TIMEOUT_REMOVE, ACCEPT, LINK_TIMEOUT,
/// CONNECT, FALLOCATE, OPENAT, CLOSE, STATX, READ, WRITE, SEND, RECV.
const GLOMMIO_OPS: [u8; 23] = [
    0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19, 21, 22, 23, 26, 27,
];
/// `io_uring_params.features` bit: workers are native threads (Linux 5.12), and the
/// kernel charges rings to the memory cgroup instead of RLIMIT_MEMLOCK.
const IORING_FEAT_NATIVE_WORKERS: u32 = 1 << 9;
const IORING_REGISTER_PROBE: libc::c_uint = 8;
const IO_URING_OP_SUPPORTED: u16 = 1;

/// What the probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoUring {
    /// The kernel charges io_uring rings to RLIMIT_MEMLOCK (before Linux 5.12).
    pub rings_charged: bool,
}

/// Sets up a one-entry io_uring and asks it which operations it supports, as every
/// executor will: io_uring must be there, allowed (sysctl, seccomp) and recent enough
/// for glommio.
pub fn check_io_uring() -> Result<IoUring, PreflightError> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // struct io_uring_params: 120 bytes; all zero asks for the defaults. The kernel writes
    // `features` (a u32 at byte 20).
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(entries, params) reads and writes the 120-byte params struct
    // it is given; the descriptor it returns is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(PreflightError::IoUring(io_uring_problem(errno())));
    }
    let fd = fd as libc::c_int;
    let features = u32::from_ne_bytes([params[20], params[21], params[22], params[23]]);
    // struct io_uring_probe: a 16-byte header (last_op, ops_len, …) and 256 entries of
    // struct io_uring_probe_op (op, resv, flags: u16, resv2: u32), 8 bytes each.
    const OPS: usize = 256;
    let mut probe = vec![0u8; 16 + OPS * 8];
    // SAFETY: io_uring_register(fd, IORING_REGISTER_PROBE, buf, 256) writes at most the
    // header and 256 entries, which `probe` holds.
    let registered = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            fd,
            IORING_REGISTER_PROBE,
            probe.as_mut_ptr(),
            OPS as libc::c_uint,
        )
    };
    let register_errno = errno();
    // SAFETY: closing the descriptor io_uring_setup returned.
    unsafe { libc::close(fd) };
    if registered < 0 {
        let problem = match register_errno {
            libc::EINVAL => "the kernel cannot tell which io_uring operations it supports (IORING_REGISTER_PROBE: EINVAL): it is older than glommio needs; custodyd needs Linux 5.8 or newer".to_owned(),
            libc::EPERM => "io_uring_register was refused (EPERM): a seccomp filter lets io_uring_setup through but not io_uring_register (systemd: SystemCallFilter= must keep io_uring_setup, io_uring_enter and io_uring_register)".to_owned(),
            e => format!(
                "io_uring_register(IORING_REGISTER_PROBE) failed: {}",
                std::io::Error::from_raw_os_error(e)
            ),
        };
        return Err(PreflightError::IoUring(problem));
    }
    let missing: Vec<u8> = GLOMMIO_OPS
        .iter()
        .copied()
        .filter(|&op| {
            let entry = 16 + usize::from(op) * 8;
            let flags = u16::from_ne_bytes([probe[entry + 2], probe[entry + 3]]);
            op > probe[0] || flags & IO_URING_OP_SUPPORTED == 0
        })
        .collect();
    if !missing.is_empty() {
        return Err(PreflightError::IoUring(format!(
            "the kernel lacks io_uring operations glommio needs (opcodes {missing:?}): custodyd needs Linux 5.8 or newer"
        )));
    }
    Ok(IoUring {
        rings_charged: features & IORING_FEAT_NATIVE_WORKERS == 0,
    })
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

/// Lets the calling thread run on `cpus` (no-op when empty): a helper thread spawned from
/// a pinned executor inherits that executor's single CPU, and would both compete with it
/// and see one CPU where the process has many.
pub fn allow_cpus(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET adds CPUs below CPU_SETSIZE; the call
    // sets this thread's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
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
    let uring = check_io_uring()?;
    let page = crate::locked::page_size() as u64;
    let have = memlock_limit();
    check_memlock(have, cores, page, uring.rings_charged)?;
    let recommended = memlock_recommended(cores, page, uring.rings_charged, io_memory);
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
        let need = memlock_needed(2, page, true);
        assert!(need >= GLOMMIO_MEMLOCK_FLOOR_BYTES);
        assert_eq!(check_memlock(None, 2, page, true), Ok(()));
        assert_eq!(check_memlock(Some(need), 2, page, true), Ok(()));
        let e = check_memlock(Some(64 * 1024), 2, page, true).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("RLIMIT_MEMLOCK is 65536 bytes"), "{text}");
        assert!(text.contains(&format!("at least {need} bytes")), "{text}");
        assert!(text.contains("LimitMEMLOCK=64M"), "{text}");
        assert!(text.contains("ulimit -l 65536"), "{text}");
        // Where rings are charged (before 5.12), many cores need more than the floor, and
        // the suggestion covers it; where they are not, the usual 8 MiB covers 64 cores.
        let big = memlock_needed(256, page, true);
        assert!(big > 64 * 1024 * 1024 / 2);
        let PreflightError::MemLock { suggest_kib, .. } =
            check_memlock(Some(GLOMMIO_MEMLOCK_FLOOR_BYTES), 256, page, true).unwrap_err()
        else {
            panic!("not a memlock error");
        };
        assert!(suggest_kib * 1024 >= big);
        assert_eq!(check_memlock(Some(8 << 20), 64, page, false), Ok(()));
        assert_eq!(check_memlock(Some(8 << 20), 16, page, true), Ok(()));
        assert!(memlock_recommended(2, page, true, 512 * 1024) > need);
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
        let uring = check_io_uring().unwrap();
        // From 5.12 the kernel charges rings to the memory cgroup, and says so.
        // SAFETY: uname fills the struct it is given.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        unsafe { libc::uname(&mut u) };
        // SAFETY: the release is a NUL-terminated string inside the struct.
        let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        assert_eq!(
            uring.rings_charged,
            version < (5, 12),
            "{release}: {uring:?}"
        );
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        check_cores(allowed.len(), &allowed).unwrap();
    }
}

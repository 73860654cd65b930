//! Memory for secrets: a value on pages of its own that are locked in RAM (`mlock`: never
//! swapped), left out of core dumps (`MADV_DONTDUMP`), and overwritten with zeros before
//! they are unmapped.
//!
//! Only for plain values: types with no heap and no drop glue, for which all-zero bytes
//! are a valid value (byte arrays, and the HMAC-SHA256 state, which is integers and byte
//! arrays). The value is moved in by copying its bytes, and the source is zeroized.

use std::marker::PhantomData;
use std::ptr::NonNull;

/// Why locked memory could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LockError {
    #[error("cannot map memory for a secret: {0}")]
    Map(String),
    #[error("cannot lock memory for a secret ({0}); raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=, shell: ulimit -l)")]
    Lock(String),
}

/// Plain data: no heap, no drop glue, all-zero bytes a valid value, alignment within a
/// page. Only such types may live in [`Locked`].
///
/// # Safety
/// Implement it only for types with those properties.
pub unsafe trait Plain {}

// SAFETY: byte arrays are plain.
unsafe impl<const N: usize> Plain for [u8; N] {}

/// A `T` in locked, undumpable, zeroize-on-drop memory.
pub struct Locked<T> {
    ptr: NonNull<T>,
    len: usize,
    _owns: PhantomData<T>,
}

// SAFETY: `Locked<T>` owns its `T` exclusively, as a `Box<T>` would.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for Locked<T> {}

/// The system's page size (4096 if it cannot be read).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

impl<T: Plain> Locked<T> {
    /// Moves `value` into locked memory and zeroizes the place it came from.
    pub fn new(mut value: T) -> Result<Locked<T>, LockError> {
        const { assert!(!std::mem::needs_drop::<T>(), "Locked holds plain data only") };
        let size = std::mem::size_of::<T>().max(1);
        let page = page_size();
        if std::mem::align_of::<T>() > page {
            wipe(&mut value);
            return Err(LockError::Map(
                "the value's alignment exceeds a page".into(),
            ));
        }
        let len = size.div_ceil(page) * page;
        // SAFETY: an anonymous private mapping of `len` bytes; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            wipe(&mut value);
            return Err(LockError::Map(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: `addr` is the mapping just made, `len` bytes long.
        if unsafe { libc::mlock(addr, len) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping the mapping just made.
            unsafe { libc::munmap(addr, len) };
            wipe(&mut value);
            return Err(LockError::Lock(e.to_string()));
        }
        // Best effort: a kernel without MADV_DONTDUMP still has the lock and the wipe.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(addr, len, libc::MADV_DONTDUMP) };
        let ptr = addr as *mut T;
        // SAFETY: the mapping is page-aligned (so aligned for `T`), writable and at least
        // `size_of::<T>()` bytes; `value` is read bitwise once and then wiped and forgotten,
        // so it is neither used nor dropped again.
        unsafe { std::ptr::copy_nonoverlapping(&value as *const T, ptr, 1) };
        wipe(&mut value);
        std::mem::forget(value);
        Ok(Locked {
            // SAFETY: mmap never returns null on success.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len,
            _owns: PhantomData,
        })
    }
}

/// Makes this process undumpable: no core file (`RLIMIT_CORE` 0) and not dumpable
/// (`PR_SET_DUMPABLE` 0, which also keeps other processes of the same user from attaching
/// to it or reading its memory). For the appliance, which holds the keyed state; the
/// pages of [`Locked`] are left out of dumps anyway.
pub fn forbid_core_dumps() -> std::io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls with valid arguments.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Overwrites a plain value's bytes with zeros (volatile, so it is not optimised away).
pub(crate) fn wipe<T: Plain>(value: &mut T) {
    let size = std::mem::size_of::<T>();
    // SAFETY: `value` is valid for `size` bytes; all-zero bytes are a valid `T` for the
    // plain types this module takes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(value as *mut T as *mut u8, size) };
    zeroize::Zeroize::zeroize(bytes);
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` for the life of `self`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`, and `&mut self` is exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: the whole mapping is ours; zero it, then unlock and unmap it. `T` has no
        // drop glue (plain data), so not running one is correct.
        unsafe {
            let bytes = std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut u8, self.len);
            zeroize::Zeroize::zeroize(bytes);
            libc::munlock(self.ptr.as_ptr() as *mut libc::c_void, self.len);
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

impl<T> std::fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Locked(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping's flags as the kernel reports them in /proc/self/smaps.
    fn smaps_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_owned());
                }
            }
        }
        None
    }

    #[test]
    fn holds_the_value_on_locked_undumpable_pages() {
        let secret = Locked::new([0x5au8; 32]).unwrap();
        assert_eq!(*secret, [0x5a; 32]);
        let addr = secret.ptr.as_ptr() as usize;
        assert_eq!(addr % page_size(), 0);
        let flags = smaps_flags(addr).expect("mapping listed in /proc/self/smaps");
        assert!(flags.split(' ').any(|f| f == "lo"), "locked: {flags}");
        assert!(flags.split(' ').any(|f| f == "dd"), "not dumped: {flags}");
        drop(secret);
        assert!(
            smaps_flags(addr).is_none_or(|f| !f.contains("lo")),
            "unmapped after drop"
        );
    }

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Locked::new([7u8; 4]).unwrap();
        assert_eq!(format!("{secret:?}"), "Locked(<redacted>)");
    }
}

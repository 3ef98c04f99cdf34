//! Host memory calls behind guest RAM: memfds, reserving a window, mapping a run of a
//! memfd into it, turning a range back into an anonymous hole, and the process mapping
//! limit (`vm.max_map_count`).
//!
//! The functions taking raw host addresses are `unsafe`: the caller (the window) owns the
//! range and guarantees nothing in Rust holds references into it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A host memory call failed.
#[derive(Debug, thiserror::Error)]
pub enum MmanError {
    /// `memfd_create` or `ftruncate` failed.
    #[error(
        "cannot create a memfd of {bytes} bytes: {source}; check free memory and the open-file limit"
    )]
    Memfd {
        /// Requested size.
        bytes: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// An mmap failed.
    #[error("{op} of {len:#x} bytes at {addr:#x} failed: {source}")]
    Mmap {
        /// What was being mapped.
        op: &'static str,
        /// Host address (0 when the kernel chooses).
        addr: u64,
        /// Length.
        len: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The process is at its mapping limit.
    #[error(
        "the process has {current} memory mappings and vm.max_map_count is {limit}: guest memory is too fragmented for the host limit; raise it with `sudo sysctl -w vm.max_map_count={suggest}`"
    )]
    MapLimit {
        /// Mappings now.
        current: u64,
        /// The limit.
        limit: u64,
        /// A suggested new limit.
        suggest: u64,
    },
}

impl MmanError {
    /// Whether the host ran out of something the user can raise: mappings
    /// (`vm.max_map_count`) or memory and descriptors for a memfd.
    pub fn is_host_limit(&self) -> bool {
        matches!(self, MmanError::MapLimit { .. } | MmanError::Memfd { .. })
    }
}

/// Creates a memfd of `bytes` bytes (sparse: pages are allocated on first touch).
pub fn memfd(name: &str, bytes: u64) -> Result<OwnedFd, MmanError> {
    let err = |source| MmanError::Memfd { bytes, source };
    let cname = CString::new(name).map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: `cname` is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// The host's mapping limit, `/proc/sys/vm/max_map_count`.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Mappings this process has now (lines of `/proc/self/maps`).
pub fn map_count() -> Option<u64> {
    let maps = std::fs::read("/proc/self/maps").ok()?;
    Some(maps.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// Mappings known to be free under the limit at the last count, minus what callers of
/// [`check_map_headroom`] have claimed since (Relaxed: a heuristic budget; the mmap calls
/// themselves still report the limit exactly).
static MAP_BUDGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Fails with [`MmanError::MapLimit`] unless `needed` more mappings fit under the host's
/// `vm.max_map_count` (unknown counts pass: the mmap itself will then report).
///
/// Counting reads `/proc/self/maps`, which costs in proportion to the mappings (a process
/// with a thousand VMs has many): so half the headroom found is kept as a budget, and the
/// maps are counted again only once callers have claimed it.
pub fn check_map_headroom(needed: u64) -> Result<(), MmanError> {
    use std::sync::atomic::Ordering::Relaxed;
    let claimed = MAP_BUDGET.fetch_update(Relaxed, Relaxed, |b| b.checked_sub(needed));
    if claimed.is_ok() {
        return Ok(());
    }
    if let (Some(current), Some(limit)) = (map_count(), max_map_count()) {
        if current + needed > limit {
            return Err(MmanError::MapLimit {
                current,
                limit,
                suggest: limit.saturating_mul(4).max(262_144),
            });
        }
        MAP_BUDGET.store((limit - current - needed) / 2, Relaxed);
    }
    Ok(())
}

/// Turns an mmap failure into [`MmanError::MapLimit`] when the process is near its limit.
fn mmap_error(op: &'static str, addr: u64, len: u64, source: io::Error) -> MmanError {
    if source.raw_os_error() == Some(libc::ENOMEM)
        && let (Some(current), Some(limit)) = (map_count(), max_map_count())
        && current + 16 >= limit
    {
        // The budget counted earlier is stale now: the next check counts again.
        MAP_BUDGET.store(0, std::sync::atomic::Ordering::Relaxed);
        return MmanError::MapLimit {
            current,
            limit,
            suggest: limit.saturating_mul(4).max(262_144),
        };
    }
    MmanError::Mmap {
        op,
        addr,
        len,
        source,
    }
}

/// Reserves `len` bytes of host address space as one anonymous, private, unreserved
/// mapping (every page a hole until something is mapped over it).
pub fn reserve(len: u64) -> Result<*mut u8, MmanError> {
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses touches no existing
    // memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(mmap_error(
            "reserve window",
            0,
            len,
            io::Error::last_os_error(),
        ));
    }
    Ok(p.cast())
}

/// Maps `fd` bytes `offset .. offset + len` shared and read-write at `addr` (replacing what
/// was there).
///
/// # Safety
///
/// `addr .. addr + len` must be a page-aligned range the caller owns (inside its window) and
/// into which no Rust reference points.
pub unsafe fn map_shared_fixed(
    addr: u64,
    len: u64,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> Result<(), MmanError> {
    // SAFETY: the caller's contract is this function's.
    unsafe { map_shared_fixed_prot(addr, len, fd, offset, true, false) }
}

/// As [`map_shared_fixed`], read-only unless `writable`; with `populate`, the run's page
/// tables are filled at once (`MAP_POPULATE`: the file pages must exist), which costs a
/// fraction of a microsecond per page against a host fault per page on first access.
///
/// # Safety
/// As [`map_shared_fixed`].
pub unsafe fn map_shared_fixed_prot(
    addr: u64,
    len: u64,
    fd: BorrowedFd<'_>,
    offset: u64,
    writable: bool,
    populate: bool,
) -> Result<(), MmanError> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let mut flags = libc::MAP_SHARED | libc::MAP_FIXED;
    if populate {
        flags |= libc::MAP_POPULATE;
    }
    // SAFETY: the caller owns the target range (contract above); MAP_FIXED only replaces
    // mappings inside it.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            flags,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(mmap_error(
            "map memfd run",
            addr,
            len,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Makes `addr .. addr + len` readable and writable (`mprotect`).
///
/// # Safety
/// The caller owns the range (a run of a guest RAM window); no Rust reference points into
/// it.
pub unsafe fn make_writable(addr: u64, len: u64) -> Result<(), MmanError> {
    // SAFETY: the caller owns the range; mprotect changes only its protection.
    let rc = unsafe {
        libc::mprotect(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if rc != 0 {
        return Err(mmap_error(
            "mprotect run",
            addr,
            len,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Maps `fd` bytes `0 .. len` private (copy-on-write) and read-write at `addr`.
///
/// # Safety
///
/// As for [`map_shared_fixed`].
pub unsafe fn map_private_fixed(addr: u64, len: u64, fd: BorrowedFd<'_>) -> Result<(), MmanError> {
    // SAFETY: the caller owns the target range (contract above).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(mmap_error(
            "map memfd private",
            addr,
            len,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Maps `len` bytes at `addr` read-write and shared, for the VMM's own view of a memfd.
pub fn map_shared(len: u64, fd: BorrowedFd<'_>) -> Result<*mut u8, MmanError> {
    // SAFETY: a new mapping at a kernel-chosen address touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(mmap_error("map memfd", 0, len, io::Error::last_os_error()));
    }
    Ok(p.cast())
}

/// Replaces `addr .. addr + len` with a fresh anonymous private hole.
///
/// # Safety
///
/// As for [`map_shared_fixed`].
pub unsafe fn make_hole(addr: u64, len: u64) -> Result<(), MmanError> {
    // SAFETY: the caller's contract is this function's.
    unsafe { hole(addr, len, libc::PROT_READ | libc::PROT_WRITE) }
}

/// As [`make_hole`], but the hole refuses every access (`PROT_NONE`) until the caller
/// registers it and calls [`make_writable`].
///
/// # Safety
/// As for [`make_hole`].
pub unsafe fn make_hole_inaccessible(addr: u64, len: u64) -> Result<(), MmanError> {
    // SAFETY: the caller's contract is this function's.
    unsafe { hole(addr, len, libc::PROT_NONE) }
}

/// An anonymous private mapping with `prot` over `addr .. addr + len`.
///
/// # Safety
/// As for [`make_hole`].
unsafe fn hole(addr: u64, len: u64, prot: libc::c_int) -> Result<(), MmanError> {
    // SAFETY: the caller owns the target range (contract above); MAP_FIXED only replaces
    // mappings inside it.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(mmap_error(
            "make hole",
            addr,
            len,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Unmaps `addr .. addr + len`.
///
/// # Safety
///
/// As for [`map_shared_fixed`]; nothing may use the range afterwards.
pub unsafe fn unmap(addr: *mut u8, len: u64) {
    // SAFETY: the caller owns the range and stops using it (contract above).
    unsafe { libc::munmap(addr.cast(), len as usize) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn map_count_is_below_limit() {
        let (n, limit) = (map_count().unwrap(), max_map_count().unwrap());
        assert!(n > 0 && n < limit);
    }

    #[test]
    fn memfd_run_mapped_into_reserved_window_is_shared() {
        let fd = memfd("t", 1 << 20).unwrap();
        let direct = map_shared(1 << 20, fd.as_fd()).unwrap();
        let win = reserve(1 << 20).unwrap();
        // SAFETY: `win` is our fresh reservation; nothing references it.
        unsafe { map_shared_fixed(win as u64 + 4096, 8192, fd.as_fd(), 65536).unwrap() };
        // SAFETY: both pointers are inside live mappings we own.
        unsafe {
            direct.add(65536 + 4096).write_volatile(42);
            assert_eq!(win.add(8192).read_volatile(), 42);
            make_hole(win as u64 + 4096, 8192).unwrap();
            assert_eq!(win.add(8192).read_volatile(), 0);
            unmap(win, 1 << 20);
            unmap(direct, 1 << 20);
        }
    }
}

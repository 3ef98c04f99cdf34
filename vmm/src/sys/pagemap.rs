//! Reading which host pages of a range are mapped, and dropping their page-table entries:
//! the host half of guest access harvesting ([`crate::Window::harvest_accessed`]).
//!
//! - [`Pagemap`] is this process's `/proc/self/pagemap`: [`Pagemap::scan`] is the
//!   `PAGEMAP_SCAN` ioctl (Linux 6.7+: runs of pages by category, e.g. "present and
//!   file-backed"), [`Pagemap::read`] the classic interface (one 64-bit entry per page:
//!   bit 63 present, 61 file or shared, 57 uffd-wp, 55 soft-dirty), the fallback on older
//!   kernels.
//! - [`zap`] is `madvise(MADV_DONTNEED)`: on a `MAP_SHARED` memfd run it only drops the
//!   page-table entries (the frame stays in the memfd's page cache, the next access maps the
//!   same frame again with a minor fault, and KVM follows through its MMU notifier).
//! - [`clear_soft_dirty`] is `/proc/self/clear_refs` "4", for experiments only.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// `PAGE_IS_WRITTEN`: present and not uffd-write-protected (async uffd-wp's "written").
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`: a present page of a file (shmem, memfd) rather than anonymous memory.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`: the page has a present page-table entry.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SOFT_DIRTY`: the soft-dirty bit is set.
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// Pagemap entry bit: the page is present.
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry bit: a file page or shared anonymous page.
pub const PM_FILE: u64 = 1 << 61;
/// Pagemap entry bit: the entry is uffd-write-protected (a present PTE or a PTE marker).
pub const PM_UFFD_WP: u64 = 1 << 57;
/// Pagemap entry bit: soft-dirty.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

const PAGE: u64 = crate::PAGE_SIZE_U64;

/// `struct page_region` (`<linux/fs.h>`): pages `start .. end` (host addresses) share
/// `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First host address of the run.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// The run's categories (masked by the scan's `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg` (`<linux/fs.h>`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// The ioctl number (generated function).
#[allow(missing_docs)]
mod nr {
    use super::PmScanArg;
    use vmm_sys_util::ioctl_iowr_nr;
    ioctl_iowr_nr!(PAGEMAP_SCAN, b'f' as u32, 16, PmScanArg);
}

/// A pagemap call failed.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap: {0}; is /proc mounted?")]
    Open(#[source] io::Error),
    /// The kernel has no `PAGEMAP_SCAN` (before Linux 6.7): use [`Pagemap::read`].
    #[error("this kernel has no PAGEMAP_SCAN ioctl (it needs Linux 6.7 or newer)")]
    NoScan,
    /// A scan or read failed.
    #[error("{op} of host range {start:#x}..{end:#x} failed: {source}")]
    Io {
        /// `PAGEMAP_SCAN` or `pagemap read`.
        op: &'static str,
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// `madvise(MADV_DONTNEED)` failed.
    #[error("dropping the page-table entries of {start:#x}..{end:#x} failed: {source}")]
    Zap {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// Writing `/proc/self/clear_refs` failed.
    #[error("writing /proc/self/clear_refs failed: {0}")]
    ClearRefs(#[source] io::Error),
}

/// What a [`Pagemap::scan`] looks for: pages whose categories, after flipping
/// `inverted`, include all of `mask`; regions report the categories in `ret`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanQuery {
    /// Categories every reported page must have (after `inverted`).
    pub mask: u64,
    /// Categories to flip before matching (e.g. "not written").
    pub inverted: u64,
    /// Categories to report (runs merge while these are equal).
    pub ret: u64,
}

/// This process's `/proc/self/pagemap`, opened once.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Pagemap, PagemapError> {
        let file = File::open("/proc/self/pagemap").map_err(PagemapError::Open)?;
        Ok(Pagemap { file })
    }

    /// Scans `start .. end` (page aligned) with `PAGEMAP_SCAN`, filling `out` (its
    /// capacity, at least 1, bounds the regions per call; it is cleared first) with the
    /// runs that match `q`. Returns where the walk stopped: `end`, or earlier when `out`
    /// filled up (call again from there).
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        q: ScanQuery,
        out: &mut Vec<PageRegion>,
    ) -> Result<u64, PagemapError> {
        out.clear();
        if out.capacity() == 0 {
            out.reserve(64);
        }
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.capacity() as u64,
            category_inverted: q.inverted,
            category_mask: q.mask,
            return_mask: q.ret,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN reads and writes a `struct pm_scan_arg`, which `arg` is
        // (repr(C), size asserted); the kernel writes at most `vec_len` `struct
        // page_region`s (repr(C), size asserted) to `vec`, which is `out`'s buffer of that
        // capacity; it only reads the page tables of `start .. end`.
        let n = unsafe { ioctl_with_mut_ref(&self.file, nr::PAGEMAP_SCAN(), &mut arg) };
        if n < 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENOTTY) {
                return Err(PagemapError::NoScan);
            }
            return Err(PagemapError::Io {
                op: "PAGEMAP_SCAN",
                start,
                end,
                source,
            });
        }
        let n = (n as usize).min(out.capacity());
        // SAFETY: the kernel initialised the first `n` regions (its return value, at most
        // the capacity), and `PageRegion` is plain data valid for any bit pattern.
        unsafe { out.set_len(n) };
        Ok(arg.walk_end.clamp(start, end))
    }

    /// Reads the pagemap entries of the pages `start .. start + 8 * out.len()` bytes' worth
    /// (one `u64` per page from host address `start`, page aligned) into `out`.
    pub fn read(&self, start: u64, out: &mut [u64]) -> Result<(), PagemapError> {
        let end = start + out.len() as u64 * PAGE;
        let err = |source| PagemapError::Io {
            op: "pagemap read",
            start,
            end,
            source,
        };
        // SAFETY: `u64` is plain data; the byte view covers exactly `out` and lives no
        // longer than this call.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 8) };
        self.file
            .read_exact_at(bytes, (start / PAGE) * 8)
            .map_err(err)
    }

    /// The fd (for tests).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// Drops the page-table entries of `start .. start + len` (`MADV_DONTNEED`).
///
/// # Safety
///
/// The range must be owned by the caller and, where it holds pages, be `MAP_SHARED` file
/// (memfd) mappings: there the frames stay in the page cache and the next access maps the
/// same contents again. On a private or anonymous mapping this *discards* the contents.
pub unsafe fn zap(start: u64, len: u64) -> Result<(), PagemapError> {
    // SAFETY: the caller owns the range and guarantees dropping its entries loses nothing
    // (contract above); madvise touches only the page tables of this range.
    let rc = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        return Err(PagemapError::Zap {
            start,
            end: start + len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Clears the soft-dirty bits of the whole process (`/proc/self/clear_refs` "4"): every
/// writable page of every mapping is write-protected in the host page tables, so this is
/// an experiment's tool, not something to do in a VMM with many VMs.
pub fn clear_soft_dirty() -> Result<(), PagemapError> {
    std::fs::write("/proc/self/clear_refs", b"4").map_err(PagemapError::ClearRefs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mman;
    use std::os::fd::AsFd;

    #[test]
    fn scan_and_read_agree_on_the_pages_touched_after_a_zap() {
        let fd = mman::memfd("t", 64 * PAGE).unwrap();
        let win = mman::reserve(64 * PAGE).unwrap() as u64;
        // SAFETY: our fresh reservation; no Rust reference points into it.
        unsafe { mman::map_shared_fixed_prot(win, 64 * PAGE, fd.as_fd(), 0, true, true) }.unwrap();
        let pm = Pagemap::open().unwrap();
        // SAFETY: a shared memfd mapping we own.
        unsafe { zap(win, 64 * PAGE) }.unwrap();
        for p in [3u64, 4, 40] {
            // SAFETY: inside our mapping.
            unsafe { ((win + p * PAGE) as *const u8).read_volatile() };
        }
        let mut regions = Vec::with_capacity(8);
        let q = ScanQuery {
            mask: PAGE_IS_PRESENT | PAGE_IS_FILE,
            inverted: 0,
            ret: PAGE_IS_PRESENT,
        };
        let end = pm.scan(win, win + 64 * PAGE, q, &mut regions).unwrap();
        assert_eq!(end, win + 64 * PAGE);
        let pages: Vec<u64> = regions
            .iter()
            .flat_map(|r| (r.start - win) / PAGE..(r.end - win) / PAGE)
            .collect();
        let mut entries = vec![0u64; 64];
        pm.read(win, &mut entries).unwrap();
        let present: Vec<u64> = (0..64)
            .filter(|&p| entries[p as usize] & PM_PRESENT != 0)
            .collect();
        // Fault-around may map neighbours on this unregistered mapping: the two views agree
        // and include the pages read.
        assert_eq!(pages, present);
        for p in [3u64, 4, 40] {
            assert!(
                pages.contains(&p),
                "page {p} read but not present: {pages:?}"
            );
        }
        // SAFETY: ours, nothing refers to it.
        unsafe { mman::unmap(win as *mut u8, 64 * PAGE) };
    }
}

//! A VM's guest RAM as seen by the host: a reserved host address range (the "window")
//! registered as one KVM memslot, whose pages are either runs of node memfd frames
//! (`MAP_SHARED|MAP_FIXED`) or anonymous holes registered with the VM's userfaultfd.
//!
//! [`Window`] implements guestmem's [`HostMmu`]: the memory manager decides which frame
//! backs which gfn, and the window mirrors that into the host page tables, which KVM
//! follows through MMU notifiers. An absent page is never `PROT_NONE` or unmapped (KVM
//! would fail the vCPU with a bare EFAULT): it is a hole, so a guest access raises a
//! userfaultfd MISSING fault carrying its address. Every new mapping is registered with the
//! userfaultfd again (mmap drops the registration).

use std::io;
use std::sync::Arc;

use guestmem::mmu::{HostMmu, HostMmuError, MapRun};
use guestmem::types::{Gfn, Gpa, PAGE_SIZE};

use crate::sys::mman::{self, MmanError};
use crate::sys::uffd::{Uffd, UffdError};

const PAGE: u64 = PAGE_SIZE as u64;

/// A window operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// Size zero or not a multiple of the page size.
    #[error("guest RAM size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// A host memory call failed.
    #[error(transparent)]
    Mman(#[from] MmanError),
    /// A userfaultfd call failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// An access outside guest RAM.
    #[error("{what} at {gpa} ({len} bytes) is outside guest RAM of {size:#x} bytes")]
    OutOfRange {
        /// What was attempted.
        what: &'static str,
        /// Guest address.
        gpa: Gpa,
        /// Length.
        len: u64,
        /// Size of guest RAM.
        size: u64,
    },
}

/// Guest RAM's host window (see the module docs).
#[derive(Debug)]
pub struct Window {
    base: *mut u8,
    size: u64,
    uffd: Arc<Uffd>,
}

// SAFETY: `base` is the address of a mapping the Window owns for its lifetime; all access
// to guest memory through it is volatile and guest memory is shared with the guest anyway.
unsafe impl Send for Window {}
// SAFETY: as above; the only mutation through `&self` is by host syscalls on the range and
// volatile word accesses.
unsafe impl Sync for Window {}

impl Window {
    /// Mappings that must be free under `vm.max_map_count` to create a window.
    pub const MIN_MAP_HEADROOM: u64 = 64;

    /// Reserves a window of `size` bytes, every page a hole registered with `uffd`.
    pub fn new(uffd: Arc<Uffd>, size: u64) -> Result<Window, WindowError> {
        if size == 0 || size % PAGE != 0 {
            return Err(WindowError::BadSize(size));
        }
        // A window starts as one mapping and grows by about two per mapped run; refuse early
        // when the process is already near the host's limit.
        mman::check_map_headroom(Self::MIN_MAP_HEADROOM)?;
        let base = mman::reserve(size)?;
        let w = Window { base, size, uffd };
        w.uffd.register(base as u64, size)?;
        Ok(w)
    }

    /// The host address of guest-physical 0.
    pub fn host_base(&self) -> u64 {
        self.base as u64
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.size / PAGE
    }

    /// The window's userfaultfd.
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// The guest page a host address falls in, if it is inside the window.
    pub fn gfn_of(&self, host_addr: u64) -> Option<Gfn> {
        let off = host_addr.checked_sub(self.host_base())?;
        (off < self.size).then_some(Gfn(off / PAGE))
    }

    fn check(&self, what: &'static str, gpa: Gpa, len: u64) -> Result<u64, WindowError> {
        match gpa.0.checked_add(len) {
            Some(end) if end <= self.size => Ok(self.host_base() + gpa.0),
            _ => Err(WindowError::OutOfRange {
                what,
                gpa,
                len,
                size: self.size,
            }),
        }
    }

    fn check_run(
        &self,
        op: &'static str,
        gfn: Gfn,
        pages: u64,
    ) -> Result<(u64, u64), HostMmuError> {
        let len = pages.saturating_mul(PAGE);
        self.check(op, gfn.gpa(), len)
            .map(|a| (a, len))
            .map_err(|e| HostMmuError {
                op,
                gfn,
                pages,
                source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
            })
    }

    /// Host mappings (VMAs) the window consists of now, from `/proc/self/maps`: one per
    /// maximal run of holes or of file-contiguous frames; the host limits a process to
    /// `vm.max_map_count` of them. `None` if `/proc` cannot be read.
    pub fn host_mappings(&self) -> Option<u64> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let (lo, hi) = (self.host_base(), self.host_base() + self.size);
        Some(
            maps.lines()
                .filter_map(|l| {
                    let range = l.split_whitespace().next()?;
                    let (a, b) = range.split_once('-')?;
                    Some((
                        u64::from_str_radix(a, 16).ok()?,
                        u64::from_str_radix(b, 16).ok()?,
                    ))
                })
                .filter(|&(a, b)| a < hi && b > lo)
                .count() as u64,
        )
    }

    /// Reads the 8-byte word at `gpa` (8-aligned) from the host side. A hole raises a
    /// userfaultfd fault on the calling thread, resolved by the VM's fault handler.
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, WindowError> {
        let a = self.check("read", Gpa(gpa.0 & !7), 8)?;
        // SAFETY: `a` is 8-aligned and inside the window's live mapping (checked); guest
        // memory may change under us, hence the volatile read.
        Ok(unsafe { (a as *const u64).read_volatile() })
    }

    /// Writes `bytes` at `gpa` from the host side (volatile, byte by byte where unaligned).
    pub fn write_bytes(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), WindowError> {
        let a = self.check("write", gpa, bytes.len() as u64)?;
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the window's live mapping (checked above).
            unsafe { (a as *mut u8).add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Writes the 8-byte words `words` starting at `gpa` (8-aligned).
    pub fn write_u64s(&self, gpa: Gpa, words: &[u64]) -> Result<(), WindowError> {
        let a = self.check("write", Gpa(gpa.0 & !7), words.len() as u64 * 8)?;
        for (i, w) in words.iter().enumerate() {
            // SAFETY: 8-aligned and inside the window's live mapping (checked above).
            unsafe { (a as *mut u64).add(i).write_volatile(*w) };
        }
        Ok(())
    }
}

impl Window {
    /// Baseline for benchmarks, not the managed path: backs the whole window with `fd`
    /// (`private`: copy-on-write `MAP_PRIVATE`, as VMMs restore clones; else `MAP_SHARED`)
    /// and unregisters the userfaultfd, so the host kernel populates pages on first touch
    /// and no fault reaches the VM's handler. This is how a standard VMM backs guest RAM.
    pub fn map_host_backed(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        private: bool,
    ) -> Result<(), WindowError> {
        let (addr, len) = (self.host_base(), self.size);
        self.uffd.unregister(addr, len)?;
        // SAFETY: the whole window is ours; no Rust reference points into guest RAM.
        unsafe {
            if private {
                mman::map_private_fixed(addr, len, fd)?;
            } else {
                mman::map_shared_fixed(addr, len, fd, 0)?;
            }
        }
        Ok(())
    }
}

fn mmu_err(op: &'static str, gfn: Gfn, pages: u64, e: impl std::error::Error) -> HostMmuError {
    HostMmuError {
        op,
        gfn,
        pages,
        source: io::Error::other(e.to_string()),
    }
}

impl HostMmu for Window {
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError> {
        let (addr, len) = self.check_run("map_run", run.gfn, run.pages)?;
        // SAFETY: the range is inside the window (checked), which this Window owns; no Rust
        // reference points into guest RAM (all access is volatile through raw pointers).
        unsafe { mman::map_shared_fixed(addr, len, run.fd, run.file_offset) }
            .map_err(|e| mmu_err("map_run", run.gfn, run.pages, e))?;
        self.uffd
            .register(addr, len)
            .map_err(|e| mmu_err("map_run", run.gfn, run.pages, e))?;
        if !run.writable {
            self.uffd
                .write_protect(addr, len, true)
                .map_err(|e| mmu_err("map_run", run.gfn, run.pages, e))?;
        }
        Ok(())
    }

    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        let (addr, len) = self.check_run("unmap_run", gfn, pages)?;
        // SAFETY: as in map_run.
        unsafe { mman::make_hole(addr, len) }.map_err(|e| mmu_err("unmap_run", gfn, pages, e))?;
        self.uffd
            .register(addr, len)
            .map_err(|e| mmu_err("unmap_run", gfn, pages, e))
    }

    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<(), HostMmuError> {
        let (addr, len) = self.check_run("protect_run", gfn, pages)?;
        self.uffd
            .write_protect(addr, len, !writable)
            .map_err(|e| mmu_err("protect_run", gfn, pages, e))
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the window owns this mapping; the VM (memslot, vCPUs) that used it is gone
        // before the Window is dropped (Vm field order).
        unsafe { mman::unmap(self.base, self.size) };
    }
}

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
//!
//! # Fork without write-protecting every page
//!
//! A snapshot-fork must stop the parent from writing its shared pages. Write-protecting a
//! populated 1 GiB window costs the host about 16 ms (zapping it 24 ms). Instead, when the
//! window is bound to its VM's memslot ([`Window::bind_memslot`]),
//! [`HostMmu::protect_for_fork`] gives the parent a *fresh* window: a new reservation of
//! holes, registered with the userfaultfd, and the memslot moved onto it (delete and
//! re-create, the VM paused). The old, populated range is unmapped by a background thread,
//! off the fork's critical path. The parent's later accesses fault and the manager maps
//! its pages again, read-only where they are shared: the per-page cost moves from the fork
//! to the first touch after it. A window into which nothing writable was mapped since its
//! last swap (a batch of forks while the parent stays paused, or a fresh clone) needs
//! nothing at all.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};
use std::sync::{Arc, Mutex, Weak};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use guestmem::mmu::{HostMmu, HostMmuError, MapRun};
use guestmem::types::{Gfn, Gpa, PAGE_SIZE};

use crate::memory::GuestRam;
use crate::sys::mman::{self, MmanError};
use crate::sys::pagemap::PagemapError;
use crate::sys::uffd::{Uffd, UffdError};

const PAGE: u64 = PAGE_SIZE as u64;

mod harvest;
mod retire;
pub use harvest::harvest_uses_scan;
pub use retire::{Retiree, retire, retire_after};

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
    /// Reading the host page tables (pagemap) or dropping their entries failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// Moving the KVM memslot onto a fresh window failed.
    #[error(
        "moving guest RAM's KVM memslot to a fresh window failed: {0}; the host may be short of memory"
    )]
    Memslot(#[source] io::Error),
    /// The window would need more host mappings than its budget.
    #[error(
        "guest RAM's host window needs more than its budget of {budget} host mappings ({used} now): its frames are scattered across the frame pool; give the pool more memory (so it fragments less) or raise the window's mapping budget"
    )]
    MapBudget {
        /// Host mappings the window has now.
        used: u64,
        /// Its budget.
        budget: u64,
    },
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
    /// A host access through guest RAM's vm-memory view failed after its bounds check.
    #[error("{what} at {gpa} ({len} bytes) through guest RAM's vm-memory view failed: {source}")]
    Access {
        /// What was attempted.
        what: &'static str,
        /// Guest address.
        gpa: Gpa,
        /// Length.
        len: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The thread forking the VM holds a pin of its window (a [`crate::memory::GuestRam`]
    /// view or a [`BaseGuard`]), so the window cannot be swapped for a fresh one.
    #[error(
        "this thread holds a view of the VM's guest RAM (Window::guest_memory or Window::pin) while forking it, so the fork cannot move the VM to a fresh window; drop the view before forking"
    )]
    PinnedByForkingThread,
    /// Hinting faults that name the touching thread were asked for, but the kernel's
    /// userfaultfd lacks them.
    #[error(
        "this VM's vCPUs live on several nodes, which needs userfaultfd MINOR faults on memfd mappings and thread ids (Linux 5.14 or newer); give every vCPU the same node (drop --vcpu-nodes)"
    )]
    NoHintingFaults,
}

/// The KVM memslot a window backs, so that a fork can move it onto a fresh window.
#[derive(Debug)]
struct Memslot {
    vm: Weak<VmFd>,
    slot: u32,
}

/// Guest RAM's host window (see the module docs).
#[derive(Debug)]
pub struct Window {
    /// Host address of guest-physical 0: a mapping the Window owns. Every access through
    /// the window (host accessors, `HostMmu` calls) holds a read guard for its whole
    /// duration ([`Window::pin`]), so the range it computed stays the window's; a fork's
    /// swap to a fresh range (`commit_fresh`) takes it for writing. Readers take it
    /// recursively (`read_recursive`: a waiting writer does not block them), because an
    /// accessor holding a guard may fault, and the fault handler resolving that fault
    /// takes a guard of its own.
    base: RwLock<u64>,
    size: u64,
    uffd: Arc<Uffd>,
    /// Something writable was mapped since the window was created or last swapped.
    dirty: AtomicBool,
    /// Whether `protect_for_fork` may swap a memslot-bound window for a fresh one
    /// (`ParentMode::Rebirth`'s cheap pause) rather than write-protect it in place.
    swap_on_fork: AtomicBool,
    /// Windows swapped out so far (statistics).
    swaps: AtomicU64,
    memslot: Mutex<Option<Memslot>>,
    /// Host mappings the window holds at most (an estimate that only errs high: each
    /// mapping change adds at most two), recounted from `/proc/self/maps` when it passes
    /// the budget.
    mappings: AtomicU64,
    /// Most host mappings the window may hold: `vm.max_map_count` is one limit for the
    /// whole process, so a VM whose memory is scattered over the pool fails alone instead
    /// of using up every sibling's mappings.
    map_budget: AtomicU64,
    /// Memfd runs are registered for MINOR faults too ([`Window::take_hinting_faults`]).
    hinting: AtomicBool,
}

impl Window {
    /// The default mapping budget: a quarter of the host's `vm.max_map_count` (at least
    /// 1024; 16,382 with the usual limit of 65,530).
    pub fn default_map_budget() -> u64 {
        (mman::max_map_count().unwrap_or(65_530) / 4).max(1024)
    }
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
        let w = Window {
            base: RwLock::new(base as u64),
            size,
            uffd,
            dirty: AtomicBool::new(false),
            swap_on_fork: AtomicBool::new(true),
            swaps: AtomicU64::new(0),
            memslot: Mutex::new(None),
            mappings: AtomicU64::new(1),
            map_budget: AtomicU64::new(Self::default_map_budget()),
            hinting: AtomicBool::new(false),
        };
        w.uffd.register(base as u64, size)?;
        Ok(w)
    }

    /// From now on, memfd runs mapped into the window are registered for userfaultfd
    /// MINOR faults as well: once a harvest drops a page's host entry, the next access
    /// is a hinting fault ([`crate::fault::FaultKind::Hint`]) that names the touching
    /// thread, instead of a host minor fault no one sees. The resolver restores the entry
    /// with [`HostMmu::restore_run`]. Costs a userfaultfd round trip per page touched
    /// after each harvest (see `benches/access_harvest.rs`). Call it before anything is
    /// mapped.
    pub fn take_hinting_faults(&self) -> Result<(), WindowError> {
        if !self.uffd.has_minor_hints() {
            return Err(WindowError::NoHintingFaults);
        }
        self.hinting.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the window takes hinting faults.
    pub fn takes_hinting_faults(&self) -> bool {
        self.hinting.load(Ordering::Relaxed)
    }

    /// The host address of guest-physical 0 now. It changes when a fork swaps the window
    /// (see the module docs): to use it for an access, hold [`Window::pin`] instead.
    pub fn host_base(&self) -> u64 {
        *self.base.read_recursive()
    }

    /// Pins the window's host range for an access: while the guard lives, no fork can
    /// swap the range, so addresses computed from [`BaseGuard::base`] stay inside it
    /// (vm-memory's `GuestMemoryAtomic::memory()` snapshot, in one word). For accesses,
    /// prefer [`Window::guest_memory`], which holds this guard.
    pub fn pin(&self) -> BaseGuard<'_> {
        let key = self.pin_key();
        // A thread being torn down has no list: its pins go uncounted (it forks nothing).
        let _ = PINNED_HERE.try_with(|p| p.borrow_mut().push(key));
        BaseGuard {
            base: self.base.read_recursive(),
            key,
            _not_send: std::marker::PhantomData,
        }
    }

    /// Guest RAM as a vm-memory `GuestMemoryBackend`, pinned at its current host range for
    /// the life of the view (see [`crate::memory`] for the rules: short-lived, never on the
    /// fault-handler thread).
    pub fn guest_memory(&self) -> GuestRam<'_> {
        GuestRam::new(self)
    }

    /// Whether the calling thread holds a pin of this window ([`Window::pin`], or a
    /// [`GuestRam`] view): a swap of its range on this thread would wait for itself.
    pub(crate) fn pinned_here(&self) -> bool {
        let key = self.pin_key();
        PINNED_HERE
            .try_with(|p| p.borrow().contains(&key))
            .unwrap_or(false)
    }

    /// This window's name in [`PINNED_HERE`]: the address of its base lock (stable: a pin
    /// borrows the window).
    fn pin_key(&self) -> usize {
        std::ptr::from_ref(&self.base) as usize
    }

    /// Whether some thread pins the base (a swap would have to wait).
    #[cfg(test)]
    pub(crate) fn base_is_pinned(&self) -> bool {
        self.base.try_write().is_none()
    }

    /// Lets a faulting access to `page` (a host address) of a failed VM complete on
    /// private memory, if `page` is inside the window's current range; returns whether
    /// it was. Anything else is left alone: it may be a retired or fresh range that the
    /// userfaultfd still covers, or addresses already reused by another mapping.
    pub fn release_page(&self, page: u64) -> bool {
        let g = self.pin();
        let Some(off) = page.checked_sub(g.base()) else {
            return false;
        };
        if off >= self.size {
            return false;
        }
        // SAFETY: `page` is a page of this window's current range (checked under the
        // guard, which keeps the range from being swapped), which the window owns; the
        // failed VM no longer uses it for guest memory, and no Rust reference points into
        // guest RAM.
        unsafe { mman::make_hole(page & !(PAGE - 1), PAGE) }.is_ok()
    }

    /// Tells the window which KVM memslot it backs (the whole window, at gpa 0), so that
    /// `protect_for_fork` may move the memslot onto a fresh window instead of
    /// write-protecting every populated page. Only a weak reference is kept.
    pub fn bind_memslot(&self, vm: &Arc<VmFd>, slot: u32) {
        *self.memslot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Memslot {
            vm: Arc::downgrade(vm),
            slot,
        });
    }

    /// Whether something writable was mapped since the window was created or last given
    /// a fresh range (a fork must then stop the VM from writing its pages).
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Relaxed)
    }

    /// How many times a fork gave this window a fresh range.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    /// Reserves a fresh, all-holes range the size of this window, registered with its
    /// userfaultfd, for [`Window::commit_fresh`]. Dropping it unreserves it.
    pub fn prepare_fresh(&self) -> Result<FreshRange, WindowError> {
        let addr = mman::reserve(self.size)? as u64;
        let fresh = FreshRange {
            addr,
            size: self.size,
        };
        self.uffd.register(addr, self.size)?;
        Ok(fresh)
    }

    /// Makes `fresh` this window (the caller has pointed memslot `slot` of `vm` at it) and
    /// returns the old range, which the caller must retire with [`retire`] once no KVM VM
    /// uses it. The VM must be paused: nothing may access guest RAM meanwhile.
    pub fn commit_fresh(&self, fresh: FreshRange, vm: &Arc<VmFd>, slot: u32) -> (u64, u64) {
        let mut base = self.base.write();
        self.commit_locked(&mut base, fresh, vm, slot)
    }

    fn commit_locked(
        &self,
        base: &mut u64,
        fresh: FreshRange,
        vm: &Arc<VmFd>,
        slot: u32,
    ) -> (u64, u64) {
        let old = std::mem::replace(base, fresh.addr);
        std::mem::forget(fresh);
        self.dirty.store(false, Ordering::Relaxed);
        self.swaps.fetch_add(1, Ordering::Relaxed);
        // A fresh range is one hole: one mapping.
        self.mappings.store(1, Ordering::Relaxed);
        self.bind_memslot(vm, slot);
        (old, self.size)
    }

    /// Whether a fork of the VM may give it a fresh window (true, the default) or must
    /// write-protect this one in place ([`crate::ParentMode::InPlace`]).
    pub fn set_swap_on_fork(&self, on: bool) {
        self.swap_on_fork.store(on, Ordering::Relaxed);
    }

    /// Moves the bound memslot onto a fresh, all-holes reservation and retires the old
    /// range. `Ok(false)`: no memslot bound (the caller write-protects instead).
    fn swap_fresh(&self) -> Result<bool, WindowError> {
        let (vm, slot) = {
            let guard = self.memslot.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref().and_then(|m| Some((m.vm.upgrade()?, m.slot))) {
                Some(b) => b,
                None => return Ok(false),
            }
        };
        // A view held by the forking thread would make the wait below a sure timeout.
        if self.pinned_here() {
            return Ok(false);
        }
        let fresh = self.prepare_fresh()?;
        let set = |addr: u64, size: u64| set_memslot(&vm, slot, addr, size);
        // Called by `AddressSpace::fork` with the space's lock held: a host accessor that
        // holds a pin and faults would wait for that lock, so do not wait for it here
        // either; the caller write-protects instead.
        let Some(mut base) = self
            .base
            .try_write_for(std::time::Duration::from_millis(10))
        else {
            return Ok(false);
        };
        let old = *base;
        // KVM cannot change a memslot's host address in place: delete, then re-create.
        // Deleting zaps KVM's mappings of the slot, about 13 ms per populated GiB here;
        // `Vm::rebirth` (a fresh VM for the parent) avoids even that.
        if let Err(e) = set(old, 0).and_then(|()| set(fresh.addr, self.size)) {
            // Put the old binding back (best effort); dropping `fresh` unreserves it.
            let _ = set(old, self.size);
            return Err(e);
        }
        let (old, len) = self.commit_locked(&mut base, fresh, &vm, slot);
        drop(base);
        retire(old, len);
        Ok(true)
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

    /// The host address of `gpa .. gpa + len` in the pinned range, if inside guest RAM.
    fn check(
        &self,
        g: &BaseGuard<'_>,
        what: &'static str,
        gpa: Gpa,
        len: u64,
    ) -> Result<u64, WindowError> {
        match gpa.0.checked_add(len) {
            Some(end) if end <= self.size => Ok(g.base() + gpa.0),
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
        g: &BaseGuard<'_>,
        op: &'static str,
        gfn: Gfn,
        pages: u64,
    ) -> Result<(u64, u64), HostMmuError> {
        let len = pages.saturating_mul(PAGE);
        // A page number with no 64-bit address is outside any window (not wrapped into it).
        let gpa = gfn.checked_gpa().unwrap_or(Gpa(u64::MAX));
        self.check(g, op, gpa, len)
            .map(|a| (a, len))
            .map_err(|e| HostMmuError {
                op,
                gfn,
                pages,
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })
    }

    /// Sets the most host mappings the window may hold (see [`Window::default_map_budget`]).
    pub fn set_map_budget(&self, budget: u64) {
        self.map_budget.store(budget.max(1), Ordering::Relaxed);
    }

    /// The window's mapping budget.
    pub fn map_budget(&self) -> u64 {
        self.map_budget.load(Ordering::Relaxed)
    }

    /// Claims room for one mapping change (at most two new host mappings) under the
    /// budget, recounting the real mappings when the estimate passes it.
    fn claim_mappings(&self, op: &'static str, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        let budget = self.map_budget();
        let estimate = self.mappings.fetch_add(2, Ordering::Relaxed) + 2;
        if estimate <= budget {
            return Ok(());
        }
        // Counting costs a read of /proc/self/maps: only when the estimate says so.
        let used = self.host_mappings().unwrap_or(estimate - 2);
        self.mappings.store(used + 2, Ordering::Relaxed);
        if used + 2 <= budget {
            return Ok(());
        }
        self.mappings.store(used, Ordering::Relaxed);
        Err(mmu_err(
            op,
            gfn,
            pages,
            WindowError::MapBudget { used, budget },
        ))
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

    /// Reads the 8-byte word at `gpa` rounded down to 8 from the host side, through the
    /// vm-memory view ([`GuestRam::read_u64`]). A hole raises a userfaultfd fault on the
    /// calling thread, resolved by the VM's fault handler (so never call it on that
    /// thread). The view pins the window: a fork's swap of its range waits for the read.
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, WindowError> {
        self.guest_memory().read_u64(gpa)
    }

    /// Writes `bytes` at `gpa` from the host side, through the vm-memory view
    /// ([`GuestRam::write_bytes`]; faults as [`Window::read_u64`]).
    pub fn write_bytes(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), WindowError> {
        self.guest_memory().write_bytes(gpa, bytes)
    }

    /// Writes the 8-byte words `words` starting at `gpa` rounded down to 8, through the
    /// vm-memory view ([`GuestRam::write_u64s`]; faults as [`Window::read_u64`]).
    pub fn write_u64s(&self, gpa: Gpa, words: &[u64]) -> Result<(), WindowError> {
        self.guest_memory().write_u64s(gpa, words)
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
        let g = self.pin();
        let (addr, len) = (g.base(), self.size);
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

/// A host-view error, its cause kept typed inside the `io::Error` (see
/// [`host_mmu_limit`]).
fn mmu_err(op: &'static str, gfn: Gfn, pages: u64, e: impl Into<WindowError>) -> HostMmuError {
    HostMmuError {
        op,
        gfn,
        pages,
        source: io::Error::other(e.into()),
    }
}

/// Whether a host-view error from a [`Window`] was a host limit (the mapping limit).
pub fn host_mmu_limit(e: &HostMmuError) -> bool {
    e.source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<WindowError>())
        .is_some_and(WindowError::is_host_limit)
}

impl WindowError {
    /// Whether this is a host limit the user can raise (mappings, memory for memfds)
    /// rather than a fault of the VM.
    pub fn is_host_limit(&self) -> bool {
        matches!(self, WindowError::Mman(e) if e.is_host_limit())
    }
}

impl HostMmu for Window {
    /// All or nothing, and a read-only run is never writable: it is mapped `PROT_READ`,
    /// registered and write-protected with userfaultfd, and only then made `PROT_WRITE`
    /// (the write-protection holds). A guest write in between gets `EFAULT` from
    /// `KVM_RUN`, which the vCPU loop retries while such a mapping is in flight
    /// ([`ro_map_state`]). On any error the run is made a hole again.
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError> {
        let g = self.pin();
        let (addr, len) = self.check_run(&g, "map_run", run.gfn, run.pages)?;
        self.claim_mappings("map_run", run.gfn, run.pages)?;
        let err = |e: WindowError| mmu_err("map_run", run.gfn, run.pages, e);
        let read_only = !run.writable;
        if read_only {
            ro_map_begin();
        }
        let result = (|| {
            // SAFETY: the range is inside the window (checked), which this Window owns; no
            // Rust reference points into guest RAM (all access is volatile through raw
            // pointers).
            unsafe {
                mman::map_shared_fixed_prot(addr, len, run.fd, run.file_offset, run.writable, true)
            }
            .map_err(|e| err(e.into()))?;
            if self.takes_hinting_faults() {
                self.uffd.register_minor(addr, len)
            } else {
                self.uffd.register(addr, len)
            }
            .map_err(|e| err(e.into()))?;
            if read_only {
                self.uffd
                    .write_protect(addr, len, true)
                    .map_err(|e| err(e.into()))?;
                // SAFETY: as above.
                unsafe { mman::make_writable(addr, len) }.map_err(|e| err(e.into()))?;
            } else {
                self.dirty.store(true, Ordering::Relaxed);
            }
            Ok(())
        })();
        if read_only {
            ro_map_end();
        }
        if result.is_err() {
            // Leave nothing of the run: the manager frees or keeps its frames, and any
            // access faults back to it.
            let _ = self.unmap_pinned(&g, run.gfn, run.pages);
        }
        result
    }

    /// The new hole is inaccessible until it is registered with userfaultfd, so that no
    /// guest access can populate it behind the manager's back (a vCPU meanwhile gets
    /// `EFAULT`, retried as for read-only runs).
    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.unmap_pinned(&self.pin(), gfn, pages)
    }

    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<(), HostMmuError> {
        let g = self.pin();
        let (addr, len) = self.check_run(&g, "protect_run", gfn, pages)?;
        if writable {
            self.dirty.store(true, Ordering::Relaxed);
        }
        self.uffd
            .write_protect(addr, len, !writable)
            .map_err(|e| mmu_err("protect_run", gfn, pages, e))
    }

    /// `UFFDIO_CONTINUE` of the run's memfd pages, write-protected unless `writable`
    /// (a copy-on-write page stays protected); `Ok(false)` if the window takes no
    /// hinting faults. Pages already mapped again are left as they are.
    ///
    /// The hinting fault may be older than the run's last host change: a move to another
    /// node (or a fork's fresh window) made the range a hole after the fault was queued,
    /// and the manager's entry is present again with no host mapping behind it yet. The
    /// kernel then refuses (`EINVAL`: no memfd mapping there; `EFAULT`/`ENOENT`: no page
    /// in it), and this returns `Ok(false)`: the woken access faults again on the hole,
    /// and that fault maps the page.
    fn restore_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<bool, HostMmuError> {
        if !self.takes_hinting_faults() {
            return Ok(false);
        }
        let g = self.pin();
        let (addr, len) = self.check_run(&g, "restore_run", gfn, pages)?;
        match self.uffd.continue_range(addr, len, !writable) {
            Ok(_) => Ok(true),
            Err(UffdError::Ioctl { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EINVAL | libc::EFAULT | libc::ENOENT)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(mmu_err("restore_run", gfn, pages, e)),
        }
    }

    /// See [`Window::harvest_accessed`]; always `Ok(true)`.
    fn harvest_accessed(
        &self,
        gfn: Gfn,
        pages: u64,
        out: &mut Vec<u64>,
    ) -> Result<bool, HostMmuError> {
        Window::harvest_accessed(self, gfn, pages, out)
            .map(|()| true)
            .map_err(|e| mmu_err("harvest_accessed", gfn, pages, e))
    }

    /// See the module docs: a clean window needs nothing; a window bound to a memslot is
    /// swapped for a fresh one; otherwise the run is write-protected. The VM must be
    /// paused (no vCPU in guest mode, no fault in flight).
    fn protect_for_fork(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        crate::failpoint::hit(crate::failpoint::ForkStep::ProtectForFork).map_err(|e| {
            mmu_err(
                "protect_for_fork",
                gfn,
                pages,
                UffdError::Ioctl {
                    op: "UFFDIO_WRITEPROTECT",
                    start: self.host_base() + gfn.gpa().0,
                    len: pages * PAGE,
                    source: crate::failpoint::io(e),
                },
            )
        })?;
        let whole = gfn == Gfn(0) && pages == self.pages();
        if whole && !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        if whole
            && self.swap_on_fork.load(Ordering::Relaxed)
            && self
                .swap_fresh()
                .map_err(|e| mmu_err("protect_for_fork", gfn, pages, e))?
        {
            return Ok(());
        }
        self.protect_run(gfn, pages, false)
    }
}

impl Window {
    /// `unmap_run` under a pin the caller holds.
    fn unmap_pinned(&self, g: &BaseGuard<'_>, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        let (addr, len) = self.check_run(g, "unmap_run", gfn, pages)?;
        if gfn == Gfn(0) && pages == self.pages() {
            // The whole window becomes one hole: one mapping (never refused).
            self.mappings.store(1, Ordering::Relaxed);
        } else {
            // A hole never needs more mappings than the budget allows the window: an
            // unmap that would pass it is still made (it must be, to fail closed), and
            // the next map_run is refused instead.
            let _ = self.claim_mappings("unmap_run", gfn, pages);
        }
        ro_map_begin();
        let result = (|| {
            // SAFETY: as in map_run.
            unsafe { mman::make_hole_inaccessible(addr, len) }
                .map_err(|e| mmu_err("unmap_run", gfn, pages, e))?;
            self.uffd
                .register(addr, len)
                .map_err(|e| mmu_err("unmap_run", gfn, pages, e))?;
            // SAFETY: as in map_run.
            unsafe { mman::make_writable(addr, len) }
                .map_err(|e| mmu_err("unmap_run", gfn, pages, e))
        })();
        ro_map_end();
        result
    }
}

/// A pinned window range (see [`Window::pin`]). Not `Send`: it is released on the thread
/// that took it, which counts it as pinned by that thread.
#[derive(Debug)]
pub struct BaseGuard<'a> {
    base: RwLockReadGuard<'a, u64>,
    key: usize,
    /// `!Send` whatever lock_api's guard features are (a `MutexGuard` is `!Send`, `Sync`).
    _not_send: std::marker::PhantomData<std::sync::MutexGuard<'static, ()>>,
}

impl BaseGuard<'_> {
    /// Host address of guest-physical 0, stable while the guard lives.
    pub fn base(&self) -> u64 {
        *self.base
    }
}

impl Drop for BaseGuard<'_> {
    fn drop(&mut self) {
        let _ = PINNED_HERE.try_with(|p| {
            let mut p = p.borrow_mut();
            if let Some(i) = p.iter().rposition(|&k| k == self.key) {
                p.swap_remove(i);
            }
        });
    }
}

thread_local! {
    /// The windows (by [`Window::pin_key`]) whose base this thread pins, one entry per
    /// live [`BaseGuard`]: a fork on this thread must not wait to swap one of them.
    static PINNED_HERE: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Host-view changes in flight that leave a guest range briefly inaccessible for writes
/// (a read-only run between its `PROT_READ` mapping and its write-protected `PROT_WRITE`
/// state, or a new hole before it is registered), in every window of the process.
static RO_MAP_IN_FLIGHT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Bumped each time such a change completes.
static RO_MAP_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Marks the start of a change that makes a guest range refuse writes for a moment (see
/// [`ro_map_state`]). Pair with [`ro_map_end`].
pub fn ro_map_begin() {
    // AcqRel: pairs with the Acquire loads in `ro_map_state` of a vCPU thread.
    RO_MAP_IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
}

/// Marks the end of a change begun with [`ro_map_begin`].
pub fn ro_map_end() {
    // Generation first, so that a vCPU that sees no change in flight also sees that one
    // completed since it entered the guest. AcqRel: pairs with `ro_map_state`.
    RO_MAP_GEN.fetch_add(1, Ordering::AcqRel);
    RO_MAP_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
}

/// `(changes in flight, completed changes)`. A vCPU whose `KVM_RUN` fails with `EFAULT`
/// retries when a change is in flight or one completed during the run, and reports a
/// crash otherwise.
pub fn ro_map_state() -> (u64, u64) {
    (
        RO_MAP_IN_FLIGHT.load(Ordering::Acquire),
        RO_MAP_GEN.load(Ordering::Acquire),
    )
}

/// A fresh window range from [`Window::prepare_fresh`], not yet committed.
#[derive(Debug)]
pub struct FreshRange {
    addr: u64,
    size: u64,
}

impl FreshRange {
    /// Its host address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
}

impl Drop for FreshRange {
    fn drop(&mut self) {
        // SAFETY: an uncommitted reservation nothing (no memslot, no window) refers to.
        unsafe { mman::unmap(self.addr as *mut u8, self.size) };
    }
}

/// Points memslot `slot` of `vm` (at gpa 0) at `addr .. addr + size`; size 0 deletes it.
pub(crate) fn set_memslot(vm: &VmFd, slot: u32, addr: u64, size: u64) -> Result<(), WindowError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: addr,
    };
    // SAFETY: callers pass a window range they own and keep mapped while the memslot points
    // at it (a retired range is unmapped only after the memslot moved or its VM is gone).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| WindowError::Memslot(io::Error::from_raw_os_error(e.errno())))
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the window owns this mapping; the VM (memslot, vCPUs) that used it is gone
        // before the Window is dropped (Vm field order).
        unsafe { mman::unmap(self.host_base() as *mut u8, self.size) };
    }
}

//! Guest address spaces: the `mm_struct` of a VM.
//!
//! An [`AddressSpace`] holds a VM's RAM regions, each with a page table (gfn -> frame)
//! and an anon_vma chain (its reverse-map side). It resolves faults (first touch with
//! fault-around, copy-on-write with reuse when it is the frame's only user, re-mapping of
//! present pages into the host view), forks copy-on-write, and exits returning every
//! frame. A [`Manager`] owns the pool, the reverse-map context and the global counters
//! that all address spaces share.
//!
//! Invariants kept here (checked by the model tests):
//! - a frame mapped by more than one page-table entry is writable in none of them, so a
//!   write always faults and copies (or reuses, once it is down to one mapper);
//! - a frame's mapcount equals the number of present entries naming it, and its refcount
//!   equals its mapcount plus transient holders;
//! - a frame that leaves its last mapper goes back to the pool, with its rmap link
//!   released, and is zeroed before any next owner sees it (the pool's rule).
//!
//! The host view ([`HostMmu`]) is told about mapping changes with the block lock held.
//! A fork write-protects the parent's host view at once but fills the child's lazily:
//! the child's first access to a page faults, finds the entry present and maps it (and
//! its contiguous neighbours) read-only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::charge::{Charge, ChargeError, ChargeSnapshot};
use crate::frame::Frame;
use crate::mmu::{HostMmu, HostMmuError};
use crate::pagetable::{PageTable, Poisoned, Pte, Slot};
use crate::pool::AllocError;
use crate::sync::MutexGuard;
use crate::types::{Gfn, Gpa, PAGE_SIZE, VmId};

mod balance;
mod counters;
mod fault;
mod fork;
mod harvest;
mod manager;
mod migrate;
mod policy;
mod reclaim;
mod streams;
mod swapin;

pub use balance::{BalanceConfig, BalanceStats, Balancer};
pub use counters::{CounterSnapshot, Counters};
pub use fork::ChildOptions;
pub use manager::{CowRun, Manager, ManagerConfig, Referenced, ReferencedLocking};
pub use migrate::{MIGRATE_RUN, MigrateStats, MigrateWalk};
pub use policy::{NodePolicy, home_node, set_home_node};
pub use reclaim::{AttachError, ShrinkResult, SwapState, UNMAP_SPAN};

/// The largest region: 1 TiB of 4 KiB pages.
pub const MAX_REGION_PAGES: u64 = 1 << 28;

/// The handle the reverse maps keep for a region: enough to find and lock its entries.
pub type RegionHandle = Arc<RegionPt>;
type AnonVma = rmap::AnonVma<RegionHandle>;

/// Errors of address-space operations. Each is returned to the VM that caused it; other
/// VMs are not affected.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// A node the pool does not have.
    #[error("{node} does not exist: the frame pool has {nodes} node(s), numbered from 0")]
    NoSuchNode {
        /// The node asked for.
        node: crate::types::NodeId,
        /// Nodes in the pool.
        nodes: usize,
    },
    /// The page is in no RAM region of the VM.
    #[error("{gfn} is outside every RAM region of {vm}: check the guest's memory size")]
    OutOfRange {
        /// The VM.
        vm: VmId,
        /// The page.
        gfn: Gfn,
    },
    /// The pool could not give the VM a frame.
    #[error("{vm} needs a frame: {source}")]
    Alloc {
        /// The VM.
        vm: VmId,
        /// Why not.
        #[source]
        source: AllocError,
    },
    /// The host view could not follow a mapping change.
    #[error("{vm}: {source}")]
    Host {
        /// The VM.
        vm: VmId,
        /// The host's error.
        #[source]
        source: HostMmuError,
    },
    /// Linking the reverse maps failed (allocation failure while forking).
    #[error("{vm}: could not link the reverse maps ({source}); the VM is unchanged")]
    Rmap {
        /// The VM.
        vm: VmId,
        /// The rmap error.
        #[source]
        source: rmap::RmapError,
    },
    /// A region is empty, overlaps another, or does not fit in guest-physical space.
    #[error("bad RAM region at {start} of {pages} pages: {why}")]
    BadRegion {
        /// First page.
        start: Gfn,
        /// Pages.
        pages: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The VM has exited.
    #[error("{0} has exited")]
    Exited(VmId),
    /// The VM's frame account refused the allocation: its limit, or frames reserved for
    /// other VMs.
    #[error(transparent)]
    Charge(#[from] ChargeError),
    /// A swapped-out page could not be read back: the VM's copy of it is lost.
    #[error(
        "{vm}: a swapped-out page could not be read back ({source}); the VM cannot go on: check the swap file's disk"
    )]
    Swap {
        /// The VM.
        vm: VmId,
        /// The device's error.
        #[source]
        source: crate::reclaim::swap::SwapError,
    },
    /// Out of memory with swap: the allocation failed, and reclaim (swap-out included)
    /// could not free a frame for it.
    #[error(
        "{vm} is out of memory: {source}; reclaim could not free a frame for it (the swap file has {swap_used} of {swap_slots} slots in use{stopped}): give the VM a larger limit, more host memory (--host-memory) or a larger swap file"
    )]
    OutOfMemory {
        /// The VM.
        vm: VmId,
        /// The allocation's failure.
        source: Box<SpaceError>,
        /// Swap slots in use.
        swap_used: u64,
        /// Swap slots in the file.
        swap_slots: u64,
        /// Why swap-out stopped, if it did (as `", ..."`, or empty).
        stopped: String,
    },
    /// A fault kept finding its page being read by another fault (or moved to another
    /// node), far longer than any read or move takes.
    #[error("{vm}: a fault waited for a swap-in or a page move that never finished")]
    SwapStuck {
        /// The VM.
        vm: VmId,
    },
    /// A lock of the VM's memory was poisoned: a panic interrupted an update of it, so
    /// its state cannot be trusted. The VM is failed; its frames are kept, not reused.
    #[error(
        "{vm}'s {lock} lock was poisoned by a panic in an earlier operation; the VM's memory can no longer be trusted: destroy the VM"
    )]
    Poisoned {
        /// The VM.
        vm: VmId,
        /// Which lock: "page-table" or "mmap".
        lock: &'static str,
    },
}

/// A kind of guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read (or instruction fetch).
    Read,
    /// A write.
    Write,
}

/// What a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// First touch: `pages` zero-filled frames mapped (more than 1 with fault-around).
    ZeroFill {
        /// Pages mapped.
        pages: u64,
    },
    /// A write to a shared page copied it, or the run of `pages` around it, into new
    /// frames.
    CowCopy {
        /// Pages copied.
        pages: u64,
    },
    /// A write to a write-protected page whose only user is this VM made it writable,
    /// with the `pages - 1` entries after it that were this VM's alone too.
    CowReuse {
        /// Pages made writable without a copy.
        pages: u64,
    },
    /// The page was present in the manager; the host view got `pages` pages mapped.
    MapExisting {
        /// Pages mapped into the host view.
        pages: u64,
    },
}

/// Memory use of one VM, like smem's columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MemoryUsage {
    /// Pages backed by a frame.
    pub resident: u64,
    /// Resident pages whose frame other mappings share.
    pub shared: u64,
    /// Resident pages whose frame only this VM maps.
    pub private: u64,
    /// Proportional set size in pages: each frame counted 1/mapcount.
    pub pss: f64,
    /// Pages swapped out (entries naming a swap slot).
    pub swapped: u64,
}

/// A RAM region to create: `pages` guest pages from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// First guest page.
    pub start: Gfn,
    /// Pages.
    pub pages: u64,
}

/// A region's page table and identity: what the reverse maps point at.
#[derive(Debug)]
pub struct RegionPt {
    vm: VmId,
    start: Gfn,
    table: PageTable,
    mmu: Arc<dyn HostMmu>,
    /// Pages the host view may map: set by every `map_run` of the manager, cleared only
    /// by reclaim's unmap, so a clear bit means the view cannot map the page (every host
    /// mapping is the manager's, made under the entry's block lock, as the bit changes).
    host_mapped: HostMapped,
}

/// A bit per page of a region (see `RegionPt::host_mapped`). Atomic words for `Sync`;
/// every change is made under the page's block lock, so `Relaxed` is enough.
#[derive(Debug)]
struct HostMapped(Box<[AtomicU64]>);

impl HostMapped {
    fn new(pages: u64) -> HostMapped {
        HostMapped((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn update(&self, first: u64, pages: u64, set: bool) {
        for i in first..first + pages {
            let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
            if set {
                self.0[w].fetch_or(b, Ordering::Relaxed);
            } else {
                self.0[w].fetch_and(!b, Ordering::Relaxed);
            }
        }
    }

    fn any(&self, first: u64, pages: u64) -> bool {
        (first..first + pages)
            .any(|i| self.0[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }
}

impl RegionPt {
    /// The VM owning the region.
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// The region's first guest page.
    pub fn start(&self) -> Gfn {
        self.start
    }

    /// The region's page table.
    pub fn table(&self) -> &PageTable {
        &self.table
    }

    /// The VM's host view.
    pub fn mmu(&self) -> &Arc<dyn HostMmu> {
        &self.mmu
    }

    /// The page offset (the rmap key) of entry `index`.
    pub fn pgoff(&self, index: u64) -> u64 {
        self.start.0 + index
    }

    fn gfn(&self, index: u64) -> Gfn {
        self.start.offset(index)
    }

    /// A region's table and view, nothing yet mapped in the view.
    fn new(vm: VmId, start: Gfn, table: PageTable, mmu: Arc<dyn HostMmu>) -> RegionPt {
        let host_mapped = HostMapped::new(table.pages());
        RegionPt {
            vm,
            start,
            table,
            mmu,
            host_mapped,
        }
    }
}

/// A RAM region: its page table plus its anon_vma chain.
#[derive(Debug)]
struct Region {
    pt: RegionHandle,
    rmap: rmap::RegionRmap<RegionHandle>,
}

impl Region {
    fn contains(&self, gfn: Gfn) -> bool {
        gfn.0.wrapping_sub(self.pt.start.0) < self.pt.table.pages()
    }
}

/// [`AddressSpace::cow_hint`] packed in a u64: the gfn just after the last copy-on-write
/// run, and the length of the private run that ends there (at most 1023 pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CowHint {
    end: Gfn,
    behind: u64,
}

impl CowHint {
    const LEN_BITS: u32 = 10;
    const LEN_MASK: u64 = (1 << Self::LEN_BITS) - 1;

    fn pack(self) -> u64 {
        self.end.0 << Self::LEN_BITS | self.behind.min(Self::LEN_MASK)
    }

    fn unpack(v: u64) -> CowHint {
        CowHint {
            end: Gfn(v >> Self::LEN_BITS),
            behind: v & Self::LEN_MASK,
        }
    }
}

// Runs never exceed a block, so a block's length fits the hint; gfns are below 2^52.
const _: () = assert!(crate::pagetable::PTES_PER_BLOCK as u64 <= CowHint::LEN_MASK);

/// The regions of a VM, under its `mmap_lock`.
#[derive(Debug, Default)]
struct Regions {
    list: Vec<Region>,
    exited: bool,
}

/// One VM's guest memory (see the module docs).
#[derive(Debug)]
pub struct AddressSpace {
    id: VmId,
    mm: Arc<Manager>,
    mmu: Arc<dyn HostMmu>,
    /// The mmap_lock: read for faults and accesses, write for fork and exit.
    regions: RwLock<Regions>,
    counters: Counters,
    exited: AtomicBool,
    /// The frames it allocated, its limit and reservation.
    charge: Arc<Charge>,
    /// Where the last copy-on-write run ended and how long the private run ending there
    /// is ([`CowHint`]), so a sequential rewrite keeps its run size across page-table
    /// blocks ([`CowRun::Adaptive`]). A hint only: racing vCPUs may overwrite it.
    cow_hint: AtomicU64,
    /// Where sequential first touches are going, so their runs grow ([`streams`]).
    streams: streams::Streams,
    /// Guest page ranges kept resident ([`AddressSpace::mlock`]); inherited by forks.
    mlocked: RwLock<Vec<std::ops::Range<u64>>>,
    /// Where its new frames come from; inherited by forks.
    policy: policy::PolicyState,
    /// Its home node and NUMA balancing marks ([`AddressSpace::balance_scan`]).
    numa: balance::NumaState,
}

impl AddressSpace {
    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.id
    }

    /// The manager.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.mm
    }

    /// The VM's own counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// The RAM regions, as created.
    pub fn regions(&self) -> Vec<RegionSpec> {
        // The list never changes after creation: a poisoned lock still guards it whole.
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .list
            .iter()
            .map(|r| RegionSpec {
                start: r.pt.start,
                pages: r.pt.table.pages(),
            })
            .collect()
    }

    /// The VM's frame account: frames charged to it, its limit, its reservation.
    pub fn charge(&self) -> ChargeSnapshot {
        self.charge.snapshot()
    }

    /// Sets or clears the VM's frame limit (`memory.max`). An allocation that would take
    /// the VM past it fails with [`ChargeError::Limit`], for this VM alone; a limit below
    /// what is charged now takes nothing away, it refuses further allocations.
    pub fn set_limit(&self, frames: Option<u64>) {
        self.charge.set_limit(frames);
    }

    /// Reserves `frames` more frames of the pool for this VM: no other VM can take them.
    pub fn reserve(&self, frames: u64) -> Result<(), SpaceError> {
        Ok(self.mm.charges.reserve(&self.charge, frames)?)
    }

    /// The regions under the mmap_lock (read); a lock poisoned by a panic in a fork or
    /// exit fails the VM.
    fn read_regions(&self) -> Result<RwLockReadGuard<'_, Regions>, SpaceError> {
        self.regions.read().map_err(|_| self.poisoned("mmap"))
    }

    fn poisoned(&self, lock: &'static str) -> SpaceError {
        SpaceError::Poisoned { vm: self.id, lock }
    }

    /// Locks the block of entry `index` of `region`.
    fn lock_entry<'r>(
        &self,
        region: &'r Region,
        index: u64,
    ) -> Result<(MutexGuard<'r, Slot>, usize), SpaceError> {
        region
            .pt
            .table
            .lock(index)
            .map_err(|Poisoned| self.poisoned("page-table"))
    }

    fn find<'a>(&self, regions: &'a Regions, gfn: Gfn) -> Result<&'a Region, SpaceError> {
        if regions.exited {
            return Err(SpaceError::Exited(self.id));
        }
        regions
            .list
            .iter()
            .find(|r| r.contains(gfn))
            .ok_or(SpaceError::OutOfRange { vm: self.id, gfn })
    }

    /// Copies `buf.len()` bytes from guest-physical `gpa` (faulting pages in as a read).
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), SpaceError> {
        let mut done = 0;
        self.access(gpa, buf.len(), Access::Read, |page, off, n| {
            // SAFETY: `page` points to a frame of PAGE_SIZE bytes mapped readable by this
            // VM, its block locked by `access`; `off + n <= PAGE_SIZE`; `buf` has room.
            unsafe { std::ptr::copy_nonoverlapping(page.add(off), buf.as_mut_ptr().add(done), n) };
            done += n;
        })
    }

    /// Copies `data` to guest-physical `gpa` (faulting pages in as a write).
    pub fn write(&self, gpa: Gpa, data: &[u8]) -> Result<(), SpaceError> {
        let mut done = 0;
        self.access(gpa, data.len(), Access::Write, |page, off, n| {
            // SAFETY: `page` points to a frame mapped writable by this VM alone (a writable
            // entry is its frame's only mapping), its block locked by `access`.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), page.add(off), n) };
            done += n;
        })
    }

    /// Walks `len` bytes from `gpa` page by page; for each, makes the entry satisfy
    /// `access` and calls `f(page pointer, offset in page, bytes)` with its block locked.
    fn access(
        &self,
        gpa: Gpa,
        len: usize,
        access: Access,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), SpaceError> {
        let mut at = gpa.0;
        let end = gpa
            .0
            .checked_add(len as u64)
            .ok_or(SpaceError::OutOfRange {
                vm: self.id,
                gfn: gpa.gfn(),
            })?;
        while at < end {
            let here = Gpa(at);
            let n = (PAGE_SIZE - here.page_offset()).min((end - at) as usize);
            self.resolve(|| {
                let regions = self.read_regions()?;
                let region = self.find(&regions, here.gfn())?;
                let index = here.gfn().0 - region.pt.start.0;
                let (mut slot, s) = self.lock_entry(region, index)?;
                if !Self::satisfied(slot.effective(s), access) {
                    if let Err(p) = self.fault_locked(region, &mut slot, index, access)? {
                        if matches!(p, swapin::Pending::Read { .. }) {
                            self.counters.add(&self.counters.major_faults, 1);
                        }
                        return Ok(Err(p));
                    }
                }
                self.touch_locked(&mut slot, s, access, here.page_offset(), n, &mut f);
                Ok(Ok(()))
            })?;
            at += n as u64;
        }
        Ok(())
    }

    /// The end of [`AddressSpace::access`] for one page whose entry satisfies `access`,
    /// its block locked: marks it young (and dirty) and calls `f` on its bytes.
    fn touch_locked(
        &self,
        slot: &mut Slot,
        s: usize,
        access: Access,
        off: usize,
        n: usize,
        f: &mut impl FnMut(*mut u8, usize, usize),
    ) {
        {
            let pfn = slot
                .pte(s)
                .pfn()
                .expect("fault_locked made the entry present");
            // A read through a block shared by a fork leaves it shared: its young state
            // goes to the block's bitmap (a write made the block this VM's own).
            slot.mark_accessed(s, access == Access::Write);
            f(self.mm.pool.page_ptr(pfn), off, n);
        }
    }

    /// The VM's memory use now.
    ///
    /// A frame named by one page-table block only (mapcount 1) is mapped by exactly the
    /// VMs sharing that block; a frame named by several blocks has the VMs mapping it
    /// counted through the reverse map (exact, at the cost of a walk per such frame).
    ///
    /// Blocks whose lock is poisoned are left out (their entries cannot be trusted).
    pub fn memory(&self) -> MemoryUsage {
        // The region list never changes after creation: a poisoned lock still guards it.
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let mut u = MemoryUsage::default();
        let mut maybe_shared = Vec::new();
        for r in &regions.list {
            for b in 0..r.pt.table.blocks() {
                let Ok(slot) = r.pt.table.lock_block(b) else {
                    continue;
                };
                let sharers = slot.sharers() as u32;
                for s in 0..r.pt.table.block_len(b) {
                    let pte = slot.pte(s);
                    if swapin::swap_slot(pte).is_some() {
                        u.swapped += 1;
                    }
                    if let Some(pfn) = pte.frame() {
                        u.resident += 1;
                        // A frame named by this block only: the VMs sharing the block are
                        // exactly the VMs mapping it.
                        if self.mm.pool.frame(pfn).mapcount() == 1 {
                            if sharers <= 1 {
                                u.private += 1;
                            } else {
                                u.shared += 1;
                            }
                            u.pss += 1.0 / f64::from(sharers.max(1));
                        } else {
                            maybe_shared.push(pfn);
                        }
                    }
                }
            }
        }
        drop(regions);
        for pfn in maybe_shared {
            let n = self.mm.mappers(pfn).max(1);
            if n > 1 {
                u.shared += 1;
            } else {
                u.private += 1;
            }
            u.pss += 1.0 / f64::from(n);
        }
        u
    }

    /// The entry for `gfn` as this VM may use it now (for tests and tools).
    pub fn pte(&self, gfn: Gfn) -> Result<Pte, SpaceError> {
        Ok(self.entry(gfn)?.pte)
    }

    /// The entry for `gfn` and the block holding it (for tests and tools).
    pub fn entry(&self, gfn: Gfn) -> Result<EntryInfo, SpaceError> {
        let regions = self.read_regions()?;
        let region = self.find(&regions, gfn)?;
        let (slot, s) = self.lock_entry(region, gfn.0 - region.pt.start.0)?;
        Ok(EntryInfo {
            pte: slot.effective(s),
            block: slot.block_id(),
            sharers: slot.sharers(),
        })
    }

    /// The host view.
    pub fn mmu(&self) -> &Arc<dyn HostMmu> {
        &self.mmu
    }
}

/// One entry and its block, as [`AddressSpace::entry`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// The entry as the VM may use it (write bit cleared while its block is shared).
    pub pte: Pte,
    /// The block's identity (0: no block yet).
    pub block: usize,
    /// VMs sharing the block.
    pub sharers: usize,
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        self.exit();
    }
}

/// Releases a frame's rmap link (its reference on an anon_vma) before it is freed.
fn release_link(frame: &Frame) {
    let old = frame.set_rmap_link(0, 0);
    if old != 0 {
        // SAFETY: `old` came from `AnonVma::into_raw` when the frame was linked; the
        // frame's last reference is gone, so no walker reads the link any more.
        unsafe { AnonVma::drop_raw(old) };
    }
}

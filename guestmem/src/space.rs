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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::frame::{Frame, FrameFlags};
use crate::mmu::{HostMmu, HostMmuError, MapRun};
use crate::pagetable::{Block, PTES_PER_BLOCK, PageTable, Pte, PteKind, Slot};
use crate::pool::{AllocError, FrameInit, Pool};
use crate::types::{Gfn, Gpa, NodeId, Order, PAGE_SIZE, Pfn, VmId};

/// The largest region: 1 TiB of 4 KiB pages.
pub const MAX_REGION_PAGES: u64 = 1 << 28;

/// The handle the reverse maps keep for a region: enough to find and lock its entries.
pub type RegionHandle = Arc<RegionPt>;
type AnonVma = rmap::AnonVma<RegionHandle>;

/// Errors of address-space operations. Each is returned to the VM that caused it; other
/// VMs are not affected.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
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
    /// A write to a write-protected page whose only user is this VM made it writable.
    CowReuse,
    /// The page was present in the manager; the host view got `pages` pages mapped.
    MapExisting {
        /// Pages mapped into the host view.
        pages: u64,
    },
}

/// Counters of what the manager did, like `/proc/vmstat` (all `Relaxed`: statistics).
#[derive(Debug, Default)]
pub struct Counters {
    zero_fill_faults: AtomicU64,
    zero_fill_pages: AtomicU64,
    cow_copies: AtomicU64,
    cow_copy_faults: AtomicU64,
    cow_reuses: AtomicU64,
    map_existing: AtomicU64,
    forks: AtomicU64,
    exits: AtomicU64,
    frames_freed: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    /// First-touch faults.
    pub zero_fill_faults: u64,
    /// Pages mapped by first-touch faults (more than the faults with fault-around).
    pub zero_fill_pages: u64,
    /// Pages copied by copy-on-write faults.
    pub cow_copies: u64,
    /// Copy-on-write faults that copied (one or a run of pages each).
    pub cow_copy_faults: u64,
    /// Copy-on-write faults that reused the frame.
    pub cow_reuses: u64,
    /// Faults on pages already present (host view filled lazily, e.g. after fork).
    pub map_existing: u64,
    /// Forks.
    pub forks: u64,
    /// Exits.
    pub exits: u64,
    /// Frames returned to the pool.
    pub frames_freed: u64,
}

impl Counters {
    fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            zero_fill_faults: r(&self.zero_fill_faults),
            zero_fill_pages: r(&self.zero_fill_pages),
            cow_copies: r(&self.cow_copies),
            cow_copy_faults: r(&self.cow_copy_faults),
            cow_reuses: r(&self.cow_reuses),
            map_existing: r(&self.map_existing),
            forks: r(&self.forks),
            exits: r(&self.exits),
            frames_freed: r(&self.frames_freed),
        }
    }

    fn record(&self, o: FaultOutcome) {
        match o {
            FaultOutcome::ZeroFill { pages } => {
                self.add(&self.zero_fill_faults, 1);
                self.add(&self.zero_fill_pages, pages);
            }
            FaultOutcome::CowCopy { pages } => {
                self.add(&self.cow_copy_faults, 1);
                self.add(&self.cow_copies, pages);
            }
            FaultOutcome::CowReuse => self.add(&self.cow_reuses, 1),
            FaultOutcome::MapExisting { .. } => self.add(&self.map_existing, 1),
        }
    }
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
}

/// How the manager behaves.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// First touch maps a naturally aligned run of `2^fault_around` pages when they are
    /// all untouched (fewer host mappings, fewer faults); 0 turns it off.
    pub fault_around: Order,
    /// A copy-on-write fault that must copy copies the naturally aligned run of
    /// `2^cow_around` pages around it into contiguous new frames, when every page of the
    /// run is present and write-protected: one fault and one host mapping per run instead
    /// of per page, at the price of private copies of pages the guest did not write
    /// (they are shared no more). 0 turns it off.
    pub cow_around: Order,
    /// Reverse-map design and clone locking.
    pub rmap: rmap::RmapConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            fault_around: Order::new(6).unwrap_or(Order::ZERO),
            cow_around: Order::new(6).unwrap_or(Order::ZERO),
            rmap: rmap::RmapConfig::default(),
        }
    }
}

/// What all address spaces share: the pool, the reverse-map context, the counters.
#[derive(Debug)]
pub struct Manager {
    pool: Arc<Pool>,
    rmap: rmap::Rmap,
    counters: Counters,
    config: ManagerConfig,
    next_vm: AtomicU32,
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
}

impl Manager {
    /// A manager over `pool`.
    pub fn new(pool: Arc<Pool>, config: ManagerConfig) -> Arc<Manager> {
        Arc::new(Manager {
            pool,
            rmap: rmap::Rmap::new(config.rmap),
            counters: Counters::default(),
            config,
            next_vm: AtomicU32::new(0),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The reverse-map context (design switches and counters).
    pub fn rmap(&self) -> &rmap::Rmap {
        &self.rmap
    }

    /// Global counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// Creates an address space with `regions`, mirrored into `mmu`.
    pub fn create(
        self: &Arc<Self>,
        regions: &[RegionSpec],
        mmu: Arc<dyn HostMmu>,
    ) -> Result<Arc<AddressSpace>, SpaceError> {
        let id = VmId(self.next_vm.fetch_add(1, Ordering::Relaxed));
        let mut sorted = regions.to_vec();
        sorted.sort_by_key(|r| r.start);
        for (i, r) in sorted.iter().enumerate() {
            let bad = |why| SpaceError::BadRegion {
                start: r.start,
                pages: r.pages,
                why,
            };
            if r.pages == 0 {
                return Err(bad("it is empty"));
            }
            if r.start
                .0
                .checked_add(r.pages)
                .is_none_or(|end| end > 1 << 40)
            {
                return Err(bad("it ends beyond 2^52 bytes of guest-physical space"));
            }
            if i > 0 && sorted[i - 1].start.0 + sorted[i - 1].pages > r.start.0 {
                return Err(bad("it overlaps another region"));
            }
        }
        let mut list = Vec::with_capacity(sorted.len());
        for r in &sorted {
            let pt = Arc::new(RegionPt {
                vm: id,
                start: r.start,
                table: PageTable::new(r.pages),
                mmu: Arc::clone(&mmu),
            });
            let linked = self
                .rmap
                .region(Arc::clone(&pt), r.start.0..r.start.0 + r.pages)
                .and_then(|mut rr| self.rmap.anon_vma_prepare(&mut rr).map(|_| rr));
            let rr = match linked {
                Ok(rr) => rr,
                Err(source) => {
                    for mut done in list.drain(..).map(|r: Region| r.rmap) {
                        self.rmap.unlink_anon_vmas(&mut done);
                    }
                    return Err(SpaceError::Rmap { vm: id, source });
                }
            };
            list.push(Region { pt, rmap: rr });
        }
        Ok(Arc::new(AddressSpace {
            id,
            mm: Arc::clone(self),
            mmu,
            regions: RwLock::new(Regions {
                list,
                exited: false,
            }),
            counters: Counters::default(),
            exited: AtomicBool::new(false),
        }))
    }

    fn count(&self, vm: &Counters, o: FaultOutcome) {
        self.counters.record(o);
        vm.record(o);
    }
}

/// How reclaim's referenced check ([`Manager::frame_referenced`]) takes its locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ReferencedLocking {
    /// Seed 1: `try_read` on the anon_vma root and `try_lock` on each page-table lock;
    /// anything contended counts as referenced (the page stays active), so reclaim never
    /// waits behind a fork, an exit or a faulting vCPU.
    Trylock,
    /// The older design: wait for the root lock and every page-table lock.
    Blocking,
}

/// What [`Manager::frame_referenced`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Referenced {
    /// Mappings whose entry was young (their young bit is now cleared).
    pub referenced: u32,
    /// Mappings the walk handed to the check (the rmap's cost).
    pub examined: u64,
    /// A lock was contended (only with [`ReferencedLocking::Trylock`]).
    pub contended: bool,
}

impl Referenced {
    /// Whether reclaim should treat the frame as recently used.
    pub fn is_referenced(&self) -> bool {
        self.referenced > 0 || self.contended
    }
}

impl Manager {
    /// Reclaim's `page_referenced`: walks the reverse map of `pfn` and tests-and-clears
    /// the young bit of every entry mapping it.
    ///
    /// Takes a reference on the frame (skipping a frame being freed) and its frame lock
    /// (a locked frame is busy: reported as contended) so that its rmap link stays put.
    pub fn frame_referenced(&self, pfn: Pfn, locking: ReferencedLocking) -> Referenced {
        let mut out = Referenced::default();
        if u64::from(pfn.0) >= self.pool.total_frames() {
            return out;
        }
        let frame = self.pool.frame(pfn);
        if !frame.get_unless_zero() {
            return out;
        }
        if !frame.try_lock() {
            out.contended = true;
            self.put_frame(pfn);
            return out;
        }
        let (raw, pgoff) = frame.rmap_link();
        if raw != 0 {
            // SAFETY: `raw` came from `AnonVma::into_raw` when the frame was linked; the
            // link changes or is released only with the frame locked or at refcount 0,
            // and we hold both the frame lock and a reference, so it stays alive.
            let anon = unsafe { AnonVma::borrow_raw(raw) };
            let mode = match locking {
                ReferencedLocking::Trylock => rmap::WalkMode::TryShared,
                ReferencedLocking::Blocking => rmap::WalkMode::Shared,
            };
            let walked = rmap::rmap_walk(anon, pgoff, mode, |region: &RegionHandle, pgoff| {
                out.examined += 1;
                let index = pgoff - region.start.0;
                if index >= region.table.pages() {
                    return std::ops::ControlFlow::Continue(());
                }
                let locked = match locking {
                    ReferencedLocking::Trylock => region.table.try_lock(index),
                    ReferencedLocking::Blocking => Some(region.table.lock(index)),
                };
                let Some((mut blk, slot)) = locked else {
                    out.contended = true;
                    return std::ops::ControlFlow::Continue(());
                };
                let pte = blk.pte(slot);
                if pte.pfn() == Some(pfn) && pte.is_young() {
                    out.referenced += 1;
                    // A block shared after a fork keeps its young bits until one of its
                    // users copies it; the check still reports the access.
                    if let Some(b) = blk.unique_mut() {
                        b.set(slot, pte.mkold());
                    }
                }
                std::ops::ControlFlow::Continue(())
            });
            if matches!(walked, Ok(rmap::WalkOutcome::Contended)) {
                out.contended = true;
            }
        }
        frame.unlock();
        self.put_frame(pfn);
        out
    }

    /// How many VMs map `pfn` now, counted through its reverse map (0 if it is free).
    pub fn mappers(&self, pfn: Pfn) -> u32 {
        if u64::from(pfn.0) >= self.pool.total_frames() {
            return 0;
        }
        let frame = self.pool.frame(pfn);
        if !frame.get_unless_zero() {
            return 0;
        }
        let mut n = 0;
        // Wait for the frame lock: a holder (reclaim, migration) keeps it briefly.
        while !frame.try_lock() {
            std::thread::yield_now();
        }
        let (raw, pgoff) = frame.rmap_link();
        if raw != 0 {
            // SAFETY: as in `frame_referenced`: we hold a reference and the frame lock.
            let anon = unsafe { AnonVma::borrow_raw(raw) };
            let _ = rmap::rmap_walk(
                anon,
                pgoff,
                rmap::WalkMode::Shared,
                |r: &RegionHandle, pgoff| {
                    let index = pgoff - r.start.0;
                    if index < r.table.pages()
                        && r.table
                            .lock(index)
                            .0
                            .pte((index % PTES_PER_BLOCK as u64) as usize)
                            .pfn()
                            == Some(pfn)
                    {
                        n += 1;
                    }
                    std::ops::ControlFlow::Continue(())
                },
            );
        }
        frame.unlock();
        self.put_frame(pfn);
        n
    }

    /// Drops a transient reference; frees the frame if it was the last.
    fn put_frame(&self, pfn: Pfn) {
        let frame = self.pool.frame(pfn);
        if frame.put() == 0 {
            release_link(frame);
            self.pool.free(pfn, Order::ZERO);
            self.counters.add(&self.counters.frames_freed, 1);
        }
    }
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
        self.read_regions()
            .list
            .iter()
            .map(|r| RegionSpec {
                start: r.pt.start,
                pages: r.pt.table.pages(),
            })
            .collect()
    }

    fn read_regions(&self) -> RwLockReadGuard<'_, Regions> {
        self.regions.read().unwrap_or_else(|e| e.into_inner())
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

    /// Resolves a guest fault at `gfn` (what the VMM calls for a userfaultfd event).
    pub fn handle_fault(&self, gfn: Gfn, access: Access) -> Result<FaultOutcome, SpaceError> {
        let regions = self.read_regions();
        let region = self.find(&regions, gfn)?;
        let index = gfn.0 - region.pt.start.0;
        let (mut slot, s) = region.pt.table.lock(index);
        let pte = slot.effective(s);
        let satisfied = match access {
            Access::Read => pte.is_present(),
            Access::Write => pte.is_writable(),
        };
        if satisfied {
            // The manager has the page; the host view lost it or never had it (a fork
            // child's view is filled this way).
            let pages = self.map_existing(region, &slot, index)?;
            let o = FaultOutcome::MapExisting { pages };
            self.mm.count(&self.counters, o);
            return Ok(o);
        }
        self.fault_locked(region, &mut slot, index, access)
    }

    /// Resolves a fault with the entry's block locked. On return the entry satisfies
    /// `access` and the host view maps it.
    fn fault_locked(
        &self,
        region: &Region,
        slot: &mut Slot,
        index: u64,
        access: Access,
    ) -> Result<FaultOutcome, SpaceError> {
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        let o = match slot.effective(s).kind() {
            PteKind::Empty => self.zero_fill(region, slot, index)?,
            PteKind::Present {
                writable: false, ..
            } if access == Access::Write => self.write_protect_fault(region, slot, index)?,
            PteKind::Present { .. } => FaultOutcome::MapExisting {
                pages: self.map_existing(region, slot, index)?,
            },
            PteKind::Swap { .. } | PteKind::Migration { .. } => {
                unreachable!("swap and migration entries are not created yet")
            }
        };
        self.mm.count(&self.counters, o);
        Ok(o)
    }

    /// Makes `slot`'s block this VM's own (copying a block shared by a fork), keeping
    /// frames' mapcounts equal to the number of blocks naming them.
    fn exclusive<'s>(&self, slot: &'s mut Slot) -> &'s mut Block {
        let pool = &self.mm.pool;
        let mut freed = Vec::new();
        let block = slot.make_exclusive(
            |p| {
                if let Some(pfn) = p.pfn() {
                    let f = pool.frame(pfn);
                    f.map();
                    f.get();
                }
            },
            |p| {
                if let Some(pfn) = p.pfn() {
                    self.drop_mapping(pfn, &mut freed);
                }
            },
        );
        self.free_frames(&freed);
        block
    }

    fn alloc(&self, order: Order, init: FrameInit) -> Result<Pfn, SpaceError> {
        self.mm
            .pool
            .alloc(NodeId(0), order, init)
            .map_err(|source| SpaceError::Alloc {
                vm: self.id,
                source,
            })
    }

    fn host_err(&self, source: HostMmuError) -> SpaceError {
        SpaceError::Host {
            vm: self.id,
            source,
        }
    }

    fn map_run(
        &self,
        region: &Region,
        index: u64,
        pages: u64,
        pfn: Pfn,
        writable: bool,
    ) -> Result<(), HostMmuError> {
        let node = self.mm.pool.node_of(pfn);
        region.pt.mmu.map_run(MapRun {
            gfn: region.pt.gfn(index),
            pages,
            node: node.id(),
            pfn,
            fd: node.memfd(),
            file_offset: node.file_offset(pfn),
            writable,
        })
    }

    /// Files a new frame under the region's own anon_vma at `pgoff`.
    fn link_new(&self, region: &Region, frame: &Frame, pgoff: u64) {
        let anon = region
            .rmap
            .anon_vma()
            .expect("anon_vma_prepare ran at region creation");
        let old = frame.set_rmap_link(AnonVma::into_raw(anon.clone()), pgoff);
        debug_assert_eq!(old, 0, "a new frame has no rmap link");
    }

    /// First touch: map a zero-filled frame, or a run of them (fault-around).
    fn zero_fill(
        &self,
        region: &Region,
        slot: &mut Slot,
        index: u64,
    ) -> Result<FaultOutcome, SpaceError> {
        let around = self.mm.config.fault_around;
        let n = u64::from(around.frames());
        let first = index & !(n - 1);
        let s0 = (first % PTES_PER_BLOCK as u64) as usize;
        let fits = n > 1
            && first + n <= region.pt.table.pages()
            && (s0..s0 + n as usize).all(|s| slot.pte(s).is_empty());
        let run = if fits {
            self.alloc(around, FrameInit::Zeroed).ok()
        } else {
            None
        };
        let (first, order, pfn) = match run {
            Some(pfn) => (first, around, pfn),
            None => (
                index,
                Order::ZERO,
                self.alloc(Order::ZERO, FrameInit::Zeroed)?,
            ),
        };
        let pages = u64::from(order.frames());
        let s0 = (first % PTES_PER_BLOCK as u64) as usize;
        let block = self.exclusive(slot);
        for i in 0..pages {
            let p = pfn.offset(i as u32);
            let frame = self.mm.pool.frame(p);
            self.link_new(region, frame, region.pt.pgoff(first + i));
            frame.set(FrameFlags::SWAP_BACKED);
            frame.map();
            block.set(s0 + i as usize, Pte::present(p, true));
        }
        if let Err(e) = self.map_run(region, first, pages, pfn, true) {
            // The host view must not keep any part of a run whose frames go back to the
            // pool (a view's map_run is all-or-nothing, but do not rely on it here).
            let unmapped = region.pt.mmu.unmap_run(region.pt.gfn(first), pages).is_ok();
            let mut freed = Vec::with_capacity(pages as usize);
            for i in 0..pages {
                block.set(s0 + i as usize, Pte::EMPTY);
                if unmapped {
                    self.drop_mapping(pfn.offset(i as u32), &mut freed);
                }
            }
            if !unmapped {
                // The host view may still map them: leaking beats handing them on.
                tracing::error!(vm = %self.id, pages, "host view kept a failed run; frames leaked");
            }
            self.free_frames(&freed);
            return Err(self.host_err(e));
        }
        Ok(FaultOutcome::ZeroFill { pages })
    }

    /// A write to a present, write-protected page: reuse it if this is its only mapping,
    /// else copy it.
    fn write_protect_fault(
        &self,
        region: &Region,
        slot: &mut Slot,
        index: u64,
    ) -> Result<FaultOutcome, SpaceError> {
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        let block = self.exclusive(slot);
        let pte = block.get(s);
        let Some(old) = pte.pfn() else {
            unreachable!("write_protect_fault on a non-present entry");
        };
        let frame = self.mm.pool.frame(old);
        // Reuse needs the frame lock: it may move the frame's rmap link, which walkers
        // read with the frame locked.
        if frame.mapcount() == 1 && frame.refcount() == 1 && frame.try_lock() {
            let pgoff = region.pt.pgoff(index);
            let anon = region.rmap.anon_vma().expect("prepared at creation");
            if frame.rmap_link().0 != AnonVma::as_raw(anon) {
                // page_move_anon_rmap: the frame is ours alone now; file it under our
                // anon_vma so later walks find it in O(1).
                let old_link = frame.set_rmap_link(AnonVma::into_raw(anon.clone()), pgoff);
                if old_link != 0 {
                    // SAFETY: `old_link` came from `AnonVma::into_raw` when the frame was
                    // linked, and the frame's reference is given up exactly once here.
                    unsafe { AnonVma::drop_raw(old_link) };
                }
            }
            frame.unlock();
            block.set(s, pte.mkwrite().mkdirty().mkyoung());
            if let Err(e) = region.pt.mmu.protect_run(region.pt.gfn(index), 1, true) {
                block.set(s, pte);
                return Err(self.host_err(e));
            }
            return Ok(FaultOutcome::CowReuse);
        }
        let (first, n) = self.cow_run(region, block, index);
        let order = Order::new(n.trailing_zeros()).unwrap_or(Order::ZERO);
        let (first, n, new) = match self.alloc(order, FrameInit::Overwritten) {
            Ok(new) => (first, n, new),
            Err(_) if n > 1 => (index, 1, self.alloc(Order::ZERO, FrameInit::Overwritten)?),
            Err(e) => return Err(e),
        };
        let s0 = (first % PTES_PER_BLOCK as u64) as usize;
        let olds: Vec<Pte> = (0..n as usize).map(|i| block.get(s0 + i)).collect();
        for (i, old_pte) in olds.iter().enumerate() {
            let Some(old) = old_pte.pfn() else {
                unreachable!("cow_run covers present entries only");
            };
            let new_i = new.offset(i as u32);
            // SAFETY: `new_i` is ours alone; `old` is mapped read-only everywhere (it is
            // shared, or locked by someone who does not write it), so nothing writes it
            // during the copy.
            unsafe { self.mm.pool.copy_frame(new_i, old) };
            let nf = self.mm.pool.frame(new_i);
            self.link_new(region, nf, region.pt.pgoff(first + i as u64));
            nf.set(FrameFlags::SWAP_BACKED);
            nf.map();
            let pte = Pte::present(new_i, true);
            block.set(s0 + i, if s0 + i == s { pte.mkdirty() } else { pte });
        }
        let mut freed = Vec::new();
        if let Err(e) = self.map_run(region, first, n, new, true) {
            // As in zero_fill: no part of the failed run may stay in the host view; the
            // old frames are faulted back in read-only on the next access.
            let unmapped = region.pt.mmu.unmap_run(region.pt.gfn(first), n).is_ok();
            for (i, old_pte) in olds.iter().enumerate() {
                block.set(s0 + i, *old_pte);
                if unmapped {
                    self.drop_mapping(new.offset(i as u32), &mut freed);
                }
            }
            if !unmapped {
                // The host view may still map the copies: leaking beats handing them on.
                tracing::error!(vm = %self.id, pages = n, "host view kept a failed run; frames leaked");
            }
            self.free_frames(&freed);
            return Err(self.host_err(e));
        }
        for old in olds.iter().filter_map(|p| p.pfn()) {
            self.drop_mapping(old, &mut freed);
        }
        self.free_frames(&freed);
        Ok(FaultOutcome::CowCopy { pages: n })
    }

    /// The run of entries a copy-on-write fault at `index` copies: the naturally aligned
    /// `2^cow_around` entries around it if they are all present and write-protected and
    /// lie in the region, else the entry alone.
    fn cow_run(&self, region: &Region, block: &Block, index: u64) -> (u64, u64) {
        let n = u64::from(self.mm.config.cow_around.frames());
        let first = index & !(n - 1);
        let s0 = (first % PTES_PER_BLOCK as u64) as usize;
        let whole = n > 1
            && first + n <= region.pt.table.pages()
            && (s0..s0 + n as usize).all(|t| {
                let p = block.get(t);
                p.is_present() && !p.is_writable()
            });
        if whole { (first, n) } else { (index, 1) }
    }

    /// Maps the present entry `index` into the host view, with its neighbours in the same
    /// block that continue the run (consecutive frames, same permission).
    fn map_existing(&self, region: &Region, slot: &Slot, index: u64) -> Result<u64, SpaceError> {
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        let pte = slot.effective(s);
        let Some(pfn) = pte.pfn() else {
            unreachable!("map_existing on a non-present entry");
        };
        let w = pte.is_writable();
        let node = self.mm.pool.node_of(pfn);
        let len = region
            .pt
            .table
            .block_len((index / PTES_PER_BLOCK as u64) as usize);
        let continues = |t: usize| {
            let e = slot.effective(t);
            let want = i64::from(pfn.0) + t as i64 - s as i64;
            e.is_writable() == w
                && e.pfn()
                    .is_some_and(|p| i64::from(p.0) == want && node.contains(p))
        };
        let mut lo = s;
        while lo > 0 && continues(lo - 1) {
            lo -= 1;
        }
        let mut hi = s + 1;
        while hi < len && continues(hi) {
            hi += 1;
        }
        let first_index = index - (s - lo) as u64;
        let first_pfn = Pfn(pfn.0 - (s - lo) as u32);
        let pages = (hi - lo) as u64;
        if let Err(e) = self.map_run(region, first_index, pages, first_pfn, w) {
            // A half-made read-only run could be writable: leave nothing of it mapped.
            let _ = region.pt.mmu.unmap_run(region.pt.gfn(first_index), pages);
            return Err(self.host_err(e));
        }
        Ok(pages)
    }

    /// Drops one mapping of `pfn`; pushes it to `freed` when that was its last reference.
    fn drop_mapping(&self, pfn: Pfn, freed: &mut Vec<Pfn>) {
        let frame = self.mm.pool.frame(pfn);
        frame.unmap();
        if frame.put() == 0 {
            release_link(frame);
            freed.push(pfn);
        }
    }

    fn free_frames(&self, freed: &[Pfn]) {
        if freed.is_empty() {
            return;
        }
        self.mm.pool.free_batch(freed);
        self.mm
            .counters
            .add(&self.mm.counters.frames_freed, freed.len() as u64);
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
        let regions = self.read_regions();
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
            let region = self.find(&regions, here.gfn())?;
            let index = here.gfn().0 - region.pt.start.0;
            let (mut slot, s) = region.pt.table.lock(index);
            let pte = slot.effective(s);
            let ok = match access {
                Access::Read => pte.is_present(),
                Access::Write => pte.is_writable(),
            };
            if !ok {
                self.fault_locked(region, &mut slot, index, access)?;
            }
            let pte = slot.pte(s);
            let pfn = pte.pfn().expect("fault_locked made the entry present");
            // Young and dirty bits live in blocks this VM owns; a read through a block
            // shared by a fork leaves it shared.
            if let Some(b) = slot.unique_mut() {
                let marked = match access {
                    Access::Write => pte.mkyoung().mkdirty(),
                    Access::Read => pte.mkyoung(),
                };
                b.set(s, marked);
            }
            let off = here.page_offset();
            let n = (PAGE_SIZE - off).min((end - at) as usize);
            f(self.mm.pool.page_ptr(pfn), off, n);
            at += n as u64;
        }
        Ok(())
    }

    /// Forks this address space: the child shares every present page copy-on-write.
    ///
    /// No entry is copied: the child's page tables point at the parent's blocks, marked
    /// copy-on-write (On-demand-fork), so the cost grows with blocks (one per 2 MiB), not
    /// pages. The parent's host view is write-protected region by region; the child's is
    /// filled lazily by its faults. Both keep running; `child_mmu` is the child's host
    /// view. On error the parent is as it was (its blocks may be marked copy-on-write,
    /// which only costs a reuse fault) and nothing leaks.
    pub fn fork(&self, child_mmu: Arc<dyn HostMmu>) -> Result<Arc<AddressSpace>, SpaceError> {
        let parent = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if parent.exited {
            return Err(SpaceError::Exited(self.id));
        }
        let mm = &self.mm;
        let id = VmId(mm.next_vm.fetch_add(1, Ordering::Relaxed));
        let mut list: Vec<Region> = Vec::with_capacity(parent.list.len());
        for pr in &parent.list {
            let pt = Arc::new(RegionPt {
                vm: id,
                start: pr.pt.start,
                table: PageTable::share_from(&pr.pt.table),
                mmu: Arc::clone(&child_mmu),
            });
            let linked = mm
                .rmap
                .region(
                    Arc::clone(&pt),
                    pr.pt.start.0..pr.pt.start.0 + pr.pt.table.pages(),
                )
                .and_then(|mut rr| mm.rmap.anon_vma_fork(&mut rr, &pr.rmap).map(|()| rr));
            match linked {
                Ok(rr) => list.push(Region { pt, rmap: rr }),
                Err(source) => {
                    for mut done in list.drain(..).map(|r| r.rmap) {
                        mm.rmap.unlink_anon_vmas(&mut done);
                    }
                    // Dropping `pt` lets go of the shared blocks; the parent keeps them.
                    return Err(SpaceError::Rmap {
                        vm: self.id,
                        source,
                    });
                }
            }
        }
        let child = Arc::new(AddressSpace {
            id,
            mm: Arc::clone(mm),
            mmu: child_mmu,
            regions: RwLock::new(Regions {
                list,
                exited: false,
            }),
            counters: Counters::default(),
            exited: AtomicBool::new(false),
        });
        let mut result = Ok(());
        for pr in &parent.list {
            if let Err(e) = pr.pt.mmu.protect_for_fork(pr.pt.start, pr.pt.table.pages()) {
                result = Err(self.host_err(e));
                break;
            }
        }
        if result.is_err() {
            // Some of the parent's view may still be writable over frames the child now
            // shares: drop all of it, so that every access faults back to the manager.
            for pr in &parent.list {
                let _ = pr.pt.mmu.unmap_run(pr.pt.start, pr.pt.table.pages());
            }
        }
        drop(parent);
        if let Err(e) = result {
            child.exit();
            return Err(e);
        }
        mm.counters.add(&mm.counters.forks, 1);
        Ok(child)
    }

    /// Unmaps everything, returns every frame whose last user this VM was, and unlinks
    /// the reverse maps. Later calls on the VM return [`SpaceError::Exited`].
    pub fn exit(&self) {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if regions.exited {
            return;
        }
        regions.exited = true;
        self.exited.store(true, Ordering::Relaxed);
        let mut freed = Vec::new();
        for r in &regions.list {
            for b in 0..r.pt.table.blocks() {
                // A block still shared by another VM stays with it.
                let Some(block) = r.pt.table.lock_block(b).take() else {
                    continue;
                };
                for pfn in block.ptes().iter().filter_map(|p| p.pfn()) {
                    self.drop_mapping(pfn, &mut freed);
                }
                if freed.len() >= 4096 {
                    self.free_frames(&freed);
                    freed.clear();
                }
            }
        }
        self.free_frames(&freed);
        for r in regions.list.iter_mut() {
            self.mm.rmap.unlink_anon_vmas(&mut r.rmap);
        }
        self.mm.counters.add(&self.mm.counters.exits, 1);
    }

    /// Whether the VM has exited.
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Relaxed)
    }

    /// The VM's memory use now.
    ///
    /// A frame named by one page-table block only (mapcount 1) is mapped by exactly the
    /// VMs sharing that block; a frame named by several blocks has the VMs mapping it
    /// counted through the reverse map (exact, at the cost of a walk per such frame).
    pub fn memory(&self) -> MemoryUsage {
        let regions = self.read_regions();
        let mut u = MemoryUsage::default();
        let mut maybe_shared = Vec::new();
        for r in &regions.list {
            for b in 0..r.pt.table.blocks() {
                let slot = r.pt.table.lock_block(b);
                let sharers = slot.sharers() as u32;
                for s in 0..r.pt.table.block_len(b) {
                    if let Some(pfn) = slot.pte(s).pfn() {
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
        let regions = self.read_regions();
        let region = self.find(&regions, gfn)?;
        let (slot, s) = region.pt.table.lock(gfn.0 - region.pt.start.0);
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

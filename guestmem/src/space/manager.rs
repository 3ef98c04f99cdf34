//! The [`Manager`]: what all address spaces share (pool, reverse maps, counters), and the
//! reverse-map walks that reclaim and migration start from a frame.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use super::counters::{CounterSnapshot, Counters};
use super::reclaim::{ReclaimCounters, SwapState};
use super::{
    AddressSpace, AnonVma, FaultOutcome, MAX_REGION_PAGES, Region, RegionHandle, RegionPt,
    RegionSpec, Regions, SpaceError, release_link,
};
use crate::charge::Charges;
use crate::frame::Frame;
use crate::mmu::HostMmu;
use crate::pagetable::PageTable;
use crate::pool::Pool;
use crate::reclaim::kswapd::KswapdWake;
use crate::reclaim::lru::Lru;
use crate::types::{Order, Pfn, VmId};

/// How the manager behaves.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// First touch maps a naturally aligned run of `2^fault_around` pages when they are
    /// all untouched (fewer host mappings, fewer faults); 0 turns it off.
    pub fault_around: Order,
    /// The most pages one copy-on-write fault copies (`2^cow_around`, into contiguous
    /// new frames, with one host mapping): fewer faults for dense rewrites, at the price of
    /// private copies of pages the guest did not write. 0 turns it off.
    pub cow_around: Order,
    /// How a copy-on-write fault sizes its run (up to `cow_around`).
    pub cow_run: CowRun,
    /// Reverse-map design and clone locking.
    pub rmap: rmap::RmapConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            fault_around: Order::new(6).unwrap_or(Order::ZERO),
            cow_around: Order::new(6).unwrap_or(Order::ZERO),
            cow_run: CowRun::Adaptive,
            rmap: rmap::RmapConfig::default(),
        }
    }
}

/// How a copy-on-write fault sizes the run it copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CowRun {
    /// Grow with the write pattern, as readahead grows its window: a fault copies its page
    /// alone unless the pages just before it are already this VM's own (written since the
    /// fork); then it copies ahead twice as many pages as that private run is long, up
    /// to `2^cow_around`. Sparse writes copy what they write; a sequential rewrite
    /// reaches full runs after a handful of faults.
    #[default]
    Adaptive,
    /// The naturally aligned `2^cow_around` run around the fault whenever every page of
    /// it is shared (the older design: one sparse write copies the whole run).
    Fixed,
}

/// What all address spaces share: the pool, the reverse-map context, the counters.
#[derive(Debug)]
pub struct Manager {
    pub(super) pool: Arc<Pool>,
    pub(super) rmap: rmap::Rmap,
    pub(super) counters: Counters,
    pub(super) config: ManagerConfig,
    pub(super) next_vm: AtomicU32,
    pub(super) charges: Charges,
    /// Each node's LRU lists, indexed by node id.
    pub(super) lrus: Box<[Lru]>,
    /// Swap, once attached ([`Manager::attach_swap`]).
    pub(super) swap: OnceLock<SwapState>,
    /// What reclaim did.
    pub(super) rstats: ReclaimCounters,
    /// What migration did.
    pub(super) mstats: super::migrate::MigrateCounters,
    /// The reverse map's topology: written around every link and unlink of a region
    /// (create, fork from sharing a region's blocks to linking its child, exit), read by a
    /// migration run from its first walk to its last. A run therefore sees every region
    /// that can hold its migration entries, and its walks may go without the root lock
    /// ([`MigrateWalk::Unlocked`](super::MigrateWalk::Unlocked); see `space::migrate`).
    pub(super) topology: std::sync::RwLock<()>,
    /// How allocations wake the background reclaimer.
    pub(super) kswapd: Arc<KswapdWake>,
    /// Every address space created or forked, for access harvesting (dead ones are
    /// pruned as they are found).
    pub(super) spaces: Mutex<Vec<Weak<AddressSpace>>>,
    /// The background reclaimer the manager owns, once started.
    pub(super) reclaimer: OnceLock<crate::reclaim::Reclaimer>,
}

/// What the referenced check does with the young state it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Young {
    /// Clears it (`ptep_clear_flush_young`): the normal check, which ages the page.
    TestAndClear,
    /// Leaves it: a look ahead that must not change what the next check sees.
    Peek,
}

impl Manager {
    /// A manager over `pool`.
    pub fn new(pool: Arc<Pool>, config: ManagerConfig) -> Arc<Manager> {
        let lrus = pool
            .nodes()
            .iter()
            .map(|n| Lru::new(n.base(), n.frames()))
            .collect();
        Arc::new(Manager {
            charges: Charges::new(pool.total_frames()),
            lrus,
            swap: OnceLock::new(),
            rstats: ReclaimCounters::default(),
            mstats: Default::default(),
            topology: std::sync::RwLock::new(()),
            kswapd: Arc::new(KswapdWake::default()),
            spaces: Mutex::new(Vec::new()),
            reclaimer: OnceLock::new(),
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

    /// Frames of the pool neither charged to a VM nor reserved for one: what a new
    /// reservation or an unreserved allocation can still get.
    pub fn unclaimed_frames(&self) -> u64 {
        self.charges.available()
    }

    /// Charges alive: VMs running, or exited with frames still charged to them (shared
    /// by a clone). For leak checks.
    pub fn live_charges(&self) -> usize {
        self.charges.live()
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
            if r.pages > MAX_REGION_PAGES {
                return Err(bad("it is larger than 1 TiB (MAX_REGION_PAGES)"));
            }
            if r.start
                .0
                .checked_add(r.pages)
                .is_none_or(|end| end > 1 << 40)
            {
                return Err(bad("it ends beyond 2^52 bytes of guest-physical space"));
            }
            // Both checked above: the previous region ends below 2^40.
            if i > 0 && sorted[i - 1].start.0 + sorted[i - 1].pages > r.start.0 {
                return Err(bad("it overlaps another region"));
            }
        }
        let mut list = Vec::with_capacity(sorted.len());
        for r in &sorted {
            let pt = Arc::new(RegionPt::new(
                id,
                r.start,
                PageTable::new(r.pages),
                Arc::clone(&mmu),
            ));
            let _topology = self.topology.write().unwrap_or_else(|e| e.into_inner());
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
        let space = Arc::new(AddressSpace {
            id,
            mm: Arc::clone(self),
            mmu,
            regions: RwLock::new(Regions {
                list,
                exited: false,
            }),
            counters: Counters::default(),
            exited: AtomicBool::new(false),
            charge: self.charges.register(id, None),
            cow_hint: AtomicU64::new(0),
            streams: Default::default(),
            policy: Default::default(),
            numa: Default::default(),
            mlocked: RwLock::new(Vec::new()),
        });
        self.register_space(&space);
        Ok(space)
    }

    /// Files a new address space for access harvesting, pruning dead ones.
    pub(super) fn register_space(&self, space: &Arc<AddressSpace>) {
        let mut spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces.retain(|w| w.strong_count() > 0);
        spaces.push(Arc::downgrade(space));
    }

    /// The address spaces alive now.
    pub fn spaces(&self) -> Vec<Arc<AddressSpace>> {
        let spaces = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        spaces.iter().filter_map(Weak::upgrade).collect()
    }

    /// Starts the background reclaimer (kswapd) owned by the manager: it runs until the
    /// manager is dropped. A second call does nothing.
    pub fn start_reclaimer(self: &Arc<Self>) -> std::io::Result<()> {
        if self.reclaimer.get().is_none() {
            let r = crate::reclaim::Reclaimer::start(self)?;
            let _ = self.reclaimer.set(r);
        }
        Ok(())
    }

    /// The background reclaimer's wake-up.
    pub fn kswapd(&self) -> &Arc<KswapdWake> {
        &self.kswapd
    }

    /// Wakes the background reclaimer if swap is attached and free frames are below the
    /// low watermark (called after allocations; one relaxed load when memory is ample).
    #[inline]
    pub(super) fn kswapd_wake_if_low(&self) {
        if let Some(sw) = self.swap.get() {
            if self.charges.available() < sw.config.low_watermark {
                self.kswapd.wake();
            }
        }
    }

    /// One round of background reclaim: harvest guest accesses, then shrink until free
    /// frames reach the high watermark (or nothing more can be reclaimed). With memory
    /// ample, returns idle free memory to the host instead ([`crate::reclaim::Punch`]).
    pub fn background_reclaim(&self) {
        let Some(sw) = self.swap.get() else {
            return;
        };
        let free = self.charges.available();
        if free >= sw.config.low_watermark {
            self.release_idle(sw);
            return;
        }
        self.rstats.add(&self.rstats.background_runs, 1);
        self.harvest_accesses();
        let mut free = free;
        while free < sw.config.high_watermark {
            let mut progress = 0;
            for node in 0..self.lrus.len() {
                let want = (sw.config.high_watermark - free).min(sw.config.batch as u64 * 8);
                progress += self.shrink_node(node, want, None).reclaimed;
            }
            if progress == 0 {
                break;
            }
            free = self.charges.available();
        }
    }

    /// Copies what KVM guests accessed since the last harvest into the frames'
    /// `REFERENCED` marks, for every VM whose host view can tell (a view that cannot
    /// leaves software accesses' young bits as the only information).
    pub fn harvest_accesses(&self) {
        let mut bits = Vec::new();
        for space in self.spaces() {
            space.harvest(&mut bits);
        }
    }

    pub(super) fn count(&self, vm: &Counters, o: FaultOutcome) {
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
        let out = self.walk_referenced(pfn, frame, locking, Young::TestAndClear);
        frame.unlock();
        self.put_frame(pfn);
        out
    }

    /// The reverse-map walk of [`Manager::frame_referenced`], for a frame the caller
    /// holds locked and referenced.
    pub(super) fn walk_referenced(
        &self,
        pfn: Pfn,
        frame: &Frame,
        locking: ReferencedLocking,
        young: Young,
    ) -> Referenced {
        let mut out = Referenced::default();
        let mode = match locking {
            ReferencedLocking::Trylock => rmap::WalkMode::TryShared,
            ReferencedLocking::Blocking => rmap::WalkMode::Shared,
        };
        let walked = self.walk_frame(frame, mode, |region: &RegionHandle, pgoff| {
            out.examined += 1;
            let index = pgoff - region.start.0;
            if index >= region.table.pages() {
                return std::ops::ControlFlow::Continue(());
            }
            let locked = match locking {
                ReferencedLocking::Trylock => region.table.try_lock(index),
                ReferencedLocking::Blocking => region.table.lock(index).map(Some),
            };
            // Contended, or poisoned (a failed VM's entries are not to be trusted or
            // changed): either way the frame is kept, as if referenced.
            let Ok(Some((mut blk, slot))) = locked else {
                out.contended = true;
                return std::ops::ControlFlow::Continue(());
            };
            // A block shared after a fork keeps its entries; its young state is
            // cleared in the block's bitmaps, for every sharer at once.
            let is_young = |blk: &mut crate::pagetable::Slot| match young {
                Young::TestAndClear => blk.test_and_clear_young(slot),
                Young::Peek => blk.peek_young(slot),
            };
            if blk.pte(slot).pfn() == Some(pfn) && is_young(&mut blk) {
                out.referenced += 1;
            }
            std::ops::ControlFlow::Continue(())
        });
        if matches!(walked, Some(Ok(rmap::WalkOutcome::Contended))) {
            out.contended = true;
        }
        out
    }

    /// Walks the reverse map of `frame` from its rmap link: `visitor(region, pgoff)` for
    /// every region that may map it (`rmap::rmap_walk`). `None` for a frame with no link.
    /// The caller holds the frame locked and a reference to it.
    pub(super) fn walk_frame(
        &self,
        frame: &Frame,
        mode: rmap::WalkMode<'_, RegionHandle>,
        visitor: impl FnMut(&RegionHandle, u64) -> std::ops::ControlFlow<()>,
    ) -> Option<Result<rmap::WalkOutcome, rmap::WalkError>> {
        debug_assert!(frame.flags().contains(crate::frame::FrameFlags::LOCKED));
        let (raw, pgoff) = frame.rmap_link();
        if raw == 0 {
            return None;
        }
        // SAFETY: `raw` came from `AnonVma::into_raw` when the frame was linked; the link
        // changes or is released only with the frame locked or at refcount 0, and the
        // caller holds both the frame lock and a reference, so it stays alive.
        let anon = unsafe { AnonVma::borrow_raw(raw) };
        Some(rmap::rmap_walk(anon, pgoff, mode, visitor))
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
        let _ = self.walk_frame(frame, rmap::WalkMode::Shared, |r: &RegionHandle, pgoff| {
            let index = pgoff - r.start.0;
            // A poisoned block (its VM has failed) is counted as mapping the
            // frame: its entries are kept as they were.
            if index < r.table.pages()
                && r.table
                    .lock(index)
                    .map_or(true, |(g, s)| g.pte(s).pfn() == Some(pfn))
            {
                n += 1;
            }
            std::ops::ControlFlow::Continue(())
        });
        frame.unlock();
        self.put_frame(pfn);
        n
    }

    /// Returns frames whose last reference is gone to the pool, uncharging them first
    /// (after `free` they may already belong to someone else).
    pub(super) fn release_frames(&self, freed: &[Pfn]) {
        self.release(freed, false);
    }

    /// [`Manager::release_frames`] into the pool's zones, past the allocators' caches
    /// (reclaim's frees: whole blocks that should merge, see [`Pool::free_batch_to_zone`]).
    pub(super) fn release_frames_to_zone(&self, freed: &[Pfn]) {
        self.release(freed, true);
    }

    fn release(&self, freed: &[Pfn], to_zone: bool) {
        if freed.is_empty() {
            return;
        }
        for &p in freed {
            let f = self.pool.frame(p);
            // At refcount 0 no one puts the frame back on a list, so a clear LRU bit stays
            // clear; a set one is re-checked under the LRU lock.
            if f.flags().contains(crate::frame::FrameFlags::LRU) {
                self.lru_of(p).remove(p, f);
            }
        }
        self.charges
            .uncharge(freed.iter().map(|&p| self.pool.frame(p).take_charge()));
        if to_zone {
            self.pool.free_batch_to_zone(freed);
        } else {
            self.pool.free_batch(freed);
        }
        self.counters
            .add(&self.counters.frames_freed, freed.len() as u64);
    }

    /// Drops a transient reference; frees the frame if it was the last.
    ///
    /// A frame left with the swap cache's reference alone (no mapping named it when its
    /// last entry went, because this holder had it: reclaim kept it, a walk held it)
    /// leaves the cache and is freed here, or it would sit there until a later reclaim.
    pub(super) fn put_frame(&self, pfn: Pfn) {
        let frame = self.pool.frame(pfn);
        match frame.put() {
            0 => {
                release_link(frame);
                self.release_frames(&[pfn]);
            }
            1 if frame.mapcount() == 0
                && frame.flags().contains(crate::frame::FrameFlags::SWAPCACHE)
                && self.uncache_orphan(pfn) =>
            {
                release_link(frame);
                self.release_frames(&[pfn]);
            }
            _ => {}
        }
    }
}

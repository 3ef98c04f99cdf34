//! Swap entries in page tables: resolving a fault on one (from the swap cache, or by
//! reading the slot into a new frame), and the slot references that blocks hold.
//!
//! A slot's reference count is the number of page-table blocks naming it plus one while
//! a frame for it is in the swap cache (as a frame's mapcount counts blocks). A fault on
//! a swap entry that misses the cache takes a slot reference of its own with the block
//! locked, lets go of every page-table lock, reads the slot into a new frame that it
//! files in the cache, and retries: the retry finds the frame in the cache and maps it.
//! Faults of other vCPUs or VMs on the same slot meanwhile find the frame in the cache
//! while it is being read and wait (retry) without holding any page-table lock.

use crate::sync::RmapArc as Arc;

use super::reclaim::SwapState;
use super::{Access, AddressSpace, AnonVma, Manager, Region, SpaceError};
use crate::frame::FrameFlags;
use crate::pagetable::{Block, PTES_PER_BLOCK, Pte, Slot};
use crate::pool::{AllocError, FrameInit};
use crate::reclaim::lru::LruList;
use crate::reclaim::swap::SwapSlot;
use crate::reclaim::swapcache::CacheState;
use crate::types::{Order, Pfn};

/// What a fault with its block locked could not finish there.
#[derive(Debug)]
pub(super) enum Pending {
    /// Read this slot into the swap cache, then retry. The fault holds a reference on
    /// the slot (taken with the block locked), which the read gives back.
    Read {
        /// The slots of a naturally aligned run of consecutive swap entries, none of
        /// them cached (readahead).
        run: Vec<SwapSlot>,
        /// The faulting entry's place in `run`.
        at: usize,
        /// Where the new frames are filed in the reverse map.
        anon: Arc<AnonVma>,
        /// The run's first page offset.
        pgoff: u64,
    },
    /// The slot's frame is in the cache but still being read: retry without locks.
    Wait,
    /// No free run of the fault-around size: reclaim one whole block with no lock
    /// held, then retry (once per fault; the retry maps a smaller run if it must). A
    /// fault that took single frames whenever free memory ran short would scatter the
    /// VM over the pool, one host mapping per page.
    Block,
}

thread_local! {
    /// Set while a fault retries after a [`Pending::Block`] reclaim: it takes what runs
    /// it can get rather than ask again.
    static BLOCK_TRIED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the fault on this thread may still ask for a whole block ([`Pending::Block`]).
pub(super) fn may_ask_for_block() -> bool {
    !BLOCK_TRIED.with(std::cell::Cell::get)
}

/// What a swap fault mapped.
#[derive(Debug, Clone, Copy)]
pub(super) struct SwapIn {
    /// Pages mapped (the faulting one and its readahead neighbours).
    pub(super) pages: u64,
}

/// How many times a fault retries a swap-in (waits included) before it reports the
/// slot as stuck: far beyond any real read.
const SWAPIN_RETRIES: u32 = 1_000_000;

impl Manager {
    /// A new reference on the slot a swap entry names (an entry copied with its block).
    pub(super) fn swap_dup(&self, slot: SwapSlot) {
        if let Some(sw) = self.swap.get() {
            sw.dev.dup(slot, 1);
        }
    }

    /// Drops one reference on `slot`. When only the swap cache's reference is left and
    /// the cached frame is mapped nowhere, the frame leaves the cache and is freed: no
    /// entry can ask for it any more.
    pub(super) fn swap_put(&self, slot: SwapSlot) {
        let Some(sw) = self.swap.get() else {
            return;
        };
        let mut freed = None;
        {
            let mut cache = sw.cache.lock();
            let left = sw.dev.put(slot);
            if left == 1 {
                if let Some(e) = cache.get(slot) {
                    let f = self.pool.frame(e.pfn);
                    if e.state != CacheState::Reading && f.mapcount() == 0 && f.refcount() == 1 {
                        cache.remove(slot);
                        f.clear(FrameFlags::SWAPCACHE);
                        sw.dev.put(slot);
                        if f.put() == 0 {
                            freed = Some(e.pfn);
                        }
                    }
                }
            }
        }
        if let Some(pfn) = freed {
            super::release_link(self.pool.frame(pfn));
            self.release_frames(&[pfn]);
        }
    }

    /// Makes `slot`'s block this VM's own (copying a block shared by a fork), keeping
    /// frames' mapcounts and slots' counts equal to the number of blocks naming them.
    pub(super) fn exclusive<'s>(&self, slot: &'s mut Slot) -> &'s mut Block {
        let pool = &self.pool;
        let mut freed = Vec::new();
        let mut slots_released = Vec::new();
        let block = slot.make_exclusive(
            // A migration entry holds its frame's mapping as a present entry does.
            |p| {
                if let Some(pfn) = p.frame() {
                    let f = pool.frame(pfn);
                    f.map();
                    f.get();
                } else if let Some(s) = swap_slot(p) {
                    self.swap_dup(s);
                }
            },
            |p| {
                if let Some(pfn) = p.frame() {
                    self.drop_mapping(pfn, &mut freed);
                } else if let Some(s) = swap_slot(p) {
                    slots_released.push(s);
                }
            },
        );
        self.release_frames(&freed);
        for s in slots_released {
            self.swap_put(s);
        }
        block
    }

    /// For a write fault reusing the frame `pfn` (locked by the caller, mapped once): takes
    /// it out of the swap cache if no entry but the cache's names its slot, and frees the
    /// slot (the frame is about to differ from it). False if entries still need the slot.
    pub(super) fn uncache_for_write(&self, pfn: Pfn) -> bool {
        let Some(sw) = self.swap.get() else {
            return false;
        };
        let mut cache = sw.cache.lock();
        let Some(slot) = cache.slot_of(pfn) else {
            // Left the cache meanwhile (its last entry went): nothing to do.
            return !self.pool.frame(pfn).flags().contains(FrameFlags::SWAPCACHE);
        };
        if sw.dev.count(slot) != 1 {
            return false;
        }
        cache.remove(slot);
        let f = self.pool.frame(pfn);
        f.clear(FrameFlags::SWAPCACHE);
        sw.dev.put(slot);
        let left = f.put();
        debug_assert!(left >= 1, "the mapping's reference is still held");
        true
    }

    /// Drops one mapping of `pfn`; pushes it to `freed` when that was its last reference.
    ///
    /// A frame left with the swap cache's reference only (its last mapping went) leaves
    /// the cache and is freed: its slot keeps what any remaining swap entry needs.
    pub(super) fn drop_mapping(&self, pfn: Pfn, freed: &mut Vec<Pfn>) {
        let frame = self.pool.frame(pfn);
        let maps = frame.unmap();
        match frame.put() {
            0 => {
                super::release_link(frame);
                freed.push(pfn);
            }
            1 if maps == 0
                && frame.flags().contains(FrameFlags::SWAPCACHE)
                && self.uncache_orphan(pfn) =>
            {
                super::release_link(frame);
                freed.push(pfn);
            }
            _ => {}
        }
    }

    /// Takes `pfn` out of the swap cache if the cache's reference is its only one and
    /// its contents are on disk (or no entry needs them); true if its last reference
    /// went (the caller frees it).
    pub(super) fn uncache_orphan(&self, pfn: Pfn) -> bool {
        let Some(sw) = self.swap.get() else {
            return false;
        };
        let f = self.pool.frame(pfn);
        let mut cache = sw.cache.lock();
        let Some(slot) = cache.slot_of(pfn) else {
            return false;
        };
        let state = cache.get(slot).map(|e| e.state);
        let needed = sw.dev.count(slot) > 1;
        let ok = f.refcount() == 1
            && f.mapcount() == 0
            && (state == Some(CacheState::Clean) || !needed && state != Some(CacheState::Reading));
        if !ok {
            return false;
        }
        cache.remove(slot);
        f.clear(FrameFlags::SWAPCACHE);
        drop(cache);
        sw.dev.put(slot);
        f.put() == 0
    }

    /// Reads the consecutive entries' slots `run` (entry `at` of them is the faulting
    /// one) into contiguous new frames charged to `vm` and files them in the swap cache
    /// (state `Clean`), skipping slots another fault filed meanwhile: swap readahead, so
    /// that the run comes back as one host mapping. Falls back to the faulting slot alone
    /// when no contiguous run of frames is free. Gives back the fault's reference on
    /// every slot of `run`. Called with no page-table lock held.
    pub(super) fn swap_read(
        &self,
        vm: &AddressSpace,
        run: &[SwapSlot],
        at: usize,
        anon: Arc<AnonVma>,
        first_pgoff: u64,
    ) -> Result<(), SpaceError> {
        let Some(sw) = self.swap.get() else {
            unreachable!("a swap entry exists only with swap attached");
        };
        let result = self.swap_read_run(sw, vm, run, at, &anon, first_pgoff);
        for &slot in run {
            self.swap_put(slot);
        }
        result
    }

    fn swap_read_run(
        &self,
        sw: &SwapState,
        vm: &AddressSpace,
        run: &[SwapSlot],
        at: usize,
        anon: &Arc<AnonVma>,
        first_pgoff: u64,
    ) -> Result<(), SpaceError> {
        debug_assert!(run.len().is_power_of_two() && at < run.len());
        if sw.cache.lock().get(run[at]).is_some() {
            return Ok(());
        }
        let order = Order::new(run.len().trailing_zeros()).unwrap_or(Order::ZERO);
        // `first`: the place in `run` of the first slot read.
        // No free run: reclaim a whole block first (as a first touch does, see
        // `Pending::Block`), so that a swapped-in run does not come back scattered.
        let alloc_run = || match vm.alloc(order, FrameInit::Overwritten) {
            Err(
                e @ SpaceError::Alloc {
                    source: AllocError::Exhausted { .. },
                    ..
                },
            ) if run.len() > 1 && self.can_reclaim_for(&e) => {
                self.reclaim_block();
                vm.alloc(order, FrameInit::Overwritten)
            }
            r => r,
        };
        let (base, first, slots) = match alloc_run() {
            Ok(p) => (p, 0, run),
            Err(_) if run.len() > 1 => (
                vm.alloc(Order::ZERO, FrameInit::Overwritten)?,
                at,
                &run[at..=at],
            ),
            Err(e) => return Err(e),
        };
        // Each frame of the run goes into the cache (as `Reading`: no fault maps it yet)
        // or, if its slot is cached already, straight back to the pool.
        let mut reading = Vec::with_capacity(slots.len());
        let mut unused = Vec::new();
        {
            let mut cache = sw.cache.lock();
            for (i, &slot) in slots.iter().enumerate() {
                let pfn = base.offset(i as u32);
                if cache.insert(slot, pfn, CacheState::Reading) {
                    let frame = self.pool.frame(pfn);
                    frame.set(FrameFlags::SWAPCACHE | FrameFlags::SWAP_BACKED);
                    // The cache's slot reference; the frame's reference from `alloc` is
                    // the cache's frame reference.
                    sw.dev.dup(slot, 1);
                    reading.push((slot, pfn, (first + i) as u64));
                } else {
                    unused.push(pfn);
                }
            }
        }
        self.release_frames(&unused);
        let mut failed = None;
        for &(_, pfn, i) in &reading {
            let frame = self.pool.frame(pfn);
            let old = frame.set_rmap_link(AnonVma::into_raw(Arc::clone(anon)), first_pgoff + i);
            debug_assert_eq!(old, 0, "a new frame has no rmap link");
            vm.mark_mlocked(first_pgoff + i, pfn, 1);
        }
        let pages: Vec<(SwapSlot, *mut u8)> = reading
            .iter()
            .map(|&(slot, pfn, _)| (slot, self.pool.page_ptr(pfn)))
            .collect();
        // SAFETY: each frame is ours alone (in the cache as `Reading`, which no fault
        // maps) and a whole page; the device writes it and nothing else touches it.
        let reads = unsafe { sw.dev.read_many(&pages) };
        for (&(slot, pfn, _), read) in reading.iter().zip(reads) {
            let frame = self.pool.frame(pfn);
            let mut cache = sw.cache.lock();
            match read {
                Ok(()) => {
                    cache.set_state(slot, CacheState::Clean);
                    drop(cache);
                    self.lru_of(pfn).push(pfn, frame, LruList::Active);
                    self.rstats.add(&self.rstats.major_faults, 1);
                }
                Err(source) => {
                    cache.remove(slot);
                    frame.clear(FrameFlags::SWAPCACHE);
                    drop(cache);
                    sw.dev.put(slot);
                    if frame.put() == 0 {
                        super::release_link(frame);
                        self.release_frames(&[pfn]);
                    }
                    // Only the faulting page's failure is the fault's; a neighbour is
                    // read again when it is touched.
                    if slot == run[at] {
                        failed = Some(source);
                    }
                }
            }
        }
        match failed {
            Some(source) => Err(SpaceError::Swap { vm: vm.id, source }),
            None => Ok(()),
        }
    }
}

/// The slot a swap entry names.
pub(super) fn swap_slot(p: Pte) -> Option<SwapSlot> {
    match p.kind() {
        crate::pagetable::PteKind::Swap { slot } => Some(SwapSlot(slot)),
        _ => None,
    }
}

impl AddressSpace {
    /// A fault on the swap entry `index` (slot `slot`), its block locked: maps the slot's
    /// frame from the swap cache, or says what must happen without the lock.
    pub(super) fn swap_fault(
        &self,
        region: &Region,
        slot_guard: &mut Slot,
        index: u64,
        slot: SwapSlot,
    ) -> Result<Result<SwapIn, Pending>, SpaceError> {
        let Some(sw) = self.mm.swap.get() else {
            unreachable!("a swap entry exists only with swap attached");
        };
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        let len = region
            .pt
            .table
            .block_len((index / PTES_PER_BLOCK as u64) as usize);
        let cache = sw.cache.lock();
        let pfn = match cache.get(slot) {
            Some(e) if e.state == CacheState::Reading => return Ok(Err(Pending::Wait)),
            Some(e) => e.pfn,
            None => {
                // Readahead: the largest naturally aligned run around the fault, up to
                // SWAP_CLUSTER entries, whose entries are all swap entries with no cached
                // frame, so that they come back as contiguous frames (one host mapping).
                let mut n = SWAP_CLUSTER.min(len);
                let run = loop {
                    let first = s & !(n - 1);
                    let slots: Option<Vec<SwapSlot>> = (first..first + n)
                        .map(|t| {
                            (t < len)
                                .then(|| swap_slot(slot_guard.pte(t)))
                                .flatten()
                                .filter(|&sl| cache.get(sl).is_none())
                        })
                        .collect();
                    match slots {
                        Some(v) => break (first, v),
                        None if n > 1 => n /= 2,
                        None => unreachable!("the faulting entry is a swap entry, not cached"),
                    }
                };
                drop(cache);
                let (first, run) = run;
                // A reference of our own on each slot keeps it (and its contents) from
                // being freed and reused while no lock is held.
                for &sl in &run {
                    sw.dev.dup(sl, 1);
                }
                let own = region
                    .rmap
                    .anon_vma()
                    .expect("anon_vma_prepare ran at region creation");
                // Slots named by this block alone, in a block this VM alone uses, are this
                // VM's pages: file them under its own anon_vma. Otherwise other VMs of the
                // fork tree may name them too: file them under the root, which reaches
                // them all.
                let exclusive =
                    slot_guard.sharers() == 1 && run.iter().all(|&sl| sw.dev.count(sl) == 2);
                let anon = if exclusive {
                    Arc::clone(own)
                } else {
                    AnonVma::root_arc(own)
                };
                let first_index = index - (s - first) as u64;
                return Ok(Err(Pending::Read {
                    at: s - first,
                    run,
                    anon,
                    pgoff: region.pt.pgoff(first_index),
                }));
            }
        };
        // The faulting entry and its neighbours whose slots have cached frames at the
        // neighbouring frame numbers (a readahead run) are mapped together.
        let window = s & !(SWAP_CLUSTER - 1);
        let cached_at = |t: usize| -> Option<(SwapSlot, Pfn)> {
            let sl = swap_slot(slot_guard.pte(t))?;
            let e = cache.get(sl)?;
            let want = i64::from(pfn.0) + t as i64 - s as i64;
            (e.state == CacheState::Clean && i64::from(e.pfn.0) == want).then_some((sl, e.pfn))
        };
        let mut lo = s;
        let mut hi = s + 1;
        if INSTALL_RUNS {
            while lo > window && cached_at(lo - 1).is_some() {
                lo -= 1;
            }
            while hi < (window + SWAP_CLUSTER).min(len) && cached_at(hi).is_some() {
                hi += 1;
            }
        }
        let run: Vec<(SwapSlot, Pfn)> = (lo..hi)
            .map(|t| {
                if t == s {
                    Some((slot, pfn))
                } else {
                    cached_at(t)
                }
            })
            .collect::<Option<_>>()
            .unwrap_or_else(|| vec![(slot, pfn)]);
        let (lo, hi) = if run.len() == hi - lo {
            (lo, hi)
        } else {
            (s, s + 1)
        };
        for &(_, p) in &run {
            // The mapping's reference, taken under the cache lock so that reclaim (which
            // frees a cached frame only at its own references) sees it.
            self.mm.pool.frame(p).get();
        }
        drop(cache);
        let block = self.mm.exclusive(slot_guard);
        for (k, &(sl, p)) in run.iter().enumerate() {
            debug_assert_eq!(swap_slot(block.get(lo + k)), Some(sl));
            block.set(lo + k, Pte::present(p, false));
            self.mm.pool.frame(p).map();
        }
        let first_index = index - (s - lo) as u64;
        let pages = (hi - lo) as u64;
        if let Err(e) = self.map_run(region, first_index, pages, run[0].1, false) {
            let _ = region.pt.mmu.unmap_run(region.pt.gfn(first_index), pages);
            let mut freed = Vec::new();
            for (k, &(sl, p)) in run.iter().enumerate() {
                block.set(lo + k, Pte::swap(sl.0));
                self.mm.drop_mapping(p, &mut freed);
            }
            self.mm.release_frames(&freed);
            return Err(self.host_err(e));
        }
        // The entries' slot references go; the cache keeps the slots (the copies on disk
        // stay valid while the frames are mapped read-only).
        for &(sl, _) in &run {
            self.mm.swap_put(sl);
        }
        self.mm.rstats.add(&self.mm.rstats.swapins, pages);
        Ok(Ok(SwapIn { pages }))
    }

    /// Runs `attempt` (which locks what it needs and resolves a fault) until it needs
    /// nothing done without locks: reads swap slots, waits for reads in flight, and
    /// reclaims memory when an allocation fails, between attempts.
    pub(super) fn resolve<T>(
        &self,
        mut attempt: impl FnMut() -> Result<Result<T, Pending>, SpaceError>,
    ) -> Result<T, SpaceError> {
        /// Clears the thread's `BLOCK_TRIED` however the fault ends.
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                BLOCK_TRIED.with(|b| b.set(false));
            }
        }
        let _reset = Reset;
        let mut reclaims = 0;
        for _ in 0..SWAPIN_RETRIES {
            match attempt() {
                Ok(Err(Pending::Block)) => {
                    BLOCK_TRIED.with(|b| b.set(true));
                    self.mm.reclaim_block();
                }
                Ok(Ok(t)) => return Ok(t),
                Ok(Err(Pending::Read {
                    run,
                    at,
                    anon,
                    pgoff,
                })) => match self.mm.swap_read(self, &run, at, anon, pgoff) {
                    Ok(()) => {}
                    Err(e) if self.mm.can_reclaim_for(&e) => {
                        if !self.reclaim_or_give_up(&e, &mut reclaims) {
                            return Err(self.mm.out_of_memory(self, e));
                        }
                    }
                    Err(e) => return Err(e),
                },
                Ok(Err(Pending::Wait)) => std::thread::yield_now(),
                Err(e) if self.mm.can_reclaim_for(&e) => {
                    if !self.reclaim_or_give_up(&e, &mut reclaims) {
                        return Err(self.mm.out_of_memory(self, e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(SpaceError::SwapStuck { vm: self.id })
    }

    /// One round of direct reclaim for a fault whose allocation failed with `e`; false
    /// once the fault should give up: [`DIRECT_RECLAIM_TRIES`] rounds, or three in a row
    /// that freed nothing (others may be reclaiming the same frames, so one empty
    /// round is not the end).
    fn reclaim_or_give_up(&self, e: &SpaceError, rounds: &mut u32) -> bool {
        if *rounds >= DIRECT_RECLAIM_TRIES {
            return false;
        }
        *rounds += 1;
        if self.mm.direct_reclaim(self, e) == 0 {
            *rounds += DIRECT_RECLAIM_TRIES / 3;
            std::thread::yield_now();
        }
        true
    }

    /// For a software access or fault: whether `access` is satisfied by `pte`.
    pub(super) fn satisfied(pte: Pte, access: Access) -> bool {
        match access {
            Access::Read => pte.is_present(),
            Access::Write => pte.is_writable(),
        }
    }
}

/// The most swap entries one fault reads ahead (and, with [`INSTALL_RUNS`], maps
/// together).
const SWAP_CLUSTER: usize = 64;

/// Whether a fault maps the readahead neighbours of its page along with it (one host
/// mapping for the run).
const INSTALL_RUNS: bool = true;

/// Direct reclaim runs per fault before its allocation failure is reported.
const DIRECT_RECLAIM_TRIES: u32 = 8;

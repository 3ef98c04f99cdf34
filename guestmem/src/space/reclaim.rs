//! Reclaim on the manager's side: shrinking a node's LRU lists (`shrink_folio_list`),
//! unmapping a frame from every entry that names it (`try_to_unmap`), writing it out,
//! and direct reclaim for a fault whose allocation failed. See [`crate::reclaim`].
//!
//! A frame being reclaimed is isolated (off the LRU, with a reference) and locked (the
//! frame lock bit) from its referenced check to the end of its write. Its entries are
//! replaced with swap entries before its contents are written: a guest cannot change it
//! any more (every host view lost it), and a fault meanwhile finds it in the swap cache.

use std::sync::atomic::{AtomicU64, Ordering};

use super::manager::Young;
use super::{AddressSpace, Manager, RegionHandle, SpaceError};
use crate::charge::ChargeError;
use crate::frame::{Frame, FrameFlags};
use crate::pagetable::Pte;
use crate::pool::AllocError;
use crate::reclaim::lru::{Lru, LruList};
use crate::reclaim::swap::{PendingWrite, SwapDevice, SwapSlot};
use crate::reclaim::swapcache::{CacheState, SwapCache};
use crate::reclaim::{Punch, ReclaimConfig, ReclaimStats};
use crate::space::ReferencedLocking;
use crate::types::{PAGE_SIZE, Pfn};

/// Guest pages whose host mapping goes as one when reclaim unmaps one of them (see
/// `Manager::unmap_span`): the fault-around and readahead run, a divisor of a block.
pub const UNMAP_SPAN: u64 = 64;
const _: () = assert!(crate::pagetable::PTES_PER_BLOCK as u64 % UNMAP_SPAN == 0);

/// Swap attached to a manager: the device, the swap cache, and how reclaim runs.
#[derive(Debug)]
pub struct SwapState {
    pub(super) dev: SwapDevice,
    pub(super) cache: SwapCache,
    pub(super) config: ReclaimConfig,
    /// When the background reclaimer last returned idle free memory ([`Punch::WhenIdle`]).
    pub(super) idle_released: std::sync::Mutex<Option<std::time::Instant>>,
}

/// [`ReclaimStats`] as atomics (all `Relaxed`: statistics).
#[derive(Debug, Default)]
pub struct ReclaimCounters {
    pub(super) scanned: AtomicU64,
    pub(super) activated: AtomicU64,
    pub(super) deactivated: AtomicU64,
    pub(super) reclaimed: AtomicU64,
    pub(super) written: AtomicU64,
    pub(super) filled: AtomicU64,
    pub(super) clean_dropped: AtomicU64,
    pub(super) entries_unmapped: AtomicU64,
    pub(super) unmap_failed: AtomicU64,
    pub(super) write_failed: AtomicU64,
    pub(super) no_slot: AtomicU64,
    pub(super) punched: AtomicU64,
    pub(super) swapins: AtomicU64,
    pub(super) major_faults: AtomicU64,
    pub(super) direct_runs: AtomicU64,
    pub(super) background_runs: AtomicU64,
    pub(super) unevictable: AtomicU64,
}

impl ReclaimCounters {
    pub(super) fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ReclaimStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReclaimStats {
            scanned: r(&self.scanned),
            activated: r(&self.activated),
            deactivated: r(&self.deactivated),
            reclaimed: r(&self.reclaimed),
            written: r(&self.written),
            filled: r(&self.filled),
            clean_dropped: r(&self.clean_dropped),
            entries_unmapped: r(&self.entries_unmapped),
            unmap_failed: r(&self.unmap_failed),
            write_failed: r(&self.write_failed),
            no_slot: r(&self.no_slot),
            punched: r(&self.punched),
            swapins: r(&self.swapins),
            major_faults: r(&self.major_faults),
            direct_runs: r(&self.direct_runs),
            background_runs: r(&self.background_runs),
            unevictable: r(&self.unevictable),
        }
    }
}

/// Errors of attaching swap.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The manager already has a swap device.
    #[error("this manager already has a swap device; attach one per manager")]
    AlreadyAttached,
}

/// How a shrink goes about it (see `Manager::shrink_node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phases {
    /// Whole blocks, then frame by frame.
    WholeThenFrames,
    /// Whole blocks only (a fault asking for a free run).
    WholeOnly,
}

/// What one shrink pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShrinkResult {
    /// Frames examined.
    pub scanned: u64,
    /// Frames freed.
    pub reclaimed: u64,
}

/// Why reclaim takes a frame out of the swap cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Uncache {
    /// Its contents are in its slot and nothing maps it: it is about to be freed.
    Unmapped,
    /// Its slot went bad (a failed write): it gets a new one once no entry names the old.
    LeavingBadSlot,
}

/// One frame's way through a shrink batch.
enum Verdict {
    /// Back on the LRU (`Active`: it was used, or it could not be reclaimed now).
    Keep(LruList),
    /// Unmapped everywhere and in the cache as `Unwritten`: write it, then free it.
    Write(SwapSlot),
    /// Unmapped everywhere and out of the cache: free it.
    Free,
}

impl Manager {
    /// Attaches a swap device: from now on reclaim can swap guest pages out.
    pub fn attach_swap(&self, dev: SwapDevice, config: ReclaimConfig) -> Result<(), AttachError> {
        self.swap
            .set(SwapState {
                dev,
                cache: SwapCache::default(),
                config,
                idle_released: std::sync::Mutex::new(None),
            })
            .map_err(|_| AttachError::AlreadyAttached)
    }

    /// The swap device, if attached.
    pub fn swap_device(&self) -> Option<&SwapDevice> {
        self.swap.get().map(|s| &s.dev)
    }

    /// Reclaim's configuration, if swap is attached.
    pub fn reclaim_config(&self) -> Option<ReclaimConfig> {
        self.swap.get().map(|s| s.config)
    }

    /// What reclaim did so far.
    pub fn reclaim_stats(&self) -> ReclaimStats {
        self.rstats.snapshot()
    }

    /// Frames in the swap cache now.
    pub fn swap_cache_frames(&self) -> usize {
        self.swap.get().map_or(0, |s| s.cache.lock().len())
    }

    /// The LRU lists of the node holding `pfn`.
    pub(super) fn lru_of(&self, pfn: Pfn) -> &Lru {
        &self.lrus[usize::from(self.pool.node_of(pfn).id().0)]
    }

    /// The LRU lists of every node.
    pub fn lrus(&self) -> &[Lru] {
        &self.lrus
    }

    /// Puts a run of new frames on their node's inactive list.
    pub(super) fn lru_add_run(&self, first: Pfn, pages: u64) {
        let lru = self.lru_of(first);
        lru.push_run(
            first,
            (0..pages as u32).map(|i| self.pool.frame(first.offset(i))),
        );
    }

    /// Whether a fault that failed with `e` may reclaim and retry.
    pub(super) fn can_reclaim_for(&self, e: &SpaceError) -> bool {
        self.swap.get().is_some()
            && matches!(
                e,
                SpaceError::Alloc {
                    source: AllocError::Exhausted { .. },
                    ..
                } | SpaceError::Charge(ChargeError::Limit { .. })
            )
    }

    /// Direct reclaim for `vm`, whose allocation failed with `e`: a VM at its own limit
    /// reclaims its own frames; otherwise any frames of the node. Holds no lock of `vm`.
    /// Returns the frames it freed.
    pub(super) fn direct_reclaim(&self, vm: &AddressSpace, e: &SpaceError) -> u64 {
        let Some(sw) = self.swap.get() else {
            return 0;
        };
        self.rstats.add(&self.rstats.direct_runs, 1);
        let own = matches!(e, SpaceError::Charge(ChargeError::Limit { .. }));
        let filter = own.then(|| vm.charge.id());
        let want = sw.config.batch as u64;
        let mut freed = 0;
        for node in 0..self.lrus.len() {
            freed += self.shrink_node(node, want, filter).reclaimed;
            if freed >= want {
                break;
            }
        }
        freed
    }

    /// The error of a fault that reclaim could not help: `e` with the swap file's state.
    pub(super) fn out_of_memory(&self, vm: &AddressSpace, e: SpaceError) -> SpaceError {
        let Some(sw) = self.swap.get() else {
            return e;
        };
        let st = sw.dev.stats();
        SpaceError::OutOfMemory {
            vm: vm.id,
            source: Box::new(e),
            swap_used: st.used,
            swap_slots: st.slots,
            stopped: sw
                .dev
                .stop_reason()
                .map_or_else(String::new, |r| format!(", {r}")),
        }
    }

    /// For a fault that found no free block for its fault-around run: reclaims one whole
    /// block (`UNMAP_SPAN` frames, only blocks with no frame in use), scanning a few
    /// blocks at most; the caller holds no page-table lock. (A VM at its own frame limit
    /// is not sent here: freeing other VMs' blocks would not let it allocate.)
    pub(super) fn reclaim_block(&self) {
        let Some(sw) = self.swap.get() else {
            return;
        };
        self.rstats.add(&self.rstats.direct_runs, 1);
        for node in 0..self.lrus.len() {
            if self
                .shrink(node, UNMAP_SPAN, None, Phases::WholeOnly, sw)
                .reclaimed
                > 0
            {
                return;
            }
        }
    }

    /// Reclaims up to `want` frames of node `node` (of one charge only, if `filter`):
    /// ages the active list when the inactive list is shorter, then shrinks the inactive
    /// list in batches. Returns what it did. Holds no lock between batches.
    pub fn shrink_node(&self, node: usize, want: u64, filter: Option<u32>) -> ShrinkResult {
        match self.swap.get() {
            Some(sw) => self.shrink(node, want, filter, Phases::WholeThenFrames, sw),
            None => ShrinkResult::default(),
        }
    }

    fn shrink(
        &self,
        node: usize,
        want: u64,
        filter: Option<u32>,
        phases: Phases,
        sw: &SwapState,
    ) -> ShrinkResult {
        let mut res = ShrinkResult::default();
        let lru = &self.lrus[node];
        let batch = sw.config.batch.max(1);
        // Scan at most the whole node twice per call: a node with nothing reclaimable
        // (everything referenced, swap full) returns instead of spinning.
        let frames = u64::from(self.pool.nodes()[node].frames());
        let budget = 2 * frames + batch as u64;
        let whole_scan = want.max(batch as u64).saturating_mul(8).min(frames);
        let mut busy = Vec::new();
        // Balancing ages the active list once per call at most, so that a frame found
        // referenced is not aged again (and lost) before its VM can touch it again.
        let mut age_budget = lru.sizes().active + batch as u64;
        let budget = match phases {
            Phases::WholeThenFrames => budget,
            Phases::WholeOnly => whole_scan,
        };
        // One batch is written while the next is decided (asynchronous writes): its
        // frames stay locked and isolated until it is finished.
        let mut in_flight: Option<(Vec<(Pfn, Verdict)>, PendingWrite<'_>)> = None;
        let mut in_flight_frames = 0;
        while res.reclaimed + in_flight_frames < want && res.scanned < budget {
            let sizes = lru.sizes();
            // Reclaim for one VM ages every pass: the inactive list may hold only other
            // VMs' frames, which it passes over.
            if (sizes.inactive < sizes.active && age_budget > 0) || filter.is_some() {
                self.age_active(lru, batch, sw.config.referenced);
                age_budget = age_budget.saturating_sub(batch as u64);
            }
            // Lumpy: each inactive tail frame with its inactive block-mates. Whole
            // blocks first (reclaimed only if no frame of the block is in use); frame by
            // frame once eight times what was asked for (or the whole node) was scanned
            // that way, so that blocks with one page in use each cannot keep their cold
            // pages from a VM that needs them (as Linux splits a huge page it must
            // reclaim).
            let whole = res.scanned < whole_scan;
            let mut isolated = Vec::with_capacity(batch);
            let frame = |p| self.pool.frame(p);
            busy.clear();
            lru.isolate_blocks(
                LruList::Inactive,
                batch,
                UNMAP_SPAN as u32,
                frame,
                &mut isolated,
                &mut busy,
            );
            if isolated.is_empty() {
                if lru.sizes().active == 0 {
                    break;
                }
                self.age_active(lru, batch, sw.config.referenced);
                continue;
            }
            res.scanned += isolated.len() as u64;
            let whole = whole.then_some(busy.as_slice());
            let locked = self.decide_batch(sw, lru, &isolated, filter, whole);
            let pending = self.submit_batch(sw, &locked);
            // The last batch's write went on while this one was decided and unmapped.
            if let Some((l, p)) = in_flight.take() {
                res.reclaimed += self.finish_batch(sw, lru, l, &p.wait().failed_slots());
            }
            in_flight_frames = locked
                .iter()
                .filter(|(_, v)| matches!(v, Verdict::Write(_) | Verdict::Free))
                .count() as u64;
            in_flight = Some((locked, pending));
        }
        if let Some((l, p)) = in_flight.take() {
            res.reclaimed += self.finish_batch(sw, lru, l, &p.wait().failed_slots());
        }
        res
    }

    /// `shrink_active_list`: takes `n` frames from the active tail, tests and clears
    /// their young state, and moves the unreferenced ones to the inactive head; a
    /// referenced one goes back to the active head (second chance). Unlike Linux, which
    /// deactivates anon pages whatever their young bits say and relies on the hardware
    /// setting them again before the inactive pass, guest accesses here are known only
    /// from harvests, which a pass that cleared them would forget until the next one.
    fn age_active(&self, lru: &Lru, n: usize, locking: ReferencedLocking) {
        let mut isolated = Vec::with_capacity(n);
        // Block by block, so that a run's frames reach the inactive list together.
        lru.isolate_blocks(
            LruList::Active,
            n,
            UNMAP_SPAN as u32,
            |p| self.pool.frame(p),
            &mut isolated,
            &mut Vec::new(),
        );
        let mut deactivated = 0;
        for &pfn in &isolated {
            let f = self.pool.frame(pfn);
            let referenced = f.try_lock() && {
                let r = self.referenced_locked(pfn, f, locking).is_referenced();
                f.unlock();
                r
            };
            if referenced {
                lru.putback(pfn, f, LruList::Active);
            } else {
                lru.putback(pfn, f, LruList::Inactive);
                deactivated += 1;
            }
            self.put_frame(pfn);
        }
        self.rstats.add(&self.rstats.deactivated, deactivated);
    }

    /// Decides what to do with each of `isolated` (each with a reference held) and unmaps
    /// what goes: the frames kept locked, with their verdicts, for [`Manager::finish_batch`]
    /// once the writes of the `Write` ones are done.
    fn decide_batch(
        &self,
        sw: &SwapState,
        lru: &Lru,
        isolated: &[Pfn],
        filter: Option<u32>,
        whole: Option<&[u32]>,
    ) -> Vec<(Pfn, Verdict)> {
        self.rstats.add(&self.rstats.scanned, isolated.len() as u64);
        let mut held: Vec<Pfn> = Vec::with_capacity(isolated.len());
        for &pfn in isolated {
            let f = self.pool.frame(pfn);
            if filter.is_some_and(|c| f.charge_id() != c) {
                lru.putback(pfn, f, LruList::Inactive);
                self.put_frame(pfn);
                continue;
            }
            if !f.try_lock() {
                lru.putback(pfn, f, LruList::Active);
                self.put_frame(pfn);
                continue;
            }
            held.push(pfn);
        }
        let mut locked: Vec<(Pfn, Verdict)> = Vec::with_capacity(held.len());
        if let Some(busy) = whole {
            // A block goes whole or stays whole: a frame in use keeps its block-mates,
            // so that what is freed merges into runs (one host mapping each when mapped
            // again) instead of leaving single frames between frames in use. The look
            // is a peek: a kept block's frames in use are then aged by the normal check,
            // as they would have been alone, and its idle ones are left as they were. A
            // block with a frame on the active list is kept without a look.
            let block = |p: &Pfn| lru.block_of(*p, UNMAP_SPAN as u32);
            for group in held.chunk_by(|a, b| block(a) == block(b)) {
                let go: Vec<bool> = if busy.contains(&block(&group[0])) {
                    Vec::new()
                } else {
                    group
                        .iter()
                        .map(|&p| self.evictable_peek(sw, p, self.pool.frame(p)))
                        .collect()
                };
                let all_go = go.len() == group.len() && !go.contains(&false);
                for (i, &pfn) in group.iter().enumerate() {
                    let f = self.pool.frame(pfn);
                    let v = if all_go {
                        self.reclaim_unreferenced(sw, pfn, f)
                    } else if go.get(i) == Some(&false) {
                        let _ = self.evictable(sw, pfn, f);
                        Verdict::Keep(LruList::Active)
                    } else {
                        Verdict::Keep(LruList::Inactive)
                    };
                    locked.push((pfn, v));
                }
            }
        } else {
            for pfn in held {
                let v = self.reclaim_one(sw, pfn, self.pool.frame(pfn));
                locked.push((pfn, v));
            }
        }
        locked
    }

    /// Starts the writes of a decided batch: one request per run of consecutive slots.
    fn submit_batch<'a>(&self, sw: &'a SwapState, locked: &[(Pfn, Verdict)]) -> PendingWrite<'a> {
        let writes: Vec<(SwapSlot, *const u8)> = locked
            .iter()
            .filter_map(|(pfn, v)| match v {
                Verdict::Write(slot) => Some((*slot, self.pool.page_ptr(*pfn).cast_const())),
                _ => None,
            })
            .collect();
        // SAFETY: every page is a frame that stays locked and isolated until
        // `finish_batch`, which runs after the write is collected; no entry maps it and no
        // host view maps it (its entries were all replaced by swap entries), and a write
        // fault on it from the swap cache copies it (the frame lock and reclaim's
        // reference keep it from being reused): nothing writes it meanwhile.
        unsafe { sw.dev.submit(&writes) }
    }

    /// Completes a decided batch whose writes are done (`failed`: the slots whose write
    /// failed): frames written or dropped are freed, the rest go back to their lists.
    /// Returns the frames freed.
    fn finish_batch(
        &self,
        sw: &SwapState,
        lru: &Lru,
        locked: Vec<(Pfn, Verdict)>,
        failed: &[SwapSlot],
    ) -> u64 {
        let mut to_free = Vec::new();
        for (pfn, v) in locked {
            let f = self.pool.frame(pfn);
            let keep = match v {
                Verdict::Keep(list) => Some(list),
                Verdict::Free => None,
                Verdict::Write(slot) if failed.contains(&slot) => {
                    // The page stays in memory: its entries find it in the cache. An EIO
                    // slot is bad now and the frame gets a new slot once its entries are
                    // back; a full disk stops swap-out.
                    self.rstats.add(&self.rstats.write_failed, 1);
                    Some(LruList::Active)
                }
                Verdict::Write(slot) => {
                    self.rstats.add(&self.rstats.written, 1);
                    sw.cache.lock().set_state(slot, CacheState::Clean);
                    if self.uncache_if_unused(sw, slot, pfn, Uncache::Unmapped) {
                        None
                    } else {
                        // A fault mapped it from the cache during the write.
                        Some(LruList::Active)
                    }
                }
            };
            f.unlock();
            match keep {
                Some(list) => {
                    if list == LruList::Active {
                        self.rstats.add(&self.rstats.activated, 1);
                    }
                    lru.putback(pfn, f, list);
                    self.put_frame(pfn);
                }
                None => to_free.push(pfn),
            }
        }
        self.free_reclaimed(sw, to_free)
    }

    /// The decision for one isolated, locked frame: keep it, or unmap it and say what is
    /// left to do.
    fn reclaim_one(&self, sw: &SwapState, pfn: Pfn, f: &Frame) -> Verdict {
        if !self.evictable(sw, pfn, f) {
            return Verdict::Keep(LruList::Active);
        }
        self.reclaim_unreferenced(sw, pfn, f)
    }

    /// Whether an isolated, locked frame may go: not locked in memory and not
    /// referenced (the check clears its young state).
    fn evictable(&self, sw: &SwapState, pfn: Pfn, f: &Frame) -> bool {
        if f.flags().contains(FrameFlags::MLOCKED) {
            self.rstats.add(&self.rstats.unevictable, 1);
            return false;
        }
        !self
            .referenced_locked(pfn, f, sw.config.referenced)
            .is_referenced()
    }

    /// [`Manager::reclaim_one`] for a frame [`Manager::evictable`] let go.
    fn reclaim_unreferenced(&self, sw: &SwapState, pfn: Pfn, f: &Frame) -> Verdict {
        // The slot the frame's contents go to, and whether it already holds them.
        let cached = {
            let cache = sw.cache.lock();
            cache
                .slot_of(pfn)
                .map(|s| (s, cache.get(s).map(|e| e.state)))
        };
        let slot = match cached {
            Some((slot, Some(CacheState::Clean))) => slot,
            Some((slot, _)) if sw.dev.is_bad(slot) => {
                // Its write failed: once no entry names the bad slot, the frame leaves the
                // cache and is reclaimed afresh, with a new slot.
                if !self.uncache_if_unused(sw, slot, pfn, Uncache::LeavingBadSlot) {
                    return Verdict::Keep(LruList::Active);
                }
                if f.mapcount() == 0 {
                    return Verdict::Free;
                }
                match self.new_slot(sw, pfn) {
                    Some(s) => s,
                    None => return Verdict::Keep(LruList::Active),
                }
            }
            Some((slot, _)) => slot,
            None => {
                if f.mapcount() == 0 {
                    // Not mapped and not cached: a transient holder has it; leave it.
                    return Verdict::Keep(LruList::Inactive);
                }
                match self.new_slot(sw, pfn) {
                    Some(s) => s,
                    None => return Verdict::Keep(LruList::Active),
                }
            }
        };
        if !self.try_to_unmap(pfn, f, slot) {
            self.rstats.add(&self.rstats.unmap_failed, 1);
            return Verdict::Keep(LruList::Active);
        }
        // Nothing maps the frame now: its contents are final.
        let state = sw.cache.lock().get(slot).map(|e| e.state);
        if state == Some(CacheState::Clean) {
            return if self.uncache_if_unused(sw, slot, pfn, Uncache::Unmapped) {
                self.rstats.add(&self.rstats.clean_dropped, 1);
                Verdict::Free
            } else {
                Verdict::Keep(LruList::Active)
            };
        }
        if let Some(v) = same_filled(self.pool.page_ptr(pfn)) {
            sw.dev.store_filled(slot, v);
            sw.cache.lock().set_state(slot, CacheState::Clean);
            self.rstats.add(&self.rstats.filled, 1);
            return if self.uncache_if_unused(sw, slot, pfn, Uncache::Unmapped) {
                Verdict::Free
            } else {
                Verdict::Keep(LruList::Active)
            };
        }
        if sw.dev.is_stopped() {
            self.rstats.add(&self.rstats.no_slot, 1);
            return Verdict::Keep(LruList::Active);
        }
        Verdict::Write(slot)
    }

    /// A new slot for `pfn`, which goes into the cache as `Unwritten` (the cache holds
    /// the slot's first reference and one on the frame).
    fn new_slot(&self, sw: &SwapState, pfn: Pfn) -> Option<SwapSlot> {
        if sw.dev.is_stopped() {
            self.rstats.add(&self.rstats.no_slot, 1);
            return None;
        }
        let mut got = Vec::with_capacity(1);
        if sw.dev.alloc(1, &mut got) == 0 {
            self.rstats.add(&self.rstats.no_slot, 1);
            return None;
        }
        let slot = got[0];
        let f = self.pool.frame(pfn);
        let mut cache = sw.cache.lock();
        let inserted = cache.insert(slot, pfn, CacheState::Unwritten);
        debug_assert!(inserted, "a new slot is in no cache entry");
        f.get();
        f.set(FrameFlags::SWAPCACHE);
        Some(slot)
    }

    /// Takes the isolated, locked frame `pfn` out of the cache (the cache's frame and slot
    /// references go) if `why` allows it now; returns whether it did.
    fn uncache_if_unused(&self, sw: &SwapState, slot: SwapSlot, pfn: Pfn, why: Uncache) -> bool {
        let f = self.pool.frame(pfn);
        let mut cache = sw.cache.lock();
        if cache.get(slot).map(|e| e.pfn) != Some(pfn) {
            return false;
        }
        let allowed = match why {
            // Entries may name the slot: they read it back. No mapping may remain, and
            // no one but the cache and reclaim may hold the frame (a fault that found it
            // in the cache took its reference under this lock).
            Uncache::Unmapped => f.mapcount() == 0 && f.refcount() == 2,
            // No entry may name the bad slot; the frame's mappings stay.
            Uncache::LeavingBadSlot => sw.dev.count(slot) == 1 && f.refcount() == 2 + f.mapcount(),
        };
        if !allowed {
            return false;
        }
        cache.remove(slot);
        f.clear(FrameFlags::SWAPCACHE);
        sw.dev.put(slot);
        let left = f.put();
        debug_assert!(left >= 1, "reclaim's reference is still held");
        true
    }

    /// Frees reclaimed frames (each with reclaim's reference as its last one): host
    /// memory punched, frames to the pool. Returns how many were freed.
    fn free_reclaimed(&self, sw: &SwapState, to_free: Vec<Pfn>) -> u64 {
        let mut freed = Vec::with_capacity(to_free.len());
        for pfn in to_free {
            let f = self.pool.frame(pfn);
            if f.put() == 0 {
                super::release_link(f);
                freed.push(pfn);
            }
            // Otherwise a transient holder (a walker) frees it when it lets go.
        }
        if sw.config.punch == Punch::OnReclaim && !freed.is_empty() {
            let n = self.pool.punch_frames(&mut freed);
            self.rstats.add(&self.rstats.punched, n);
        }
        self.rstats.add(&self.rstats.reclaimed, freed.len() as u64);
        self.release_frames_to_zone(&freed);
        freed.len() as u64
    }

    /// [`Punch::WhenIdle`]: with every node at or above the high watermark, returns the
    /// host memory of free blocks of [`Punch::IDLE_ORDER`] or more, once per
    /// [`Punch::IDLE_PERIOD`] at most. Returns the frames released.
    pub(super) fn release_idle(&self, sw: &SwapState) -> u64 {
        if sw.config.punch != Punch::WhenIdle || self.charges.available() < sw.config.high_watermark
        {
            return 0;
        }
        {
            let mut last = sw.idle_released.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Punch::IDLE_PERIOD) {
                return 0;
            }
            *last = Some(std::time::Instant::now());
        }
        self.return_idle_memory()
    }

    /// A caller done moving memory between nodes gives the host the memory of the frames
    /// the moves freed (migration keeps them for reuse while it runs): the allocators'
    /// caches go back to the zones first, where a moved run's old frames merge into
    /// blocks again, then [`Manager::return_idle_memory`]. Returns the frames released.
    pub fn return_moved_memory(&self) -> u64 {
        self.pool.drain_caches();
        self.return_idle_memory()
    }

    /// Returns the host memory of the pool's free blocks of [`Punch::IDLE_ORDER`] or more
    /// that still have some: what kswapd does when memory is idle (the allocators' caches
    /// are left as they are). Returns the frames released.
    pub fn return_idle_memory(&self) -> u64 {
        match self.pool.release_idle_memory(Punch::IDLE_ORDER) {
            Ok(n) => {
                self.rstats.add(&self.rstats.punched, n);
                n
            }
            Err(e) => {
                tracing::warn!("returning idle free memory to the host failed: {e}");
                0
            }
        }
    }

    /// `try_to_unmap`: replaces every entry naming the locked frame `pfn` with a swap
    /// entry for `slot` (one slot reference each) and removes it from each host view.
    /// True if no entry names the frame any more. A block shared by a fork is made the
    /// VM's own first (as a write fault would), so each sharer's entry changes alone.
    fn try_to_unmap(&self, pfn: Pfn, f: &Frame, slot: SwapSlot) -> bool {
        let mut ok = true;
        let mut unmapped = 0;
        let _ = self.walk_frame(f, rmap::WalkMode::Shared, |region: &RegionHandle, pgoff| {
            let index = pgoff - region.start.0;
            if index >= region.table.pages() {
                return std::ops::ControlFlow::Continue(());
            }
            let Ok((mut g, s)) = region.table.lock(index) else {
                // A poisoned block keeps its entries: the frame stays.
                ok = false;
                return std::ops::ControlFlow::Break(());
            };
            if g.pte(s).pfn() != Some(pfn) {
                return std::ops::ControlFlow::Continue(());
            }
            let (lo, pages) = self.unmap_span(&g, index, s, region.table.pages());
            let block = self.exclusive(&mut g);
            let old = block.get(s);
            block.set(s, Pte::swap(slot.0));
            self.swap_dup(slot);
            // A span the view cannot map (a block-mate's reclaim unmapped it, and no
            // fault mapped it since: both under this block lock) needs no host call.
            if region.host_mapped.any(lo, pages) {
                if region.mmu.unmap_run(region.gfn(lo), pages).is_err() {
                    block.set(s, old);
                    self.swap_put(slot);
                    ok = false;
                    return std::ops::ControlFlow::Break(());
                }
                region.host_mapped.update(lo, pages, false);
            }
            f.unmap();
            let left = f.put();
            debug_assert!(left > 0, "reclaim holds a reference");
            unmapped += 1;
            std::ops::ControlFlow::Continue(())
        });
        self.rstats.add(&self.rstats.entries_unmapped, unmapped);
        ok && f.mapcount() == 0
    }

    /// The host-view range to unmap when entry `index` (slot `s` of the locked block
    /// `g`) loses its frame: the naturally aligned [`UNMAP_SPAN`] around it, inside the
    /// block and the region, so that the hole replaces whole host mappings instead of
    /// splitting a run into three per page (the host's `vm.max_map_count`). The span's
    /// other present pages stay in the manager's tables and fault back in as one run on
    /// their next access (`MapExisting`). A span holding a frame locked in memory is
    /// left mapped: only the one page is unmapped. Returns the first index and pages.
    fn unmap_span(
        &self,
        g: &crate::pagetable::Slot,
        index: u64,
        s: usize,
        table_pages: u64,
    ) -> (u64, u64) {
        let lo = index & !(UNMAP_SPAN - 1);
        let hi = (lo + UNMAP_SPAN).min(table_pages);
        let first = s - (index - lo) as usize;
        let locked = (0..(hi - lo) as usize).any(|t| {
            g.pte(first + t)
                .pfn()
                .is_some_and(|p| self.pool.frame(p).flags().contains(FrameFlags::MLOCKED))
        });
        if locked { (index, 1) } else { (lo, hi - lo) }
    }

    /// The referenced check of a frame the caller holds locked (see
    /// [`Manager::frame_referenced`]); also consumes a `REFERENCED` mark left by access
    /// harvesting.
    pub(super) fn referenced_locked(
        &self,
        pfn: Pfn,
        f: &Frame,
        locking: ReferencedLocking,
    ) -> super::Referenced {
        let mut out = self.walk_referenced(pfn, f, locking, Young::TestAndClear);
        if f.clear(FrameFlags::REFERENCED)
            .contains(FrameFlags::REFERENCED)
        {
            out.referenced += 1;
        }
        out
    }

    /// Whether a locked frame could go now, changing nothing: not locked in memory, and
    /// the referenced check would find it unreferenced (young state and `REFERENCED`
    /// marks are looked at, not cleared).
    fn evictable_peek(&self, sw: &SwapState, pfn: Pfn, f: &Frame) -> bool {
        let flags = f.flags();
        !flags.contains(FrameFlags::MLOCKED)
            && !flags.contains(FrameFlags::REFERENCED)
            && !self
                .walk_referenced(pfn, f, sw.config.referenced, Young::Peek)
                .is_referenced()
    }
}

/// The `u64` a page repeats, if it is one value over and over (all zero among them).
fn same_filled(page: *const u8) -> Option<u64> {
    // SAFETY: `page` is a whole frame of the pool's direct map (PAGE_SIZE bytes, 8-byte
    // aligned), locked and mapped by no one, so nothing writes it while we read.
    let words = unsafe { std::slice::from_raw_parts(page.cast::<u64>(), PAGE_SIZE / 8) };
    let first = words[0];
    words.iter().all(|&w| w == first).then_some(first)
}

impl Manager {
    /// Frames on the LRU of every node (inactive, active).
    pub fn lru_sizes(&self) -> (u64, u64) {
        self.lrus.iter().fold((0, 0), |(i, a), l| {
            let s = l.sizes();
            (i + s.inactive, a + s.active)
        })
    }
}

impl AddressSpace {
    /// Keeps the guest pages `range` resident (Linux's `mlock`): reclaim never swaps their
    /// frames out. For memory the host reads or writes on the guest's behalf in ways that
    /// cannot wait for a fault (on this machine's software KVM, the guest's page tables,
    /// which its shadow MMU walks and updates). Applies to pages present now and to every
    /// page faulted in later; forks inherit it.
    pub fn mlock(&self, range: std::ops::Range<crate::Gfn>) -> Result<(), SpaceError> {
        self.mlocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(range.start.0..range.end.0);
        let regions = self.read_regions()?;
        for r in &regions.list {
            let start = r.pt.start.0;
            let end = start + r.pt.table.pages();
            for gfn in range.start.0.max(start)..range.end.0.min(end) {
                let (slot, s) = self.lock_entry(r, gfn - start)?;
                if let Some(pfn) = slot.pte(s).pfn() {
                    self.mm.pool.frame(pfn).set(FrameFlags::MLOCKED);
                }
            }
        }
        Ok(())
    }

    /// Marks the new frames `pfn ..` mapped at `gfn ..` locked if their pages are.
    pub(super) fn mark_mlocked(&self, gfn: u64, pfn: Pfn, pages: u64) {
        let locked = self.mlocked.read().unwrap_or_else(|e| e.into_inner());
        if locked.is_empty() {
            return;
        }
        for i in 0..pages {
            if locked.iter().any(|r| r.contains(&(gfn + i))) {
                self.mm
                    .pool
                    .frame(pfn.offset(i as u32))
                    .set(FrameFlags::MLOCKED);
            }
        }
    }
}

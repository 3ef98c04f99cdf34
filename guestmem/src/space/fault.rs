//! Fault resolution: first touch (with fault-around), copy-on-write (copy or reuse),
//! and re-mapping present pages into the host view.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::Ordering;

use super::swapin::Pending;
use super::{Access, AddressSpace, AnonVma, CowHint, CowRun, FaultOutcome, Region, SpaceError};
use crate::charge::ChargeError;
use crate::frame::{Frame, FrameFlags};
use crate::mmu::{HostMmuError, MapRun};
use crate::pagetable::{Block, PTES_PER_BLOCK, Pte, PteKind, Slot};
use crate::pool::{AllocError, FrameInit};
use crate::reclaim::swap::SwapSlot;
use crate::types::{Gfn, Order, Pfn};

/// Blocks after the faulting one that one fault maps at most with it (64 MiB).
const MAP_AHEAD_BLOCKS: usize = 32;

thread_local! {
    /// The last run this thread had mapped into a host view (first gfn, pages): what
    /// [`AddressSpace::handle_fault_run`] reports.
    static MAPPED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

impl AddressSpace {
    /// [`AddressSpace::handle_fault`], and the pages around `gfn` that the host view now
    /// maps for it (the run its last host mapping covered, else `gfn` alone): a VMM wakes
    /// every access waiting in them, not only the one that faulted, so other vCPUs
    /// waiting in the same run go on without a fault of their own being resolved (and
    /// the run mapped again).
    pub fn handle_fault_run(
        &self,
        gfn: Gfn,
        access: Access,
    ) -> Result<(FaultOutcome, Range<Gfn>), SpaceError> {
        MAPPED.with(|m| m.set((0, 0)));
        let o = self.handle_fault(gfn, access)?;
        let (first, pages) = MAPPED.with(Cell::get);
        let run = if (first..first + pages).contains(&gfn.0) {
            Gfn(first)..Gfn(first + pages)
        } else {
            gfn..gfn.offset(1)
        };
        Ok((o, run))
    }

    /// Resolves a guest fault at `gfn` (what the VMM calls for a userfaultfd event).
    ///
    /// A fault on a swapped-out page reads it back with no page-table lock held and
    /// retries; a fault whose allocation fails reclaims memory (when swap is attached)
    /// and retries, before it reports the failure.
    pub fn handle_fault(&self, gfn: Gfn, access: Access) -> Result<FaultOutcome, SpaceError> {
        self.record_touch(gfn);
        let mut swapped = false;
        let o = self.resolve(|| {
            let regions = self.read_regions()?;
            let region = self.find(&regions, gfn)?;
            let index = gfn.0 - region.pt.start.0;
            let (mut slot, s) = self.lock_entry(region, index)?;
            let pte = slot.effective(s);
            if Self::satisfied(pte, access) {
                // The manager has the page; the host view lost it or never had it (a
                // fork child's view is filled this way, and so are the neighbours of a
                // page reclaim unmapped). The guest touched it: that is an access.
                slot.mark_accessed(s, access == Access::Write);
                let pages = self.map_existing(region, &slot, index)?;
                let o = FaultOutcome::MapExisting { pages };
                self.mm.count(&self.counters, o);
                return Ok(Ok(o));
            }
            let r = self.fault_locked(region, &mut slot, index, access)?;
            if matches!(r, Err(Pending::Read { .. })) {
                swapped = true;
            }
            Ok(r)
        })?;
        if swapped {
            self.counters.add(&self.counters.major_faults, 1);
        }
        Ok(o)
    }

    /// Resolves a fault with the entry's block locked. On `Ok(Ok(_))` the entry
    /// satisfies `access` and the host view maps it; `Ok(Err(pending))` says what must
    /// happen with no lock held before the caller retries (see [`AddressSpace::resolve`]).
    pub(super) fn fault_locked(
        &self,
        region: &Region,
        slot: &mut Slot,
        index: u64,
        access: Access,
    ) -> Result<Result<FaultOutcome, Pending>, SpaceError> {
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        let o = match slot.effective(s).kind() {
            PteKind::Empty => match self.zero_fill(region, slot, index)? {
                Ok(o) => o,
                Err(p) => return Ok(Err(p)),
            },
            PteKind::Present {
                writable: false, ..
            } if access == Access::Write => self.write_protect_fault(region, slot, index)?,
            PteKind::Present { .. } => FaultOutcome::MapExisting {
                pages: self.map_existing(region, slot, index)?,
            },
            PteKind::Swap { slot: sw } => {
                let sw = match self.swap_fault(region, slot, index, SwapSlot(sw))? {
                    Ok(sw) => sw,
                    Err(p) => return Ok(Err(p)),
                };
                self.counters.add(&self.counters.swapins, sw.pages);
                if access == Access::Write {
                    // Mapped read-only from the swap cache: the write copies it, or takes
                    // it out of the cache if it is this VM's alone.
                    self.write_protect_fault(region, slot, index)?
                } else {
                    // Read-only, from the swap cache: the slot stays valid, so reclaiming
                    // the page again before it is written costs no I/O.
                    FaultOutcome::MapExisting { pages: sw.pages }
                }
            }
            // The page is being moved to another node: wait (with no lock held) until
            // the migration restores the entry.
            PteKind::Migration { .. } => return Ok(Err(Pending::Wait)),
        };
        self.mm.count(&self.counters, o);
        Ok(Ok(o))
    }

    /// Makes `slot`'s block this VM's own (see [`Manager::exclusive`]).
    pub(super) fn exclusive<'s>(&self, slot: &'s mut Slot) -> &'s mut Block {
        self.mm.exclusive(slot)
    }

    /// Allocates `2^order` contiguous frames charged to this VM: its limit and the
    /// reservations of others are checked first, the pool asked only if they allow it.
    pub(super) fn alloc(&self, order: Order, init: FrameInit) -> Result<Pfn, SpaceError> {
        let frames = u64::from(order.frames());
        let charges = &self.mm.charges;
        let paid = match charges.try_charge(&self.charge, frames) {
            Ok(p) => p,
            Err(ChargeError::Reserved { .. }) if !charges.any_reserved() => {
                // Nothing is reserved: every frame is simply in use.
                return Err(SpaceError::Alloc {
                    vm: self.id,
                    source: AllocError::Exhausted {
                        frames: order.frames(),
                        free: self.mm.pool.free_frames(),
                    },
                });
            }
            Err(e) => return Err(e.into()),
        };
        let (node, only) = self.policy.pick(self.mm.pool.nodes().len());
        match self.mm.pool.alloc_policy(node, only, order, init) {
            Ok(pfn) => {
                self.mm.kswapd_wake_if_low();
                for i in 0..order.frames() {
                    self.mm
                        .pool
                        .frame(pfn.offset(i))
                        .set_charge(self.charge.id());
                }
                Ok(pfn)
            }
            Err(source) => {
                charges.cancel(&self.charge, frames, paid);
                Err(SpaceError::Alloc {
                    vm: self.id,
                    source,
                })
            }
        }
    }

    pub(super) fn host_err(&self, source: HostMmuError) -> SpaceError {
        SpaceError::Host {
            vm: self.id,
            source,
        }
    }

    pub(super) fn map_run(
        &self,
        region: &Region,
        index: u64,
        pages: u64,
        pfn: Pfn,
        writable: bool,
    ) -> Result<(), HostMmuError> {
        let node = self.mm.pool.node_of(pfn);
        region.pt.host_mapped.update(index, pages, true);
        MAPPED.with(|m| m.set((region.pt.gfn(index).0, pages)));
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
    ) -> Result<Result<FaultOutcome, Pending>, SpaceError> {
        // The largest naturally aligned run around `index`, up to `2^fault_around` (more,
        // up to a block, for a fault that goes on where the VM's last run ended: a
        // sequential fill, see `streams`), whose entries are all empty and for which the
        // pool has a contiguous block: a pool too fragmented for the full run still maps
        // 32, 16, ... pages per host mapping rather than one (each host mapping counts
        // against `vm.max_map_count`). With swap attached, a fault that finds no free
        // block for the largest run that fits first has one reclaimed whole
        // (`Pending::Block`).
        let mut run = None;
        let mut first_fit = true;
        let gfn = region.pt.gfn(index);
        let base = self.mm.config.fault_around.get();
        // A grown run (a sequential stream) is opportunistic: only the configured size
        // may ask reclaim for a whole block.
        let max = self.streams.max_order(gfn, base);
        for o in (1..=max).rev() {
            let n = 1u64 << o;
            let first = index & !(n - 1);
            let s0 = (first % PTES_PER_BLOCK as u64) as usize;
            let fits = first + n <= region.pt.table.pages()
                && (s0..s0 + n as usize).all(|s| slot.pte(s).is_empty());
            let Some(order) = Order::new(o).filter(|_| fits) else {
                continue;
            };
            match self.alloc(order, FrameInit::Zeroed) {
                Ok(pfn) => {
                    run = Some((first, order, pfn));
                    break;
                }
                Err(
                    e @ SpaceError::Alloc {
                        source: AllocError::Exhausted { .. },
                        ..
                    },
                ) if first_fit && o <= base && self.mm.can_reclaim_for(&e) => {
                    if super::swapin::may_ask_for_block() {
                        return Ok(Err(Pending::Block));
                    }
                }
                Err(_) => {}
            }
            if o <= base {
                first_fit = false;
            }
        }
        let (first, order, pfn) = match run {
            Some(r) => r,
            None => (
                index,
                Order::ZERO,
                self.alloc(Order::ZERO, FrameInit::Zeroed)?,
            ),
        };
        let pages = u64::from(order.frames());
        self.streams
            .record(gfn, region.pt.gfn(first + pages), order.get());
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
            if region
                .pt
                .mmu
                .unmap_run(region.pt.gfn(first), pages)
                .is_err()
            {
                // The view may still map the run (an unmap needs host mappings too, and
                // the host may be at its limit): the frames stay this VM's, entries and
                // all, so its next access maps them again and its exit, which revokes the
                // whole view, frees them. Nothing is lost and nothing handed on.
                tracing::warn!(vm = %self.id, pages, "host view may keep a failed run; its frames stay with the VM");
                return Err(self.host_err(e));
            }
            let mut freed = Vec::with_capacity(pages as usize);
            for i in 0..pages {
                block.set(s0 + i as usize, Pte::EMPTY);
                self.drop_mapping(pfn.offset(i as u32), &mut freed);
            }
            self.free_frames(&freed);
            return Err(self.host_err(e));
        }
        self.mark_mlocked(region.pt.pgoff(first), pfn, pages);
        self.mm.lru_add_run(pfn, pages);
        Ok(Ok(FaultOutcome::ZeroFill { pages }))
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
        if self.try_reuse(region, block, index, old) {
            // The pages ahead that are this VM's alone too go writable with it, in the
            // same host call (a fork's last sharer rewriting its memory takes one fault
            // per run, not per page).
            let max = u64::from(self.mm.config.cow_around.frames()).max(1);
            let limit = (max - index % max)
                .min((PTES_PER_BLOCK - s) as u64)
                .min(region.pt.table.pages() - index);
            let mut n = 1;
            while n < limit {
                let t = s + n as usize;
                let p = block.get(t);
                let Some(pfn) = p.pfn().filter(|_| !p.is_writable()) else {
                    break;
                };
                if !self.try_reuse(region, block, index + n, pfn) {
                    break;
                }
                n += 1;
            }
            let faulting = block.get(s);
            block.set(s, faulting.mkdirty().mkyoung());
            if let Err(e) = region.pt.mmu.protect_run(region.pt.gfn(index), n, true) {
                // Back to write-protected, entries and host view: the call may have
                // unprotected part of the run (one host mapping at a time) before it
                // failed. Only the frames' rmap links moved (to where they now belong).
                block.set(s, faulting);
                for i in 0..n as usize {
                    let p = block.get(s + i);
                    block.set(s + i, p.wrprotect());
                }
                let _ = region.pt.mmu.protect_run(region.pt.gfn(index), n, false);
                return Err(self.host_err(e));
            }
            return Ok(FaultOutcome::CowReuse { pages: n });
        }
        let (first, n, behind) = self.cow_run(region, block, index);
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
            if region.pt.mmu.unmap_run(region.pt.gfn(first), n).is_err() {
                // The view may still map the copies: keep them as the entries (the old
                // frames are let go as on success), so nothing another VM shares is
                // reachable and the exit's revoke frees them.
                tracing::warn!(vm = %self.id, pages = n, "host view may keep a failed run; the copies stay with the VM");
                for old in olds.iter().filter_map(|p| p.pfn()) {
                    self.drop_mapping(old, &mut freed);
                }
                self.free_frames(&freed);
                return Err(self.host_err(e));
            }
            for (i, old_pte) in olds.iter().enumerate() {
                block.set(s0 + i, *old_pte);
                self.drop_mapping(new.offset(i as u32), &mut freed);
            }
            self.free_frames(&freed);
            return Err(self.host_err(e));
        }
        for old in olds.iter().filter_map(|p| p.pfn()) {
            self.drop_mapping(old, &mut freed);
        }
        self.free_frames(&freed);
        self.mark_mlocked(region.pt.pgoff(first), new, n);
        self.mm.lru_add_run(new, n);
        let hint = CowHint {
            end: region.pt.gfn(first + n),
            behind: behind + n,
        };
        self.cow_hint.store(hint.pack(), Ordering::Relaxed);
        Ok(FaultOutcome::CowCopy { pages: n })
    }

    /// Makes the write-protected entry `index` (frame `pfn`) writable without a copy if
    /// this is the frame's only mapping and its lock is free: true if it did.
    fn try_reuse(&self, region: &Region, block: &mut Block, index: u64, pfn: Pfn) -> bool {
        let frame = self.mm.pool.frame(pfn);
        // Reuse needs the frame lock: it may move the frame's rmap link, which walkers
        // read with the frame locked.
        // No other VM gains a mapping meanwhile: only a fork of this VM shares its frames,
        // and a fork holds this VM's mmap_lock for writing, a fault for reading.
        let cached = frame.flags().contains(FrameFlags::SWAPCACHE);
        // A frame in the swap cache has the cache's reference too.
        let refs = 1 + u32::from(cached);
        if !(frame.mapcount() == 1 && frame.refcount() == refs && frame.try_lock()) {
            return false;
        }
        if cached && !self.mm.uncache_for_write(pfn) {
            // Other entries still name its slot (they must read what it holds now), or
            // its write-out has not finished: copy instead.
            frame.unlock();
            return false;
        }
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
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        block.set(s, block.get(s).mkwrite());
        true
    }

    /// The run of entries a copy-on-write fault at `index` copies (see [`CowRun`]):
    /// `(first, pages)`, `pages` a power of two, every entry of it present and
    /// write-protected, inside one block and the region.
    fn cow_run(&self, region: &Region, block: &Block, index: u64) -> (u64, u64, u64) {
        let max = u64::from(self.mm.config.cow_around.frames());
        if max <= 1 {
            return (index, 1, 0);
        }
        let shared = |t: usize| {
            let p = block.get(t);
            p.is_present() && !p.is_writable()
        };
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        match self.mm.config.cow_run {
            CowRun::Fixed => {
                let first = index & !(max - 1);
                let s0 = (first % PTES_PER_BLOCK as u64) as usize;
                let whole =
                    first + max <= region.pt.table.pages() && (s0..s0 + max as usize).all(shared);
                if whole {
                    (first, max, 0)
                } else {
                    (index, 1, 0)
                }
            }
            CowRun::Adaptive => {
                // The private run just behind the fault: pages this VM wrote since the
                // fork (copied, reused or zero-filled: writable entries).
                let behind = (0..s)
                    .rev()
                    .take(max as usize)
                    .take_while(|&t| {
                        let p = block.get(t);
                        p.is_present() && p.is_writable()
                    })
                    .count() as u64;
                // A private run that ended right here (across a block boundary too).
                let hint = CowHint::unpack(self.cow_hint.load(Ordering::Relaxed));
                let hinted = if hint.end == region.pt.gfn(index) {
                    hint.behind
                } else {
                    0
                };
                let behind = behind.max(hinted);
                if behind == 0 {
                    return (index, 1, 0);
                }
                // Twice the run behind, and up to the next multiple of `max` at most, so
                // that a long rewrite settles into naturally aligned full runs (which
                // never cross a block).
                let want = (2 * behind).min(max - index % max);
                let block_end = PTES_PER_BLOCK - s;
                let region_end = region.pt.table.pages() - index;
                let limit = want.min(block_end as u64).min(region_end) as usize;
                let ahead = (s..s + limit).take_while(|&t| shared(t)).count() as u64;
                // A power of two, so the copies are one naturally aligned allocation.
                let pages = 1u64 << ahead.max(1).ilog2();
                (index, pages, behind)
            }
        }
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
        let mut pages = (hi - lo) as u64;
        // A run that reaches the block's end goes on into the blocks after it while their
        // entries go on with the same frames (a clone's or a re-born parent's memory is
        // mostly long runs): one host mapping instead of one per block. Those blocks are
        // only tried (no lock order between blocks is needed) and stay locked until the
        // host view maps them, as every host mapping is made under its entries' locks.
        let mut more = Vec::new();
        if hi == len {
            let table = &region.pt.table;
            let mut b = (index / PTES_PER_BLOCK as u64) as usize + 1;
            let mut want = i64::from(first_pfn.0) + pages as i64;
            while b < table.blocks() && more.len() < MAP_AHEAD_BLOCKS {
                let Ok(Some((next, _))) = table.try_lock(b as u64 * PTES_PER_BLOCK as u64) else {
                    break;
                };
                let n = table.block_len(b);
                let k = (0..n)
                    .take_while(|&t| {
                        let e = next.effective(t);
                        e.is_writable() == w
                            && e.pfn().is_some_and(|p| {
                                i64::from(p.0) == want + t as i64 && node.contains(p)
                            })
                    })
                    .count();
                if k == 0 {
                    break;
                }
                pages += k as u64;
                want += k as i64;
                more.push(next);
                if k < n {
                    break;
                }
                b += 1;
            }
        }
        if let Err(e) = self.map_run(region, first_index, pages, first_pfn, w) {
            // A half-made read-only run could be writable: leave nothing of it mapped.
            let _ = region.pt.mmu.unmap_run(region.pt.gfn(first_index), pages);
            return Err(self.host_err(e));
        }
        Ok(pages)
    }

    /// Drops one mapping of `pfn`; pushes it to `freed` when that was its last reference.
    pub(super) fn drop_mapping(&self, pfn: Pfn, freed: &mut Vec<Pfn>) {
        self.mm.drop_mapping(pfn, freed);
    }

    pub(super) fn free_frames(&self, freed: &[Pfn]) {
        self.mm.release_frames(freed);
    }
}

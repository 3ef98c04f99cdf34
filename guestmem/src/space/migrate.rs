//! Migration of guest pages between nodes (`migrate_pages`; seed 4's locking).
//!
//! A run of frames (consecutive frames mapped at consecutive guest pages, up to a
//! naturally aligned [`MIGRATE_RUN`]) moves as one:
//!
//! 1. **Take.** Each frame is referenced and locked (the frame lock: swap-out and another
//!    migration keep away). Frames in the swap cache, locked in memory, or being freed
//!    stay where they are (`busy`).
//! 2. **Allocate** a run on the target node: one contiguous block if it has one, else
//!    frame by frame. A node that cannot supply the run fails it cleanly (`no_memory`):
//!    nothing was unmapped yet.
//! 3. **Unmap.** A reverse-map walk of each frame ([`MigrateWalk`]: the root lock
//!    exclusive, as Linux before 2012, or shared, as Linux after seed 4) visits every
//!    region that may map it. In each, the block is locked and every entry of the run
//!    it holds becomes a migration entry (keeping its writable, young and dirty bits);
//!    then the region's host view drops the run's pages with **one** call (one host TLB
//!    invalidation per run and region, not per page). A fault on a migration entry (guest
//!    or software) waits, holding no lock, and retries.
//! 4. **Copy** each frame into its new frame, which takes over the old one's reverse-map
//!    link and charge.
//! 5. **Remap.** A second walk turns every migration entry back into a present entry for
//!    the new frame (a frame shared by K clones moves once and all K map the new frame;
//!    a fork meanwhile shared the block into a new VM, which the walk finds too). The host
//!    views map the run again on the guest's next access, one mapping per run
//!    (`MapExisting`).
//! 6. **Free** the old frames (their last reference was the migration's) into the old
//!    node's pool, host memory kept for its next allocations.
//!
//! A migration entry holds its frame's mapping and reference as the present entry did
//! ([`Pte::frame`]), so fork, exit and copy-on-write of a block count it as before. A
//! fork shares its parent's blocks before it links the child's regions into the reverse
//! map; a run in flight holds `Manager::fork_link` for reading, which that window takes
//! for writing, so every region that can hold a run's migration entries is one its walks
//! see (Linux gets the same from linking first and walking parents before children).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{AddressSpace, Manager, RegionHandle, SpaceError};
use crate::frame::FrameFlags;
use crate::pagetable::{PTES_PER_BLOCK, Pte};
use crate::pool::FrameInit;
use crate::types::{Gfn, NodeId, Order, Pfn};

/// The most pages one run moves: 512 (2 MiB), a page-table block.
pub const MIGRATE_RUN: usize = PTES_PER_BLOCK;

/// How migration's reverse-map walks take the anon_vma root lock (seed 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MigrateWalk {
    /// The root lock for writing: migrations exclude each other and every other walk,
    /// as Linux's anon_vma mutex did before 2012.
    Exclusive,
    /// The root lock for reading (the rwsem Linux adopted): migrations and reclaim walk
    /// in parallel; only link and unlink (fork, exit) are excluded.
    Shared,
    /// No root lock: a run holds `Manager::topology` for reading, which every link and
    /// unlink takes for writing, so no chain changes under any root while it walks (the
    /// proof an `rmap::WalkGuard` asks for).
    Unlocked,
}

/// What a migration did (counted like `/proc/vmstat`'s `pgmigrate_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrateStats {
    /// Pages moved to the target node.
    pub pages: u64,
    /// Runs moved (each unmapped and remapped together).
    pub runs: u64,
    /// Host view unmap calls (TLB invalidations) made.
    pub host_unmaps: u64,
    /// Pages left where they were because someone else held them (locked by reclaim or
    /// another migration, in the swap cache, locked in memory, being freed).
    pub busy: u64,
    /// Pages left where they were because the target node had no room.
    pub no_memory: u64,
    /// Pages left where they were because a mapping could not be changed (a failed VM's
    /// poisoned page table, a host view that refused the unmap).
    pub failed: u64,
    /// Pages already on the target node (nothing to do).
    pub already: u64,
}

impl MigrateStats {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &MigrateStats) {
        self.pages += o.pages;
        self.runs += o.runs;
        self.host_unmaps += o.host_unmaps;
        self.busy += o.busy;
        self.no_memory += o.no_memory;
        self.failed += o.failed;
        self.already += o.already;
    }
}

/// [`MigrateStats`] summed over a manager's life (all `Relaxed`: statistics).
#[derive(Debug, Default)]
pub struct MigrateCounters {
    pages: AtomicU64,
    runs: AtomicU64,
    host_unmaps: AtomicU64,
    busy: AtomicU64,
    no_memory: AtomicU64,
    failed: AtomicU64,
}

impl MigrateCounters {
    fn add(&self, s: &MigrateStats) {
        for (c, v) in [
            (&self.pages, s.pages),
            (&self.runs, s.runs),
            (&self.host_unmaps, s.host_unmaps),
            (&self.busy, s.busy),
            (&self.no_memory, s.no_memory),
            (&self.failed, s.failed),
        ] {
            c.fetch_add(v, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> MigrateStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MigrateStats {
            pages: r(&self.pages),
            runs: r(&self.runs),
            host_unmaps: r(&self.host_unmaps),
            busy: r(&self.busy),
            no_memory: r(&self.no_memory),
            failed: r(&self.failed),
            already: 0,
        }
    }
}

/// One frame of a run being moved.
#[derive(Debug, Clone, Copy)]
struct Move {
    old: Pfn,
    new: Pfn,
    /// Every mapping of `old` became a migration entry.
    unmapped: bool,
    /// Blocks in which this run's walks made `old`'s entry a migration entry.
    converted: u32,
}

impl Manager {
    /// What migrations did since the manager was made.
    pub fn migrate_stats(&self) -> MigrateStats {
        self.mstats.snapshot()
    }

    /// Moves the consecutive frames `run` (mapped at consecutive guest pages of some VM)
    /// to node `target` (see the module docs). Frames that cannot move stay where they
    /// are and are counted as such.
    pub fn migrate_run(&self, run: &[Pfn], target: NodeId, walk: MigrateWalk) -> MigrateStats {
        let mut st = MigrateStats::default();
        debug_assert!(run.len() <= MIGRATE_RUN);
        debug_assert!(run.windows(2).all(|w| w[1].0 == w[0].0 + 1));
        // No fork may share a block between our walks and link its child's regions only
        // after them (the child would hold migration entries no walk restores), and no
        // region is linked or unlinked while the run walks. Taken before the frame locks
        // (the lock order in lib.rs).
        let topology = self.topology.read().unwrap_or_else(|e| e.into_inner());
        let taken: Vec<Option<Pfn>> = run.iter().map(|&p| self.take_for_migration(p)).collect();
        st.busy += taken.iter().filter(|t| t.is_none()).count() as u64;
        let olds: Vec<Pfn> = taken.iter().flatten().copied().collect();
        if olds.is_empty() {
            return st;
        }
        let Some(news) = self.alloc_on(target, run.len()) else {
            st.no_memory += olds.len() as u64;
            for p in olds {
                self.pool.frame(p).unlock();
                self.put_frame(p);
            }
            self.mstats.add(&st);
            return st;
        };
        // Frame `run[i]` moves to `news[i]`: a contiguous run stays contiguous.
        let mut moves: Vec<Option<Move>> = taken
            .iter()
            .zip(&news)
            .map(|(t, &new)| {
                t.map(|old| Move {
                    old,
                    new,
                    unmapped: true,
                    converted: 0,
                })
            })
            .collect();
        for i in 0..moves.len() {
            // A frame whose every mapping an earlier frame's walk already changed (its
            // mapcount counts the blocks naming it) needs no walk of its own. If a block
            // naming it was copied meanwhile, the count is higher and the walk runs.
            let done = moves[i].is_some_and(|m| {
                m.converted > 0 && m.converted >= self.pool.frame(m.old).mapcount()
            });
            if !done
                && moves[i].is_some_and(|m| m.unmapped)
                && !self.unmap_for_migration(&mut moves, i, walk, &topology, &mut st)
            {
                if let Some(m) = moves[i].as_mut() {
                    m.unmapped = false;
                }
            }
        }
        for m in moves.iter().flatten().filter(|m| m.unmapped) {
            // SAFETY: `m.new` is ours alone (just allocated, not yet mapped); `m.old` is
            // locked and mapped by no entry (all are migration entries) and by no host
            // view (each dropped it), so nothing writes it during the copy.
            unsafe { self.pool.copy_frame(m.new, m.old) };
            let (of, nf) = (self.pool.frame(m.old), self.pool.frame(m.new));
            let (raw, pgoff) = of.rmap_link();
            // SAFETY: `raw` is the old frame's link, alive while it is locked and
            // referenced (both held); the new frame owns the new reference.
            let anon = unsafe { super::AnonVma::clone_from_raw(raw) };
            nf.set_rmap_link(super::AnonVma::into_raw(anon), pgoff);
            if of.flags().contains(FrameFlags::SWAP_BACKED) {
                nf.set(FrameFlags::SWAP_BACKED);
            }
            nf.set_charge(of.take_charge());
        }
        for i in 0..moves.len() {
            // A moved frame that no entry names any more (its mappings all went to the
            // new frame with an earlier frame's walk) needs no walk of its own.
            let done =
                moves[i].is_some_and(|m| m.unmapped && self.pool.frame(m.old).mapcount() == 0);
            if moves[i].is_some() && !done {
                self.remap_after_migration(&moves, i, walk, &topology);
            }
        }
        for m in moves.iter().flatten().filter(|m| m.unmapped) {
            let left = self.pool.frame(m.old).mapcount();
            if left > 0 {
                // A block no walk could change (poisoned by a panic: its VM has failed),
                // or a read-only sharer the skipped walk did not see (an exit changed the
                // count): that VM keeps the old frame, with the same bytes.
                tracing::debug!(frame = %m.old, mappings = left, "a moved frame keeps a mapping its walks could not change");
            }
        }
        // Old frames go with the run's reference (their mappings went to the new ones),
        // unused new frames with the allocation's; all freed in one batch.
        let mut freed = Vec::new();
        let mut put = |p: Pfn| {
            let f = self.pool.frame(p);
            if f.put() == 0 {
                super::release_link(f);
                freed.push(p);
            }
        };
        let mut moved_new = Vec::new();
        for (i, m) in moves.iter().enumerate() {
            match m {
                Some(m) if m.unmapped => {
                    st.pages += 1;
                    moved_new.push(m.new);
                    self.pool.frame(m.old).unlock();
                    put(m.old);
                }
                Some(m) => {
                    st.failed += 1;
                    self.pool.frame(m.old).unlock();
                    put(m.old);
                    put(m.new);
                }
                None => put(news[i]),
            }
        }
        // The new frames join the LRU a contiguous piece at a time (one lock each).
        let mapped: Vec<Pfn> = moved_new
            .iter()
            .copied()
            .filter(|&p| self.pool.frame(p).mapcount() > 0)
            .collect();
        for piece in mapped.chunk_by(|a, b| b.0 == a.0 + 1) {
            self.lru_add_run(piece[0], piece.len() as u64);
        }
        for p in moved_new {
            // The allocation's reference; each mapping holds its own.
            put(p);
        }
        // The old frames keep their host memory for the old node's next allocations
        // (punching each run here cost 70% of the move's throughput, and a move back would
        // pay the host's allocation and zeroing again); a caller done moving returns what
        // stays free with `Pool::release_idle_memory`.
        self.release_frames(&freed);
        if st.pages > 0 {
            st.runs += 1;
        }
        self.mstats.add(&st);
        st
    }

    /// References and locks `pfn` for migration; `None` if it is busy or not movable.
    fn take_for_migration(&self, pfn: Pfn) -> Option<Pfn> {
        let f = self.pool.frame(pfn);
        if !f.get_unless_zero() {
            return None;
        }
        if !f.try_lock() {
            self.put_frame(pfn);
            return None;
        }
        let movable = !f.flags().contains(FrameFlags::SWAPCACHE)
            && !f.flags().contains(FrameFlags::MLOCKED)
            && f.mapcount() > 0
            && f.rmap_link().0 != 0;
        if !movable {
            f.unlock();
            self.put_frame(pfn);
            return None;
        }
        Some(pfn)
    }

    /// `n` frames on `target`: one contiguous block if the node has one (`n` a power of
    /// two), else one by one; `None` (nothing kept) if the node cannot supply them all.
    fn alloc_on(&self, target: NodeId, n: usize) -> Option<Vec<Pfn>> {
        let node = self.pool.node(target);
        if n.is_power_of_two() {
            if let Some(order) = Order::new(n.trailing_zeros()) {
                if let Ok(Some(first)) = node.alloc(order, FrameInit::Overwritten) {
                    return Some((0..n as u32).map(|i| first.offset(i)).collect());
                }
            }
        }
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            match node.alloc(Order::ZERO, FrameInit::Overwritten) {
                Ok(Some(p)) => got.push(p),
                _ => {
                    for p in got {
                        self.put_frame(p);
                    }
                    return None;
                }
            }
        }
        Some(got)
    }

    /// Step 3 for `moves[i]`: every entry naming its old frame becomes a migration entry.
    /// In each region visited, the other frames of the run it maps at the neighbouring
    /// pages change too, and the host view drops them with one call. False if a mapping
    /// could not be changed.
    fn unmap_for_migration(
        &self,
        moves: &mut [Option<Move>],
        i: usize,
        walk: MigrateWalk,
        topology: &Topology<'_>,
        st: &mut MigrateStats,
    ) -> bool {
        let Some(me) = moves[i] else {
            return true;
        };
        let f = self.pool.frame(me.old);
        let mut ok = true;
        let mut failed_frames = Vec::new();
        let mut converted = Vec::new();
        self.migration_walk(f, walk, topology, |region: &RegionHandle, pgoff| {
            let index = pgoff - region.start.0;
            if index >= region.table.pages() || (index as usize) < i {
                return ControlFlow::Continue(());
            }
            let Ok((mut g, s)) = region.table.lock(index) else {
                // A poisoned block keeps its entries: the frame stays.
                ok = false;
                return ControlFlow::Break(());
            };
            if g.pte(s).pfn() != Some(me.old) {
                return ControlFlow::Continue(());
            }
            // The run's frames this block maps at the neighbouring pages.
            let base = index - i as u64;
            let mine: Vec<(usize, usize)> =
                run_slots(moves, region, (index, s, base), |j, m, t| {
                    (m.unmapped && g.pte(t).pfn() == Some(m.old)).then_some((j, t))
                });
            if mine.is_empty() {
                return ControlFlow::Continue(());
            }
            let block = self.exclusive(&mut g);
            let mut saved = Vec::with_capacity(mine.len());
            for &(j, t) in &mine {
                let p = block.get(t);
                saved.push(p);
                if let Some(m) = p.migration_of() {
                    block.set(t, m);
                    converted.push(j);
                }
            }
            let (lo, hi) = (
                base + mine.first().map_or(0, |x| x.0) as u64,
                base + mine.last().map_or(0, |x| x.0) as u64 + 1,
            );
            if region.host_mapped.any(lo, hi - lo) {
                if region.mmu.unmap_run(region.gfn(lo), hi - lo).is_err() {
                    // Entries back as they were; the view may keep some pages, which is
                    // what the entries say again.
                    for (&(j, t), p) in mine.iter().zip(&saved) {
                        block.set(t, *p);
                        failed_frames.push(j);
                    }
                    converted.truncate(converted.len() - mine.len());
                    ok = false;
                    return ControlFlow::Continue(());
                }
                region.host_mapped.update(lo, hi - lo, false);
                st.host_unmaps += 1;
            }
            ControlFlow::Continue(())
        });
        for j in converted {
            if let Some(m) = moves[j].as_mut() {
                m.converted += 1;
            }
        }
        for j in failed_frames {
            if let Some(m) = moves[j].as_mut() {
                m.unmapped = false;
            }
        }
        ok
    }

    /// Step 5 for `moves[i]`: every migration entry naming its old frame becomes a present
    /// entry for the new frame (or the old one again, if the move failed), with the
    /// neighbouring frames of the run in each block visited.
    fn remap_after_migration(
        &self,
        moves: &[Option<Move>],
        i: usize,
        walk: MigrateWalk,
        topology: &Topology<'_>,
    ) {
        let Some(me) = moves[i] else {
            return;
        };
        let f = self.pool.frame(me.old);
        self.migration_walk(f, walk, topology, |region: &RegionHandle, pgoff| {
            let index = pgoff - region.start.0;
            if index >= region.table.pages() || (index as usize) < i {
                return ControlFlow::Continue(());
            }
            let Ok((mut g, s)) = region.table.lock(index) else {
                return ControlFlow::Continue(());
            };
            let is_mig = |p: Pte, old: Pfn| p.is_migration() && p.frame() == Some(old);
            if !is_mig(g.pte(s), me.old) {
                return ControlFlow::Continue(());
            }
            let base = index - i as u64;
            let mine: Vec<(Move, usize)> = run_slots(moves, region, (index, s, base), |_, m, t| {
                is_mig(g.pte(t), m.old).then_some((m, t))
            });
            let block = self.exclusive(&mut g);
            for (m, t) in mine {
                let p = block.get(t);
                if m.unmapped {
                    let Some(back) = p.migrated_to(m.new) else {
                        continue;
                    };
                    block.set(t, back);
                    let (of, nf) = (self.pool.frame(m.old), self.pool.frame(m.new));
                    nf.map();
                    nf.get();
                    of.unmap();
                    let left = of.put();
                    debug_assert!(left > 0, "migration holds a reference");
                } else if let Some(back) = p.migrated_to(m.old) {
                    block.set(t, back);
                }
            }
            ControlFlow::Continue(())
        });
    }
}

/// For a walk that found a run's frame at entry `index` (slot `s` of its block) of
/// `region`, with the run's first frame at page `base` there: `pick(j, move, slot)` for
/// each frame `j` of the run whose page `base + j` lies in the same block, collecting
/// what it keeps.
fn run_slots<T>(
    moves: &[Option<Move>],
    region: &RegionHandle,
    (index, s, base): (u64, usize, u64),
    mut pick: impl FnMut(usize, Move, usize) -> Option<T>,
) -> Vec<T> {
    let block_first = index - s as u64;
    let block_end = block_first
        + region
            .table
            .block_len((index / PTES_PER_BLOCK as u64) as usize) as u64;
    (0..moves.len())
        .filter_map(|j| {
            let m = moves[j]?;
            let at = base + j as u64;
            if at < block_first || at >= block_end {
                return None;
            }
            pick(j, m, (at - block_first) as usize)
        })
        .collect()
}

/// `Manager::topology` held for reading: no region links or unlinks while it lives.
type Topology<'a> = std::sync::RwLockReadGuard<'a, ()>;

impl Manager {
    /// Walks the reverse map of the locked, referenced `frame` for a migration run, in
    /// `walk`'s mode; `_topology` is the run's proof that no chain changes meanwhile.
    fn migration_walk(
        &self,
        frame: &crate::frame::Frame,
        walk: MigrateWalk,
        _topology: &Topology<'_>,
        visitor: impl FnMut(&RegionHandle, u64) -> ControlFlow<()>,
    ) {
        let mode = match walk {
            MigrateWalk::Exclusive => rmap::WalkMode::Exclusive,
            MigrateWalk::Shared => rmap::WalkMode::Shared,
            MigrateWalk::Unlocked => {
                let (raw, pgoff) = frame.rmap_link();
                if raw == 0 {
                    return;
                }
                // SAFETY: `raw` is the frame's link, alive while the frame is locked and
                // referenced (the caller holds both).
                let anon = unsafe { super::AnonVma::borrow_raw(raw) };
                // SAFETY: `_topology` is `Manager::topology` held for reading, and every
                // `anon_vma_prepare`, `anon_vma_fork` and `unlink_anon_vmas` of this
                // manager (create, fork, exit and their error paths; a `RegionRmap` is
                // only dropped after its unlink or within them) holds it for writing:
                // no region of any tree links or unlinks while the guard lives.
                let guard = unsafe { rmap::WalkGuard::new(anon) };
                let _ = rmap::rmap_walk(anon, pgoff, rmap::WalkMode::Unlocked(&guard), visitor);
                return;
            }
        };
        let _ = self.walk_frame(frame, mode, visitor);
    }
}

impl AddressSpace {
    /// Moves this VM's resident pages in `range` to node `target`, run by run (see the
    /// module docs); pages swapped out, never touched or already there are left alone.
    /// Other VMs sharing a frame (fork clones) follow it.
    pub fn migrate(
        &self,
        range: std::ops::Range<Gfn>,
        target: NodeId,
        walk: MigrateWalk,
    ) -> Result<MigrateStats, SpaceError> {
        if usize::from(target.0) >= self.mm.pool.nodes().len() {
            return Err(SpaceError::NoSuchNode {
                node: target,
                nodes: self.mm.pool.nodes().len(),
            });
        }
        let mut st = MigrateStats::default();
        let spans: Vec<(u64, u64)> = self
            .read_regions()?
            .list
            .iter()
            .map(|r| (r.pt.start.0, r.pt.table.pages()))
            .collect();
        for (ri, (rstart, rpages)) in spans.into_iter().enumerate() {
            let start = rstart.max(range.start.0);
            let end = (rstart + rpages).min(range.end.0);
            let mut index = start.saturating_sub(rstart);
            let end_index = end.saturating_sub(rstart);
            while index < end_index {
                // One block at a time under the mmap_lock (read), so a fork of this VM
                // waits for one block's runs at most.
                let regions = self.read_regions()?;
                if regions.exited {
                    return Err(SpaceError::Exited(self.id));
                }
                let r = &regions.list[ri];
                // The runs of this block: consecutive frames at consecutive pages, off the
                // target node, each within a naturally aligned chunk of up to 512 pages.
                let (g, s) = self.lock_entry(r, index)?;
                let block_left = (PTES_PER_BLOCK - s) as u64;
                let stop = (index + block_left).min(end_index);
                let mut runs: Vec<(u64, Vec<Pfn>)> = Vec::new();
                let mut cur: Vec<Pfn> = Vec::new();
                let mut cur_at = index;
                for at in index..stop {
                    let t = s + (at - index) as usize;
                    let pfn = g.pte(t).pfn();
                    let here = pfn.filter(|&p| self.mm.pool.node_of(p).id() != target);
                    if pfn.is_some() && here.is_none() {
                        st.already += 1;
                    }
                    let cont = match (cur.last(), here) {
                        (Some(l), Some(p)) => {
                            p.0 == l.0 + 1
                                && at % MIGRATE_RUN as u64 != 0
                                && self.mm.pool.node_of(p).contains(*l)
                        }
                        _ => false,
                    };
                    if !cont && !cur.is_empty() {
                        runs.push((cur_at, std::mem::take(&mut cur)));
                    }
                    if let Some(p) = here {
                        if cur.is_empty() {
                            cur_at = at;
                        }
                        cur.push(p);
                    }
                }
                if !cur.is_empty() {
                    runs.push((cur_at, cur));
                }
                drop(g);
                for (at, run) in runs {
                    // Naturally aligned power-of-two pieces: each gets one contiguous
                    // block on the target node, so it maps back as one host mapping.
                    let mut k = 0;
                    while k < run.len() {
                        let a = at + k as u64;
                        let left = run.len() - k;
                        let mut n = 1usize << a.trailing_zeros().min(9);
                        while n > left {
                            n /= 2;
                        }
                        let done = self.mm.migrate_run(&run[k..k + n], target, walk);
                        st.add(&done);
                        k += n;
                    }
                }
                drop(regions);
                // A fork or exit waiting for this VM's mmap lock or the topology lock
                // gets its turn between blocks.
                std::thread::yield_now();
                index = stop;
            }
        }
        Ok(st)
    }
}

//! Frame allocators: the magazine design of seed 5 and the two designs it is measured
//! against, chosen at runtime ([`AllocatorKind`]).
//!
//! All three hand out runs of `2^order` frames from a node's [`Zone`] (the buddy
//! structure under the zone lock); they differ in how order-0 frames are cached in front
//! of it:
//!
//! - [`AllocatorKind::GlobalLock`]: no cache; every call takes the zone lock.
//! - [`AllocatorKind::PerCpuLists`]: Linux's per-cpu page lists. Each CPU has a list with
//!   a `high` mark and a `batch`: an empty list is refilled with `batch` frames under one
//!   zone lock; a list above `high` drains `batch` frames. In user space a thread can
//!   migrate between CPUs, so each list has its own lock (uncontended in the common case,
//!   as the kernel's local-irq-disabled section is).
//! - [`AllocatorKind::Magazine`]: seed 5's magazines with Bonwick's depot. Each CPU slot
//!   holds two magazines of [`MAG_SIZE`] frames (`loaded` and `previous`) under a lock.
//!   A thread prefers its CPU's slot and, when that slot is busy, tries the others
//!   round-robin with `try_lock` (seed 5); only when every slot is busy does it wait for
//!   its own. When both magazines are empty (alloc) or full (free) the slot exchanges a
//!   whole magazine with the depot in O(1) under the depot lock; only an empty depot
//!   (alloc) or a depot at capacity (free) takes the zone lock, and then for a whole
//!   magazine of frames at once. This answers seed 5's two weaknesses: batches are a whole
//!   magazine, not one frame, and a CPU mostly reuses frames from its own slot, so frame
//!   descriptors bounce less between CPUs.
//!
//! Freeing many frames at once ([`Allocator::free_batch`], a VM exiting) takes one lock
//! per magazine-sized batch in every design.
//!
//! Lock order (see the crate's lock tree):
//! ```text
//! CPU slot lock (magazine or per-cpu list; trylock round-robin for magazines)
//!   depot lock (magazines only)
//!     zone lock
//! ```
//!
//! Frames parked in caches are invisible to the zone: when the zone cannot satisfy a
//! request, the allocator drains every cache ([`Allocator::drain`]) and tries once more
//! before it reports exhaustion, as Linux drains the pcp lists before OOM.

use crate::sync::{Mutex, SpinGuard, SpinLock, lock};
use crate::zone::{Buddy, Zone};

/// Frames in one magazine.
#[cfg(not(loom))]
pub const MAG_SIZE: usize = 64;
/// Frames in one magazine (small under loom, so that a few operations reach every
/// refill, exchange and drain path).
#[cfg(loom)]
pub const MAG_SIZE: usize = 2;
/// The per-cpu lists' refill/drain batch (Linux's default `pcp->batch` is 63 on large zones).
pub const PCP_BATCH: usize = 63;
/// The per-cpu lists' high mark (Linux: `6 * batch`).
pub const PCP_HIGH: usize = 6 * PCP_BATCH;

/// Which allocator design a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AllocatorKind {
    /// Seed 5: per-CPU magazines with trylock round-robin and a depot.
    Magazine,
    /// Linux's per-cpu page lists (the baseline seed 5 wanted to replace).
    PerCpuLists,
    /// One lock around the zone (the naive baseline).
    GlobalLock,
}

impl AllocatorKind {
    /// All designs, for experiments.
    pub const ALL: [AllocatorKind; 3] = [
        AllocatorKind::Magazine,
        AllocatorKind::PerCpuLists,
        AllocatorKind::GlobalLock,
    ];

    /// The design's short name (used in tables, JSON and on the command line).
    pub fn name(self) -> &'static str {
        match self {
            AllocatorKind::Magazine => "magazine",
            AllocatorKind::PerCpuLists => "percpu",
            AllocatorKind::GlobalLock => "global",
        }
    }
}

impl std::str::FromStr for AllocatorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AllocatorKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown allocator `{s}`: use magazine, percpu or global"))
    }
}

/// A value alone on its cache line(s), so that CPU slots do not share lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A fixed-capacity stack of node-relative frame indices.
#[derive(Debug)]
struct Mag {
    n: usize,
    frames: [u32; MAG_SIZE],
}

impl Mag {
    fn empty() -> Box<Mag> {
        Box::new(Mag {
            n: 0,
            frames: [0; MAG_SIZE],
        })
    }

    #[inline]
    fn pop(&mut self) -> Option<u32> {
        if self.n == 0 {
            return None;
        }
        self.n -= 1;
        Some(self.frames[self.n])
    }

    #[inline]
    fn push(&mut self, f: u32) -> bool {
        if self.n == MAG_SIZE {
            return false;
        }
        self.frames[self.n] = f;
        self.n += 1;
        true
    }

    fn is_full(&self) -> bool {
        self.n == MAG_SIZE
    }
}

/// One CPU slot of the magazine allocator. Protected by its slot lock.
#[derive(Debug)]
struct Slot {
    loaded: Box<Mag>,
    previous: Box<Mag>,
}

/// Whole magazines shared by all CPU slots. Protected by the depot lock.
#[derive(Debug, Default)]
#[allow(
    clippy::vec_box,
    reason = "magazines move between slots and depot as pointers, in O(1)"
)]
struct Depot {
    full: Vec<Box<Mag>>,
    empty: Vec<Box<Mag>>,
}

#[derive(Debug)]
struct MagazineAlloc {
    /// One per CPU; each protected by its own spinlock.
    slots: Box<[Padded<SpinLock<Slot>>]>,
    depot: Mutex<Depot>,
    /// Full magazines the depot keeps before it drains one to the zone.
    depot_capacity: usize,
}

#[derive(Debug)]
struct PcpList {
    frames: Vec<u32>,
}

#[derive(Debug)]
struct PerCpuAlloc {
    lists: Box<[Padded<Mutex<PcpList>>]>,
}

#[derive(Debug)]
enum Design {
    Magazine(MagazineAlloc),
    PerCpu(PerCpuAlloc),
    Global,
}

/// A node's frame allocator: a design in front of the node's zone. Frames are
/// node-relative indices here; the node turns them into [`crate::types::Pfn`]s.
#[derive(Debug)]
pub(crate) struct Allocator {
    zone: Zone,
    design: Design,
}

impl Allocator {
    /// An allocator of `kind` over a zone of `frames` frames, with a cache slot for each of
    /// `cpus` CPUs.
    pub(crate) fn new(kind: AllocatorKind, frames: u32, cpus: usize) -> Allocator {
        let cpus = cpus.max(1);
        let design = match kind {
            AllocatorKind::Magazine => Design::Magazine(MagazineAlloc {
                slots: (0..cpus)
                    .map(|_| {
                        Padded(SpinLock::new(Slot {
                            loaded: Mag::empty(),
                            previous: Mag::empty(),
                        }))
                    })
                    .collect(),
                depot: Mutex::new(Depot::default()),
                // Enough to absorb a VM's worth of frees and hand them back without the
                // zone, bounded to an eighth of the zone so fragmentation stays visible.
                depot_capacity: ((frames as usize / MAG_SIZE) / 8).max(2 * cpus),
            }),
            AllocatorKind::PerCpuLists => Design::PerCpu(PerCpuAlloc {
                lists: (0..cpus)
                    .map(|_| {
                        Padded(Mutex::new(PcpList {
                            frames: Vec::with_capacity(PCP_HIGH + PCP_BATCH),
                        }))
                    })
                    .collect(),
            }),
            AllocatorKind::GlobalLock => Design::Global,
        };
        Allocator {
            zone: Zone::new(frames),
            design,
        }
    }

    /// Zone lock acquisitions so far.
    pub(crate) fn zone_acquisitions(&self) -> u64 {
        self.zone.acquisitions()
    }

    /// Allocates `2^order` frames; `cpu` is the caller's CPU (a hint). `None` only when
    /// the zone and every cache are out of such blocks.
    pub(crate) fn alloc(&self, order: u32, cpu: usize) -> Option<u32> {
        if let Some(f) = self.alloc_once(order, cpu) {
            return Some(f);
        }
        self.drain();
        self.alloc_once(order, cpu)
    }

    fn alloc_once(&self, order: u32, cpu: usize) -> Option<u32> {
        if order > 0 {
            return self.zone.lock().alloc(order);
        }
        match &self.design {
            Design::Global => self.zone.lock().alloc(0),
            Design::PerCpu(p) => {
                let mut list = lock(&p.lists[slot_index(cpu, p.lists.len())].0);
                if let Some(f) = list.frames.pop() {
                    return Some(f);
                }
                let mut zone = self.zone.lock();
                for _ in 0..PCP_BATCH {
                    match zone.alloc(0) {
                        Some(f) => list.frames.push(f),
                        None => break,
                    }
                }
                drop(zone);
                list.frames.pop()
            }
            Design::Magazine(m) => m.alloc(&self.zone, cpu),
        }
    }

    /// Frees `2^order` frames starting at `f`.
    pub(crate) fn free(&self, f: u32, order: u32, cpu: usize) {
        if order > 0 {
            self.zone.lock().free(f, order);
            return;
        }
        match &self.design {
            Design::Global => self.zone.lock().free(f, 0),
            Design::PerCpu(p) => {
                let mut list = lock(&p.lists[slot_index(cpu, p.lists.len())].0);
                list.frames.push(f);
                if list.frames.len() > PCP_HIGH {
                    let mut zone = self.zone.lock();
                    let keep = list.frames.len() - PCP_BATCH;
                    for f in list.frames.drain(keep..) {
                        zone.free(f, 0);
                    }
                }
            }
            Design::Magazine(m) => m.free(&self.zone, f, cpu),
        }
    }

    /// Frees many order-0 frames: one lock per batch of [`MAG_SIZE`] frames.
    pub(crate) fn free_batch(&self, frames: &[u32]) {
        match &self.design {
            Design::Magazine(m) => {
                let mut chunks = frames.chunks_exact(MAG_SIZE);
                for chunk in &mut chunks {
                    let mut mag = Mag::empty();
                    mag.frames.copy_from_slice(chunk);
                    mag.n = MAG_SIZE;
                    let mut depot = lock(&m.depot);
                    if depot.full.len() < m.depot_capacity {
                        depot.full.push(mag);
                        continue;
                    }
                    drop(depot);
                    free_all(&mut self.zone.lock(), chunk);
                }
                free_all(&mut self.zone.lock(), chunks.remainder());
            }
            Design::PerCpu(_) | Design::Global => {
                for chunk in frames.chunks(MAG_SIZE) {
                    free_all(&mut self.zone.lock(), chunk);
                }
            }
        }
    }

    /// Returns every cached frame to the zone.
    pub(crate) fn drain(&self) {
        match &self.design {
            Design::Global => {}
            Design::PerCpu(p) => {
                for list in p.lists.iter() {
                    let mut list = lock(&list.0);
                    free_all(&mut self.zone.lock(), &list.frames);
                    list.frames.clear();
                }
            }
            Design::Magazine(m) => {
                for slot in m.slots.iter() {
                    let mut slot = slot.0.lock();
                    let slot = &mut *slot;
                    let mut zone = self.zone.lock();
                    for mag in [&mut slot.loaded, &mut slot.previous] {
                        free_all(&mut zone, &mag.frames[..mag.n]);
                        mag.n = 0;
                    }
                }
                let mut depot = lock(&m.depot);
                let full = std::mem::take(&mut depot.full);
                let mut zone = self.zone.lock();
                for mut mag in full {
                    free_all(&mut zone, &mag.frames[..mag.n]);
                    mag.n = 0;
                    depot.empty.push(mag);
                }
            }
        }
    }

    /// Free frames: in the zone plus in every cache. Takes every lock in turn: for
    /// statistics and tests, not hot paths.
    pub(crate) fn free_frames(&self) -> u64 {
        let cached: u64 = match &self.design {
            Design::Global => 0,
            Design::PerCpu(p) => p.lists.iter().map(|l| lock(&l.0).frames.len() as u64).sum(),
            Design::Magazine(m) => {
                let in_slots: usize = m
                    .slots
                    .iter()
                    .map(|s| {
                        let s = s.0.lock();
                        s.loaded.n + s.previous.n
                    })
                    .sum();
                let in_depot: usize = lock(&m.depot).full.iter().map(|m| m.n).sum();
                (in_slots + in_depot) as u64
            }
        };
        self.zone.lock().free_frames() + cached
    }

    /// Every free block of the zone, as `(first frame, order)` (caches not included).
    pub(crate) fn zone_free_blocks(&self) -> Vec<(u32, u32)> {
        self.zone.lock().free_blocks()
    }

    /// Takes the free block `first` of `order` out of the zone if it is still free there.
    pub(crate) fn take_exact(&self, first: u32, order: u32) -> bool {
        self.zone.lock().take_exact(first, order)
    }
}

/// The cache slot of `cpu` among `n`: `cpu` itself when in range (no division on the
/// hot path), else `cpu % n`.
#[inline]
fn slot_index(cpu: usize, n: usize) -> usize {
    if cpu < n { cpu } else { cpu % n }
}

fn free_all(zone: &mut Buddy, frames: &[u32]) {
    for &f in frames {
        zone.free(f, 0);
    }
}

impl MagazineAlloc {
    /// Locks the caller's preferred slot, or another one round-robin with `try_lock` when
    /// it is busy, or waits for the preferred one when every slot is busy.
    #[inline]
    fn slot(&self, cpu: usize) -> SpinGuard<'_, Slot> {
        let n = self.slots.len();
        let preferred = slot_index(cpu, n);
        if let Some(g) = self.slots[preferred].0.try_lock() {
            return g;
        }
        for k in 1..n {
            let i = preferred + k;
            let slot = &self.slots[if i >= n { i - n } else { i }].0;
            // Test before test-and-set: a busy slot's line is not pulled away from
            // its holder by a failing compare-and-swap.
            if slot.is_locked() {
                continue;
            }
            if let Some(g) = slot.try_lock() {
                return g;
            }
        }
        self.slots[preferred].0.lock()
    }

    #[inline]
    fn alloc(&self, zone: &Zone, cpu: usize) -> Option<u32> {
        let mut slot = self.slot(cpu);
        if let Some(f) = slot.loaded.pop() {
            return Some(f);
        }
        let slot = &mut *slot;
        if slot.previous.n > 0 {
            std::mem::swap(&mut slot.loaded, &mut slot.previous);
            return slot.loaded.pop();
        }
        // Both empty: trade the empty `loaded` for a full magazine from the depot.
        {
            let mut depot = lock(&self.depot);
            if let Some(full) = depot.full.pop() {
                let empty = std::mem::replace(&mut slot.loaded, full);
                depot.empty.push(empty);
                drop(depot);
                return slot.loaded.pop();
            }
        }
        // Depot empty too: fill `loaded` from the zone in one lock.
        let mut buddy = zone.lock();
        while !slot.loaded.is_full() {
            match buddy.alloc(0) {
                Some(f) => {
                    slot.loaded.push(f);
                }
                None => break,
            }
        }
        drop(buddy);
        slot.loaded.pop()
    }

    #[inline]
    fn free(&self, zone: &Zone, f: u32, cpu: usize) {
        let mut slot = self.slot(cpu);
        if slot.loaded.push(f) {
            return;
        }
        let slot = &mut *slot;
        if slot.previous.n == 0 {
            std::mem::swap(&mut slot.loaded, &mut slot.previous);
            slot.loaded.push(f);
            return;
        }
        // Both full: hand the full `previous` to the depot for an empty one.
        let mut depot = lock(&self.depot);
        let empty = depot.empty.pop().unwrap_or_else(Mag::empty);
        let full = std::mem::replace(&mut slot.previous, empty);
        std::mem::swap(&mut slot.loaded, &mut slot.previous);
        slot.loaded.push(f);
        if depot.full.len() < self.depot_capacity {
            depot.full.push(full);
            return;
        }
        drop(depot);
        // Depot at capacity: this magazine's frames go back to the zone in one lock.
        let mut full = full;
        free_all(&mut zone.lock(), &full.frames[..full.n]);
        full.n = 0;
        lock(&self.depot).empty.push(full);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn drain_all(a: &Allocator, cpu: usize) -> Vec<u32> {
        std::iter::from_fn(|| a.alloc(0, cpu)).collect()
    }

    #[test]
    fn every_design_hands_out_each_frame_once_then_reports_exhaustion() {
        for kind in AllocatorKind::ALL {
            let a = Allocator::new(kind, 1000, 2);
            let got = drain_all(&a, 0);
            let set: HashSet<u32> = got.iter().copied().collect();
            assert_eq!(got.len(), 1000, "{kind:?}");
            assert_eq!(set.len(), 1000, "{kind:?}: a frame was handed out twice");
            assert_eq!(a.free_frames(), 0, "{kind:?}");
        }
    }

    #[test]
    fn frames_cached_on_another_cpu_are_drained_before_exhaustion() {
        for kind in AllocatorKind::ALL {
            let a = Allocator::new(kind, 256, 2);
            let got = drain_all(&a, 0);
            // Free everything on CPU 1's slot, then allocate all from CPU 0.
            for f in &got {
                a.free(*f, 0, 1);
            }
            assert_eq!(a.free_frames(), 256, "{kind:?}");
            assert_eq!(drain_all(&a, 0).len(), 256, "{kind:?}");
        }
    }

    #[test]
    fn free_batch_returns_every_frame_and_zone_merges_back() {
        for kind in AllocatorKind::ALL {
            let a = Allocator::new(kind, 4096, 2);
            let got = drain_all(&a, 1);
            a.free_batch(&got);
            assert_eq!(a.free_frames(), 4096, "{kind:?}");
            a.drain();
            assert_eq!(a.zone_free_blocks().len(), 8, "{kind:?}: 8 blocks of 512");
        }
    }

    #[test]
    fn free_batch_takes_one_zone_lock_per_batch_for_the_lock_designs() {
        let a = Allocator::new(AllocatorKind::GlobalLock, 4096, 1);
        let got = drain_all(&a, 0);
        let before = a.zone_acquisitions();
        a.free_batch(&got);
        assert_eq!(a.zone_acquisitions() - before, 4096 / MAG_SIZE as u64);
    }

    #[test]
    fn high_order_runs_are_aligned_and_disjoint_from_order_zero() {
        for kind in AllocatorKind::ALL {
            let a = Allocator::new(kind, 2048, 2);
            let run = a.alloc(9, 0).unwrap();
            assert_eq!(run % 512, 0);
            let singles = drain_all(&a, 0);
            assert_eq!(singles.len(), 2048 - 512, "{kind:?}");
            assert!(
                singles.iter().all(|&f| f < run || f >= run + 512),
                "{kind:?}"
            );
            a.free(run, 9, 0);
            assert_eq!(a.free_frames(), 512);
        }
    }

    #[test]
    fn magazine_depot_absorbs_frees_without_the_zone() {
        let a = Allocator::new(AllocatorKind::Magazine, 1 << 16, 1);
        let got: Vec<u32> = (0..1024).map(|_| a.alloc(0, 0).unwrap()).collect();
        for f in &got {
            a.free(*f, 0, 0);
        }
        let before = a.zone_acquisitions();
        let again: Vec<u32> = (0..1024).map(|_| a.alloc(0, 0).unwrap()).collect();
        assert_eq!(
            a.zone_acquisitions(),
            before,
            "reuse came from magazines and depot"
        );
        let (x, y): (HashSet<u32>, HashSet<u32>) =
            (got.into_iter().collect(), again.into_iter().collect());
        assert_eq!(x, y);
    }

    #[test]
    fn kind_names_round_trip() {
        for k in AllocatorKind::ALL {
            assert_eq!(k.name().parse::<AllocatorKind>(), Ok(k));
        }
        assert!("buddy".parse::<AllocatorKind>().is_err());
    }
}

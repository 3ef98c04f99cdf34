//! Frame allocators: the magazine design of seed 5 and the two designs it is measured
//! against, chosen at runtime ([`AllocatorKind`]).
//!
//! Model-check the cache protocols with loom (the `loom_tests` module at the bottom):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p guestmem --release --lib loom
//! ```
//!
//! All three hand out runs of `2^order` frames from a node's `Zone` (the buddy
//! structure under the zone lock); they differ in how order-0 frames are cached in front
//! of it. Runs of order > 0 always come from and go to the zone directly.
//!
//! - [`AllocatorKind::GlobalLock`]: no cache; every call takes the zone lock.
//! - [`AllocatorKind::PerCpuLists`]: Linux's per-cpu page lists. Each CPU has a list with
//!   a `high` mark and a `batch`: an empty list is refilled with `batch` frames under one
//!   zone lock; a list above `high` drains `batch` frames. In user space a thread can
//!   migrate between CPUs, so each list has its own lock: the same `SpinLock` the
//!   magazines use (Linux protects `pcp` lists with a spinlock too since 5.19), so that
//!   the two designs are compared on their protocols, not on their lock types.
//! - [`AllocatorKind::Magazine`]: seed 5's magazines with Bonwick's depot, described
//!   below.
//!
//! # The magazine protocol
//!
//! Each CPU slot holds two magazines of [`MAG_SIZE`] frames, `loaded` and `previous`,
//! under the slot's `SpinLock` (seed 5: magazines are protected by spinlocks; taking one
//! is a single compare-and-swap and dropping it a plain store). A `Depot` shared by all
//! slots holds whole full and empty magazines under the depot lock.
//!
//! 1. **Choose a slot (steal).** A thread takes the slot of the CPU it runs on
//!    (`sched_getcpu`, 2 ns with RDPID: not worth caching) with `try_lock`. When that
//!    slot is busy it tries the others round-robin, skipping any that are visibly
//!    locked, with `try_lock` (seed 5); only when every slot is busy does it wait
//!    (spinning briefly, then yielding) for its own.
//! 2. **Alloc:** pop from `loaded`; if empty and `previous` has frames, swap the two and
//!    pop; if both are empty, trade the empty `loaded` for a full magazine from the depot
//!    (O(1) under the depot lock); if the depot has none, fill `loaded` from the zone:
//!    one zone lock for [`MAG_SIZE`] frames (refill).
//! 3. **Free:** push onto `loaded`; if full and `previous` is empty, swap and push; if
//!    both are full, hand the full `previous` to the depot for an empty one (O(1)); if
//!    the depot already holds its capacity of full magazines, that magazine's frames go
//!    back to the zone under one zone lock (drain), after the depot lock is dropped.
//! 4. **Bulk free** (`Allocator::free_batch`, a VM exiting): whole magazines of frames
//!    go straight into the depot, one depot lock each, or to the zone under one zone lock
//!    per [`MAG_SIZE`] frames when the depot is at capacity.
//! 5. **Drain before exhaustion.** Frames parked in slots and the depot are invisible to
//!    the zone: when the zone cannot satisfy a request, the allocator drains every slot
//!    and the depot (`Allocator::drain`) and tries once more before it reports
//!    exhaustion, as Linux drains the pcp lists before OOM. (A concurrent thread may
//!    cache frames again right after the drain; like Linux, the retry is not repeated.)
//!    Only order-0 requests drain everything: every larger request in this manager is
//!    opportunistic (fault-around, copy-around) and falls back to smaller runs, so on a
//!    fragmented pool a drain per fault would cost every CPU's cache for nothing. A larger
//!    request drains the depot alone, and only when it holds [`DEPOT_DRAIN_MIN`] full
//!    magazines or more (an exited VM's frames): then the drain pays for itself, and it
//!    cannot repeat before that many magazines have been freed again.
//!
//! Every frame is at any time in exactly one place: the zone, one magazine (in a slot or
//! the depot), a per-cpu list, or with its owner; every move between places happens with
//! both places' locks held, so no frame is handed out twice and none is lost. The loom
//! models check exactly this.
//!
//! This answers seed 5's weaknesses: refills and drains move a whole magazine, exchanges
//! with the depot are O(1) so a thread freeing or allocating in long runs never walks
//! the buddy lists, and a CPU mostly reuses frames from its own slot, so frame
//! descriptors bounce less between CPUs. The seed's slow single frees came from waiting
//! for the preferred magazine; here a busy slot is skipped, not waited for.
//!
//! # Lock order
//!
//! ```text
//! CPU slot lock (SpinLock: magazine slot or per-cpu list; magazines: try_lock
//! |              round-robin, block only on the preferred slot)
//! +-- depot lock (magazines only; alloc/free exchange, free_batch)
//!     +-- zone lock (refill and drain; also taken alone by order > 0 and GlobalLock)
//! ```
//!
//! A thread holds at most one slot lock at a time (`drain` takes them one after the
//! other). On the alloc and free paths the depot lock is dropped before the zone lock
//! is taken (the magazine is taken out first); only `drain` and `drain_depot` nest the two.

use crate::sync::{AtomicUsize, Mutex, Ordering, SpinGuard, SpinLock, lock};
use crate::zone::{Buddy, Zone};

/// Frames in one magazine. Two per slot hold 256 frames, close to the per-cpu lists'
/// high mark (378), so that batches up to 256 never reach the depot.
#[cfg(not(loom))]
pub const MAG_SIZE: usize = 128;

/// Full magazines the depot must hold before a failed request larger than one frame
/// drains it (4 MiB of frames).
#[cfg(not(loom))]
pub const DEPOT_DRAIN_MIN: usize = 8;
/// As above; under loom one magazine, so that the models reach that drain.
#[cfg(loom)]
pub const DEPOT_DRAIN_MIN: usize = 1;
/// Frames in one magazine (small under loom, so that a few operations reach every
/// refill, exchange and drain path).
#[cfg(loom)]
pub const MAG_SIZE: usize = 2;
/// The per-cpu lists' refill/drain batch (Linux's default `pcp->batch` is 63 on large zones).
#[cfg(not(loom))]
pub const PCP_BATCH: usize = 63;
/// The per-cpu lists' refill/drain batch (small under loom, as [`MAG_SIZE`]).
#[cfg(loom)]
pub const PCP_BATCH: usize = 2;
/// The per-cpu lists' high mark (Linux: `6 * batch`).
#[cfg(not(loom))]
pub const PCP_HIGH: usize = 6 * PCP_BATCH;
/// The per-cpu lists' high mark (small under loom, so that frees drain).
#[cfg(loom)]
pub const PCP_HIGH: usize = 3;

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
    /// `depot.full.len()`, written under the depot lock and read without it: a failed
    /// multi-frame request looks here before it takes the depot lock
    /// ([`Allocator::drain_depot`]), so a fragmented pool's fault-around ladder costs no
    /// lock per step.
    full_hint: AtomicUsize,
}

#[derive(Debug)]
struct PcpList {
    frames: Vec<u32>,
}

#[derive(Debug)]
struct PerCpuAlloc {
    lists: Box<[Padded<SpinLock<PcpList>>]>,
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
                full_hint: AtomicUsize::new(0),
                // Enough to absorb a VM's worth of frees and hand them back without the
                // zone, bounded to a quarter of the zone so that most free memory stays visible to
                // high-order requests (the rest is drained before exhaustion).
                depot_capacity: ((frames as usize / MAG_SIZE) / 4).max(2 * cpus),
            }),
            AllocatorKind::PerCpuLists => Design::PerCpu(PerCpuAlloc {
                lists: (0..cpus)
                    .map(|_| {
                        Padded(SpinLock::new(PcpList {
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

    /// Allocates `2^order` frames; `cpu` is the caller's CPU (a hint). For order 0,
    /// `None` only when the zone and every cache are out of frames; a larger request
    /// fails when the zone has no such block, after draining the depot if it holds
    /// [`DEPOT_DRAIN_MIN`] magazines or more (see step 5 of the module docs).
    pub(crate) fn alloc(&self, order: u32, cpu: usize) -> Option<u32> {
        if let Some(f) = self.alloc_once(order, cpu) {
            return Some(f);
        }
        if order > 0 {
            // Not the whole drain (every CPU's slot) for an opportunistic request, but
            // the depot when it holds enough to matter: a VM's exit parks its frames
            // there in bulk, and without this a pool whose free memory sits in the depot
            // hands out only single scattered frames.
            return self
                .drain_depot(DEPOT_DRAIN_MIN)
                .then(|| self.alloc_once(order, cpu))
                .flatten();
        }
        self.drain();
        self.alloc_once(order, cpu)
    }

    /// Returns the depot's full magazines to the zone if it holds at least `min` of them
    /// (magazine design only); true if it did.
    fn drain_depot(&self, min: usize) -> bool {
        let Design::Magazine(m) = &self.design else {
            return false;
        };
        if m.full_hint.load(Ordering::Relaxed) < min {
            return false;
        }
        let mut depot = lock(&m.depot);
        if depot.full.len() < min {
            return false;
        }
        self.empty_depot(m, &mut depot);
        true
    }

    /// Returns every full magazine of `depot` (held locked) to the zone; the emptied
    /// magazines stay in the depot for reuse.
    fn empty_depot(&self, m: &MagazineAlloc, depot: &mut Depot) {
        let full = std::mem::take(&mut depot.full);
        m.full_hint.store(0, Ordering::Relaxed);
        let mut zone = self.zone.lock();
        for mut mag in full {
            free_all(&mut zone, &mag.frames[..mag.n]);
            mag.n = 0;
            depot.empty.push(mag);
        }
    }

    fn alloc_once(&self, order: u32, cpu: usize) -> Option<u32> {
        if order > 0 {
            return self.zone.lock().alloc(order);
        }
        match &self.design {
            Design::Global => self.zone.lock().alloc(0),
            Design::PerCpu(p) => {
                let mut list = p.lists[slot_index(cpu, p.lists.len())].0.lock();
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
                let mut list = p.lists[slot_index(cpu, p.lists.len())].0.lock();
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
                        m.full_hint.store(depot.full.len(), Ordering::Relaxed);
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

    /// Frees many order-0 frames straight into the zone, past every cache, one zone
    /// lock per [`MAG_SIZE`] frames: for frames freed together whose neighbours are
    /// likely free too (reclaim's), so that they merge into runs a multi-frame request
    /// (fault-around, readahead) can have, rather than sit in magazines as single frames.
    pub(crate) fn free_batch_to_zone(&self, frames: &[u32]) {
        for chunk in frames.chunks(MAG_SIZE) {
            free_all(&mut self.zone.lock(), chunk);
        }
    }

    /// Returns every cached frame to the zone.
    pub(crate) fn drain(&self) {
        match &self.design {
            Design::Global => {}
            Design::PerCpu(p) => {
                for list in p.lists.iter() {
                    let mut list = list.0.lock();
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
                self.empty_depot(m, &mut lock(&m.depot));
            }
        }
    }

    /// Free frames: in the zone plus in every cache. Takes every lock in turn: for
    /// statistics and tests, not hot paths.
    pub(crate) fn free_frames(&self) -> u64 {
        let cached: u64 = match &self.design {
            Design::Global => 0,
            Design::PerCpu(p) => p.lists.iter().map(|l| l.0.lock().frames.len() as u64).sum(),
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
                self.full_hint.store(depot.full.len(), Ordering::Relaxed);
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
            self.full_hint.store(depot.full.len(), Ordering::Relaxed);
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
mod tests;

/// Loom models of the cache protocols: refill from the zone, magazine exchange with the
/// depot, drain to the zone, stealing another CPU's slot with `try_lock`, and frees of
/// frames another thread allocated. Run them with (see the module docs):
///
/// ```text
/// RUSTFLAGS="--cfg loom" cargo test -p guestmem --release --lib loom
/// ```
///
/// Under loom [`MAG_SIZE`] is 2 and the per-cpu lists' batch and high mark are 2 and 3,
/// so that a handful of operations on an 8-frame zone reach every path. The default
/// preemption bound is 3 (`LOOM_MAX_PREEMPTIONS` overrides it).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;
    // The ownership record only witnesses the allocator's behaviour: plain std atomics,
    // not modelled by loom, so they add no interleavings of their own.
    use std::sync::atomic::{AtomicBool as Witness, Ordering::SeqCst};

    const FRAMES: u32 = 8;

    /// Who holds which frame: set when a thread receives a frame, cleared before it frees
    /// it. A frame handed to a second owner finds its bit already set.
    struct Owners([Witness; FRAMES as usize]);

    impl Owners {
        fn new() -> Owners {
            Owners(std::array::from_fn(|_| Witness::new(false)))
        }

        fn claim(&self, f: u32, frames: u32) {
            for i in f..f + frames {
                let was = self.0[i as usize].swap(true, SeqCst);
                assert!(!was, "frame {i} handed to a second owner");
            }
        }

        fn release(&self, f: u32, frames: u32) {
            for i in f..f + frames {
                assert!(self.0[i as usize].swap(false, SeqCst), "frame {i} not held");
            }
        }
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(3);
        }
        b.check(f);
    }

    /// Two threads prefer the same CPU slot (so one of them steals the other slot with
    /// `try_lock`), refill from the zone, free into full magazines (exchange with the
    /// depot), free a frame the other thread allocated, and one allocates an order-1 run
    /// straight from the zone, draining the depot when the zone is short. Afterwards
    /// every frame is free or held by exactly one thread, and a single thread can allocate
    /// all of them again (caches are drained before exhaustion is reported).
    fn refill_exchange_drain_and_steal(kind: AllocatorKind) {
        model(move || {
            let a = Arc::new(Allocator::new(kind, FRAMES, 2));
            let owners = Arc::new(Owners::new());
            let handoff = Arc::new(loom::sync::Mutex::new(None::<u32>));

            let t = {
                let (a, owners, handoff) = (a.clone(), owners.clone(), handoff.clone());
                thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..3 {
                        if let Some(f) = a.alloc(0, 0) {
                            owners.claim(f, 1);
                            held.push(f);
                        }
                    }
                    // Give one frame to the other thread, free the rest here.
                    if let Some(f) = held.pop() {
                        *lock(&handoff) = Some(f);
                    }
                    for f in held {
                        owners.release(f, 1);
                        a.free(f, 0, 0);
                    }
                })
            };

            let mut kept = Vec::new();
            if let Some(f) = a.alloc(0, 0) {
                owners.claim(f, 1);
                kept.push(f);
            }
            if let Some(run) = a.alloc(1, 0) {
                owners.claim(run, 2);
                owners.release(run, 2);
                a.free(run, 1, 0);
            }
            t.join().expect("allocating thread panicked");
            // The frame the other thread handed over is freed here, on another CPU.
            if let Some(f) = lock(&handoff).take() {
                owners.release(f, 1);
                a.free(f, 0, 1);
            }

            // Conservation: free frames plus held frames is the zone's size.
            assert_eq!(a.free_frames() + kept.len() as u64, u64::from(FRAMES));
            for f in kept {
                owners.release(f, 1);
                a.free(f, 0, 1);
            }
            assert_eq!(a.free_frames(), u64::from(FRAMES));
            // Drain before exhaustion: one CPU gets every frame, each once.
            let all: Vec<u32> = std::iter::from_fn(|| a.alloc(0, 1)).collect();
            assert_eq!(
                all.len(),
                FRAMES as usize,
                "{kind:?}: frames stuck in caches"
            );
            for &f in &all {
                owners.claim(f, 1);
            }
            assert_eq!(a.free_frames(), 0);
            for f in all {
                a.free(f, 0, 0);
            }
            a.drain();
            assert_eq!(
                a.zone_free_blocks(),
                vec![(0, 3)],
                "{kind:?}: zone did not merge"
            );
        });
    }

    #[test]
    fn loom_magazine_refill_exchange_drain_and_steal_conserve_frames() {
        refill_exchange_drain_and_steal(AllocatorKind::Magazine);
    }

    #[test]
    fn loom_percpu_refill_and_drain_conserve_frames() {
        refill_exchange_drain_and_steal(AllocatorKind::PerCpuLists);
    }

    /// A multi-frame request on an empty zone drains the depot while another thread
    /// frees whole magazines into it (`free_batch`): every frame has one owner at a time,
    /// and afterwards every frame is back.
    #[test]
    fn loom_a_multi_frame_request_drains_the_depot_beside_bulk_frees() {
        model(|| {
            let a = Arc::new(Allocator::new(AllocatorKind::Magazine, FRAMES, 2));
            let owners = Arc::new(Owners::new());
            // Every frame taken: the zone is empty.
            let all: Vec<u32> = (0..FRAMES).filter_map(|_| a.alloc(0, 0)).collect();
            assert_eq!(all.len(), FRAMES as usize);
            for &f in &all {
                owners.claim(f, 1);
            }
            let half: Vec<u32> = all[..4].to_vec();
            let t = {
                let (a, owners) = (a.clone(), owners.clone());
                thread::spawn(move || {
                    for &f in &half {
                        owners.release(f, 1);
                    }
                    // Two full magazines into the depot.
                    a.free_batch(&half);
                })
            };
            let run = a.alloc(1, 1);
            if let Some(r) = run {
                owners.claim(r, 2);
            }
            t.join().expect("freeing thread panicked");
            if let Some(r) = run {
                owners.release(r, 2);
                a.free(r, 1, 1);
            }
            for &f in &all[4..] {
                owners.release(f, 1);
                a.free(f, 0, 0);
            }
            assert_eq!(a.free_frames(), u64::from(FRAMES));
        });
    }

    /// One thread fills both magazines of a slot and pushes a full one into the depot
    /// while another allocates through the depot and the zone: no frame is handed out
    /// twice and none is lost.
    #[test]
    fn loom_magazine_depot_exchange_conserves_frames() {
        model(|| {
            let a = Arc::new(Allocator::new(AllocatorKind::Magazine, FRAMES, 2));
            let owners = Arc::new(Owners::new());
            let t = {
                let (a, owners) = (a.clone(), owners.clone());
                thread::spawn(move || {
                    let got: Vec<u32> = (0..5).filter_map(|_| a.alloc(0, 1)).collect();
                    for &f in &got {
                        owners.claim(f, 1);
                    }
                    for &f in &got {
                        owners.release(f, 1);
                        a.free(f, 0, 1);
                    }
                })
            };
            let got: Vec<u32> = (0..3).filter_map(|_| a.alloc(0, 0)).collect();
            for &f in &got {
                owners.claim(f, 1);
            }
            t.join().expect("allocating thread panicked");
            assert_eq!(a.free_frames() + got.len() as u64, u64::from(FRAMES));
            for f in got {
                owners.release(f, 1);
                a.free(f, 0, 0);
            }
            assert_eq!(a.free_frames(), u64::from(FRAMES));
        });
    }
}

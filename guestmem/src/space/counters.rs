//! What the manager did, counted like `/proc/vmstat`: globally and per VM.

use std::sync::atomic::{AtomicU64, Ordering};

use super::FaultOutcome;

/// Counters of what the manager did, like `/proc/vmstat` (all `Relaxed`: statistics).
#[derive(Debug, Default)]
pub struct Counters {
    pub(super) zero_fill_faults: AtomicU64,
    pub(super) zero_fill_pages: AtomicU64,
    pub(super) cow_copies: AtomicU64,
    pub(super) cow_copy_faults: AtomicU64,
    pub(super) cow_reuses: AtomicU64,
    pub(super) cow_reuse_faults: AtomicU64,
    pub(super) map_existing: AtomicU64,
    pub(super) forks: AtomicU64,
    pub(super) exits: AtomicU64,
    pub(super) frames_freed: AtomicU64,
    pub(super) swapins: AtomicU64,
    pub(super) major_faults: AtomicU64,
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
    /// Pages made writable without a copy by copy-on-write faults (the frame was this
    /// VM's alone): the faulting page and the run after it that was this VM's alone too.
    pub cow_reuses: u64,
    /// Copy-on-write faults that reused frames (one or a run of pages each).
    pub cow_reuse_faults: u64,
    /// Faults on pages already present (host view filled lazily, e.g. after fork).
    pub map_existing: u64,
    /// Forks.
    pub forks: u64,
    /// Exits.
    pub exits: u64,
    /// Frames returned to the pool.
    pub frames_freed: u64,
    /// Swap entries resolved by faults (refaults of swapped-out pages).
    pub swapins: u64,
    /// Faults that read their page from the swap file.
    pub major_faults: u64,
}

impl Counters {
    pub(super) fn add(&self, c: &AtomicU64, n: u64) {
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
            cow_reuse_faults: r(&self.cow_reuse_faults),
            map_existing: r(&self.map_existing),
            forks: r(&self.forks),
            exits: r(&self.exits),
            frames_freed: r(&self.frames_freed),
            swapins: r(&self.swapins),
            major_faults: r(&self.major_faults),
        }
    }

    pub(super) fn record(&self, o: FaultOutcome) {
        match o {
            FaultOutcome::ZeroFill { pages } => {
                self.add(&self.zero_fill_faults, 1);
                self.add(&self.zero_fill_pages, pages);
            }
            FaultOutcome::CowCopy { pages } => {
                self.add(&self.cow_copy_faults, 1);
                self.add(&self.cow_copies, pages);
            }
            FaultOutcome::CowReuse { pages } => {
                self.add(&self.cow_reuse_faults, 1);
                self.add(&self.cow_reuses, pages);
            }
            FaultOutcome::MapExisting { .. } => self.add(&self.map_existing, 1),
        }
    }
}

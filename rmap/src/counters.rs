//! Event counters of one [`Rmap`](crate::Rmap) context, and their plain snapshot.
//!
//! The counters exist so that the seeds' claims (walk cost O(1) instead of O(N), one root
//! lock per clone instead of one per chain entry, bounded chain growth) can be read off a
//! run rather than argued. Every counter is a statistic: it is updated with `Relaxed`
//! ordering, orders no other memory access, and a [`Counters::snapshot`] taken while other
//! threads run is a set of individually exact but mutually unsynchronised values.

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters. Every field is an atomic under no lock, updated `Relaxed` (see the
/// module docs); obtain a copy with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) walks: AtomicU64,
    pub(crate) entries_visited: AtomicU64,
    pub(crate) mappings_examined: AtomicU64,
    pub(crate) lock_write: AtomicU64,
    pub(crate) lock_read: AtomicU64,
    pub(crate) lock_try_read: AtomicU64,
    pub(crate) contended: AtomicU64,
    pub(crate) unlocked_walks: AtomicU64,
    pub(crate) avcs_allocated: AtomicU64,
    pub(crate) avcs_freed: AtomicU64,
    pub(crate) anon_vmas_allocated: AtomicU64,
    pub(crate) anon_vmas_freed: AtomicU64,
    pub(crate) anon_vmas_reused: AtomicU64,
    pub(crate) alloc_failures: AtomicU64,
}

/// A plain copy of the [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// `rmap_walk` calls, in every mode, including contended ones.
    pub walks: u64,
    /// Interval-tree nodes a walk touched while searching (hits and misses): the
    /// O(log n + hits) cost of finding the mappings.
    pub entries_visited: u64,
    /// Mappings handed to a walk's visitor: the cost seed 2 is about (one
    /// `page_referenced_one` each in Linux).
    pub mappings_examined: u64,
    /// Root locks taken for writing (link, unlink, exclusive walks, reuse bookkeeping).
    pub lock_write: u64,
    /// Root locks taken for reading with a blocking `read` (shared walks, statistics).
    pub lock_read: u64,
    /// Root read locks obtained by `try_read` (try-shared walks that did not contend).
    pub lock_try_read: u64,
    /// Try-shared walks that found the root write-locked and returned `Contended`.
    pub contended: u64,
    /// Walks that took no lock, on the caller's [`WalkGuard`](crate::WalkGuard) proof.
    pub unlocked_walks: u64,
    /// Chain entries (Avc) allocated, including ones allocated and released unused.
    pub avcs_allocated: u64,
    /// Chain entries freed.
    pub avcs_freed: u64,
    /// Anon_vmas allocated.
    pub anon_vmas_allocated: u64,
    /// Anon_vmas freed (the last `Arc` dropped, by a region or by a frame's raw reference).
    pub anon_vmas_freed: u64,
    /// Forks that reused an ancestor's anon_vma instead of allocating one (commit 7a3ef208).
    pub anon_vmas_reused: u64,
    /// Allocations refused (the failpoint or a failed `try_reserve`).
    pub alloc_failures: u64,
}

impl CounterSnapshot {
    /// All root lock acquisitions, of every kind.
    pub fn lock_acquisitions(&self) -> u64 {
        self.lock_write + self.lock_read + self.lock_try_read
    }

    /// The difference `self - earlier`, counter by counter (saturating at zero).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot {
            walks: self.walks.saturating_sub(earlier.walks),
            entries_visited: self.entries_visited.saturating_sub(earlier.entries_visited),
            mappings_examined: self
                .mappings_examined
                .saturating_sub(earlier.mappings_examined),
            lock_write: self.lock_write.saturating_sub(earlier.lock_write),
            lock_read: self.lock_read.saturating_sub(earlier.lock_read),
            lock_try_read: self.lock_try_read.saturating_sub(earlier.lock_try_read),
            contended: self.contended.saturating_sub(earlier.contended),
            unlocked_walks: self.unlocked_walks.saturating_sub(earlier.unlocked_walks),
            avcs_allocated: self.avcs_allocated.saturating_sub(earlier.avcs_allocated),
            avcs_freed: self.avcs_freed.saturating_sub(earlier.avcs_freed),
            anon_vmas_allocated: self
                .anon_vmas_allocated
                .saturating_sub(earlier.anon_vmas_allocated),
            anon_vmas_freed: self.anon_vmas_freed.saturating_sub(earlier.anon_vmas_freed),
            anon_vmas_reused: self
                .anon_vmas_reused
                .saturating_sub(earlier.anon_vmas_reused),
            alloc_failures: self.alloc_failures.saturating_sub(earlier.alloc_failures),
        }
    }
}

impl Counters {
    /// Adds `n` to `counter` (statistics only: `Relaxed`, see the module docs).
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            walks: r(&self.walks),
            entries_visited: r(&self.entries_visited),
            mappings_examined: r(&self.mappings_examined),
            lock_write: r(&self.lock_write),
            lock_read: r(&self.lock_read),
            lock_try_read: r(&self.lock_try_read),
            contended: r(&self.contended),
            unlocked_walks: r(&self.unlocked_walks),
            avcs_allocated: r(&self.avcs_allocated),
            avcs_freed: r(&self.avcs_freed),
            anon_vmas_allocated: r(&self.anon_vmas_allocated),
            anon_vmas_freed: r(&self.anon_vmas_freed),
            anon_vmas_reused: r(&self.anon_vmas_reused),
            alloc_failures: r(&self.alloc_failures),
        }
    }
}

//! Event counters of one [`Rmap`](crate::Rmap) context, and their plain snapshot.
//!
//! The counters exist so that the seeds' claims (walk cost O(1) instead of O(N), one root
//! lock per clone instead of one per chain entry, bounded chain growth) can be read off a
//! run rather than argued. Every counter is a statistic: it is updated with `Relaxed`
//! ordering, orders no other memory access, and a [`Counters::snapshot`] taken while other
//! threads run is a set of individually exact but mutually unsynchronised values.
//!
//! A walk's own counts (walks, nodes visited, mappings examined, its lock or contention)
//! are gathered per thread and added to the shared atomics every [`WALK_FLUSH_EVERY`]
//! walks, when the thread walks another context's anon_vmas, when it calls
//! [`Counters::snapshot`] or [`flush_walk_counters`], and when it exits. Four atomic
//! read-modify-writes per walk would otherwise cost more than the walk itself when it
//! examines one or two mappings (a cheap walk is ~40 ns, about six locked instructions).
//! So a snapshot taken on another thread may lag by fewer than [`WALK_FLUSH_EVERY`]
//! walks per walking thread; one taken on the walking thread is exact.

use std::sync::atomic::{AtomicU64, Ordering};

/// A walking thread publishes its walk counts at least this often (in walks).
pub const WALK_FLUSH_EVERY: u64 = 64;

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

    /// Copies every counter (after publishing the calling thread's pending walk counts).
    pub fn snapshot(&self) -> CounterSnapshot {
        flush_walk_counters();
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

/// How a walk held the structures (which counter besides `walks` it bumps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalkLock {
    /// Root write lock.
    Write,
    /// Root read lock, blocking.
    Read,
    /// Root read lock by `try_read`.
    TryRead,
    /// `try_read` failed: contended, nothing walked.
    Contended,
    /// No lock, on a `WalkGuard`.
    Unlocked,
}

/// One thread's walk counts not yet added to `target`.
#[derive(Debug, Default)]
struct Pending {
    target: Option<std::sync::Arc<Counters>>,
    walks: u64,
    visited: u64,
    examined: u64,
    write: u64,
    read: u64,
    try_read: u64,
    contended: u64,
    unlocked: u64,
}

impl Pending {
    const EMPTY: Pending = Pending {
        target: None,
        walks: 0,
        visited: 0,
        examined: 0,
        write: 0,
        read: 0,
        try_read: 0,
        contended: 0,
        unlocked: 0,
    };

    fn add(&mut self, lock: WalkLock, visited: u64, examined: u64) {
        self.walks += 1;
        self.visited += visited;
        self.examined += examined;
        match lock {
            WalkLock::Write => self.write += 1,
            WalkLock::Read => self.read += 1,
            WalkLock::TryRead => self.try_read += 1,
            WalkLock::Contended => self.contended += 1,
            WalkLock::Unlocked => self.unlocked += 1,
        }
    }

    fn flush(&mut self) {
        let Some(c) = &self.target else { return };
        for (counter, n) in [
            (&c.walks, &mut self.walks),
            (&c.entries_visited, &mut self.visited),
            (&c.mappings_examined, &mut self.examined),
            (&c.lock_write, &mut self.write),
            (&c.lock_read, &mut self.read),
            (&c.lock_try_read, &mut self.try_read),
            (&c.contended, &mut self.contended),
            (&c.unlocked_walks, &mut self.unlocked),
        ] {
            if *n != 0 {
                Counters::add(counter, *n);
                *n = 0;
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(not(loom))]
thread_local! {
    static PENDING: std::cell::RefCell<Pending> = const { std::cell::RefCell::new(Pending::EMPTY) };
}

/// Counts one walk into `counters` (batched per thread; see the module docs).
pub(crate) fn record_walk(
    counters: &std::sync::Arc<Counters>,
    lock: WalkLock,
    visited: u64,
    examined: u64,
) {
    #[cfg(not(loom))]
    {
        let batched = PENDING.try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return false;
            };
            if !p
                .target
                .as_ref()
                .is_some_and(|t| std::sync::Arc::ptr_eq(t, counters))
            {
                p.flush();
                p.target = Some(counters.clone());
            }
            p.add(lock, visited, examined);
            if p.walks >= WALK_FLUSH_EVERY {
                p.flush();
            }
            true
        });
        if batched == Ok(true) {
            return;
        }
    }
    // Under loom (its threads share one OS thread's locals) or while this thread's
    // locals are being destroyed: count directly.
    let mut direct = Pending {
        target: Some(counters.clone()),
        ..Pending::EMPTY
    };
    direct.add(lock, visited, examined);
    direct.flush();
}

/// Publishes the calling thread's pending walk counts to their context's counters.
///
/// [`Counters::snapshot`] does this for its caller's thread; a thread that walks and
/// then idles while another thread reads the counters may call it to be counted exactly.
pub fn flush_walk_counters() {
    #[cfg(not(loom))]
    let _ = PENDING.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.flush();
        }
    });
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::ops::ControlFlow;

    use crate::{Rmap, WalkMode, rmap_walk};

    #[test]
    fn walk_counts_are_exact_once_the_walking_thread_exits() {
        let rmap = Rmap::default();
        let mut r = rmap.region(0u32, 0..4).unwrap();
        let av = rmap.anon_vma_prepare(&mut r).unwrap();
        let before = rmap.snapshot();
        let walker = {
            let av = av.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    rmap_walk(&av, 1, WalkMode::Shared, |_, _| ControlFlow::Continue(())).unwrap();
                }
            })
        };
        walker.join().unwrap();
        let d = rmap.snapshot().since(&before);
        assert_eq!((d.walks, d.mappings_examined, d.lock_read), (100, 100, 100));
    }

    #[test]
    fn a_snapshot_on_the_walking_thread_is_exact() {
        let rmap = Rmap::default();
        let mut r = rmap.region(0u32, 0..4).unwrap();
        let av = rmap.anon_vma_prepare(&mut r).unwrap();
        let before = rmap.snapshot();
        for _ in 0..3 {
            rmap_walk(
                &av,
                1,
                WalkMode::TryShared,
                |_, _| ControlFlow::Continue(()),
            )
            .unwrap();
        }
        let d = rmap.snapshot().since(&before);
        assert_eq!((d.walks, d.lock_try_read, d.entries_visited), (3, 3, 3));
    }
}

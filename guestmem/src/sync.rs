//! Synchronisation primitives, swapped for loom's under `--cfg loom` so that the lock
//! protocols (magazine refill/drain/steal) can be model-checked.
//!
//! Everything in this crate takes its atomics and locks from here, never from `std`
//! directly. Besides the std/loom re-exports it owns [`SpinLock`], the magazine slots'
//! lock (seed 5: magazines are protected by spinlocks): one compare-and-swap to take it
//! and a plain release store to drop it, where `std::sync::Mutex` needs an atomic swap on
//! unlock as well. Under loom the spinlock is built from loom's atomic and `UnsafeCell`,
//! so the model checks its orderings and every access to the data it protects.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// The `Arc` the `rmap` crate keeps anon_vmas in (loom's under loom).
#[cfg(loom)]
pub(crate) use loom::sync::Arc as RmapArc;
#[cfg(not(loom))]
pub(crate) use std::sync::Arc as RmapArc;

#[cfg(loom)]
use loom::cell::UnsafeCell;
#[cfg(not(loom))]
use std::cell::UnsafeCell;

/// Locks `m`, ignoring poisoning: a panic while holding one of our locks is a bug that
/// has already been reported; the protected data is still consistent because every
/// critical section here only moves frame numbers between containers.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// Spins before [`SpinLock::lock`] starts yielding the CPU (on a 2-vCPU host the
/// holder may be preempted: spinning for its whole time slice would waste ours).
#[cfg(not(loom))]
const SPINS_BEFORE_YIELD: u32 = 64;

/// A test-and-set spinlock around `T` (see the module docs).
pub(crate) struct SpinLock<T> {
    /// Whether a [`SpinGuard`] exists.
    locked: AtomicBool,
    /// Protected by `locked`.
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `data` to one thread at a time (the `locked`
// flag's Acquire/Release pair orders the accesses), so sharing the lock only requires
// that `T` may move between threads, as for `std::sync::Mutex`.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: as above; the lock owns its `T`.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// An unlocked lock around `data`.
    pub(crate) fn new(data: T) -> SpinLock<T> {
        SpinLock {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(data),
        }
    }

    /// Takes the lock if it is free: one compare-and-swap, never waits.
    #[inline]
    pub(crate) fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        // Acquire: pairs with the Release store in `SpinGuard::drop` of the previous
        // holder, so its writes to `data` are visible to us.
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            Some(SpinGuard::new(self))
        } else {
            None
        }
    }

    /// Whether someone holds the lock now (a hint: it may change right away).
    #[inline]
    pub(crate) fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// Takes the lock, spinning (then yielding) while another thread holds it.
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        #[cfg(not(loom))]
        let mut spins = 0u32;
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            // Test before test-and-set: wait on a shared copy of the line.
            while self.is_locked() {
                #[cfg(loom)]
                loom::thread::yield_now();
                #[cfg(not(loom))]
                {
                    spins += 1;
                    if spins < SPINS_BEFORE_YIELD {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for SpinLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.try_lock() {
            Some(g) => f.debug_struct("SpinLock").field("data", &*g).finish(),
            None => f.write_str("SpinLock { <locked> }"),
        }
    }
}

/// Exclusive access to a [`SpinLock`]'s data; unlocks when dropped.
pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
    /// Loom's record of our access to the cell, ended before the unlock.
    #[cfg(loom)]
    access: Option<loom::cell::MutPtr<T>>,
}

impl<'a, T> SpinGuard<'a, T> {
    #[inline]
    fn new(lock: &'a SpinLock<T>) -> SpinGuard<'a, T> {
        SpinGuard {
            lock,
            #[cfg(loom)]
            access: Some(lock.data.get_mut()),
        }
    }
}

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        #[cfg(not(loom))]
        // SAFETY: the guard holds the lock, so no other thread accesses `data`; the
        // reference cannot outlive the guard.
        return unsafe { &*self.lock.data.get() };
        #[cfg(loom)]
        // SAFETY: as above; `access` is `Some` until `drop`.
        return unsafe { self.access.as_ref().expect("access ends in drop").deref() };
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        // SAFETY: the guard holds the lock, so no other thread accesses `data`, and
        // `&mut self` makes this the only reference through the guard.
        return unsafe { &mut *self.lock.data.get() };
        #[cfg(loom)]
        // SAFETY: as above; `access` is `Some` until `drop`.
        return unsafe { self.access.as_ref().expect("access ends in drop").deref() };
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        #[cfg(loom)]
        drop(self.access.take());
        // Release: pairs with the Acquire in `try_lock` of the next holder.
        self.lock.locked.store(false, Ordering::Release);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for SpinGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SpinGuard").field(&**self).finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn spinlock_is_exclusive_and_try_lock_fails_while_held() {
        let l = SpinLock::new(5);
        let mut g = l.lock();
        assert!(l.try_lock().is_none());
        *g += 1;
        drop(g);
        assert_eq!(*l.try_lock().expect("free after drop"), 6);
    }

    #[test]
    fn spinlock_counts_exactly_under_contention() {
        let l = std::sync::Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("counter thread panicked");
        }
        assert_eq!(*l.lock(), 80_000);
    }
}

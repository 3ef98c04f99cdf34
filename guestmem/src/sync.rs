//! Synchronisation primitives, swapped for loom's under `--cfg loom` so that the lock
//! protocols (magazine refill/drain/steal) can be model-checked.
//!
//! Everything in this crate takes its atomics and locks from here, never from `std`
//! directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: a panic while holding one of our locks is a bug that
/// has already been reported; the protected data is still consistent because every
/// critical section here only moves frame numbers between containers.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// Tries to lock `m` without waiting; `None` when another thread holds it.
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        #[cfg(not(loom))]
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        #[cfg(loom)]
        Err(loom::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(_) => None,
    }
}

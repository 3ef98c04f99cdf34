//! The synchronisation primitives rmap is built on, swapped for loom's under `cfg(loom)`.
//!
//! Everything whose interleavings the loom model must explore (the root `RwLock`, the
//! `Arc` that keeps an anon_vma alive, the `UnsafeCell` holding the lock-protected state)
//! comes from here. Statistics counters deliberately use `std` atomics even under loom:
//! they order nothing, and modelling them would only multiply the state space.
//! The `std` `UnsafeCell` is wrapped in loom's closure API (`with`, `with_mut`) so that the
//! same code compiles both ways, as sharded-slab's `sync` module does.

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) use std::sync::{PoisonError, TryLockError};

/// `std::cell::UnsafeCell` behind loom's closure-based API.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// Wraps `data`.
    pub(crate) const fn new(data: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(data))
    }

    /// Calls `f` with a shared pointer to the contents. The caller of `f`'s dereference
    /// must guarantee that no `&mut` to the contents exists meanwhile.
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Calls `f` with a unique pointer to the contents. The caller of `f`'s dereference
    /// must guarantee that no other reference to the contents exists meanwhile.
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

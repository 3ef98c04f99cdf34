//! `AnonVma`: the object an anonymous frame points to, and its root lock.
//!
//! Why a frame points to an anon_vma and not to a region (after `include/linux/rmap.h`):
//! a frame that a region faulted in may later be mapped by many regions: every snapshot-
//! fork child of that VM shares it copy-on-write, and a region split shares it with its
//! other half. Regions come and go (VM exit, split, fork), so a frame cannot name "its"
//! region: the name would dangle, or would name one mapper and hide the others. Instead
//! the frame names the anon_vma that was current in the region when the frame was
//! created, plus its page offset; every region that may still map the frame is linked to
//! that anon_vma by a chain entry (an Avc), and the anon_vma's interval tree finds, for a
//! page offset, exactly the linked regions whose range covers it. The anon_vma outlives
//! the regions: frames hold a reference to it (see [`AnonVma::into_raw`]).
//!
//! All anon_vmas created by forking from one first anon_vma form a tree whose top is the
//! *root*; the root's `RwLock` protects the lock-protected state of every anon_vma under
//! it (its interval tree and its `num_children` / `num_active_vmas` counts), as the root
//! `rwsem` does in Linux. Holding one lock for a whole fork tree is what lets
//! `anon_vma_clone` link a region to every anon_vma of its chain under a single
//! acquisition (seed 3).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::counters::Counters;
use crate::sync::{
    Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError, UnsafeCell,
};
use crate::tree::IntervalTree;

/// The state of one anon_vma that its root's lock protects.
#[derive(Debug)]
pub(crate) struct Locked<M> {
    /// The chain entries linking regions to this anon_vma, keyed by the region's
    /// page-offset range; the value is the region's mapping handle.
    pub(crate) tree: IntervalTree<M>,
    /// Child anon_vmas whose trees are non-empty, plus one for a root's link to itself
    /// (Linux's self-parent): commit 7a3ef208's reuse rule needs `< 2`.
    pub(crate) num_children: usize,
    /// Regions whose current anon_vma (where their new COW frames go) is this one.
    pub(crate) num_active_vmas: usize,
}

/// Reverse-map anchor for anonymous frames; see the module docs.
///
/// Always held in an [`Arc`](std::sync::Arc). Frames refer to it through the raw-pointer
/// API ([`AnonVma::into_raw`] and friends).
pub struct AnonVma<M> {
    /// Unique within the process; immutable.
    id: u64,
    /// The root of this anon_vma's fork tree, `None` if this one is the root; immutable.
    root: Option<Arc<AnonVma<M>>>,
    /// The anon_vma this one was forked from, `None` for a root; immutable (taken only
    /// by `Drop`). Keeps the ancestors alive: they hold the child's parent-side links.
    parent: Option<Arc<AnonVma<M>>>,
    /// The root lock (write: link and unlink; read: walks). Used only on a root.
    lock: RwLock<()>,
    /// Root only: bumped when a write guard is taken and when it is released, so that an
    /// unlocked walk can `debug_assert` that no writer ran under it. A debugging aid that
    /// orders nothing (`Relaxed`).
    write_seq: AtomicU64,
    /// Protected by `root().lock`: read with any guard or a `WalkGuard`, written only
    /// with the write guard.
    locked: UnsafeCell<Locked<M>>,
    /// The statistics of the context that created this anon_vma; not protected (atomics).
    counters: std::sync::Arc<Counters>,
}

// Roots keep their address in frames as a `usize` with three free low bits.
const _: () = assert!(std::mem::align_of::<AnonVma<()>>() >= 8);

// SAFETY: the only field that is not `Sync` by itself is `locked`, and every access to it
// goes through `with_locked` (which needs a `RootProof`: a read or write guard of the root
// lock, or a `WalkGuard` whose creator promised no writer runs) or `with_locked_mut`
// (which needs the root's write guard by `&mut`). So shared `&AnonVma` across threads
// never yields a data race; `M: Send + Sync` because `&M` is handed to other threads'
// visitors and `M` values are dropped on whichever thread unlinks.
unsafe impl<M: Send + Sync> Sync for AnonVma<M> {}

impl<M> fmt::Debug for AnonVma<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnonVma")
            .field("id", &self.id)
            .field("root", &self.root().id)
            .field("parent", &self.parent.as_ref().map(|p| p.id))
            .finish_non_exhaustive()
    }
}

/// A snapshot of one anon_vma's lock-protected state (taken under the root read lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonVmaStats {
    /// Chain entries linked to this anon_vma (regions that may map its frames).
    pub linked: usize,
    /// Live child anon_vmas, plus one for a root's link to itself.
    pub num_children: usize,
    /// Regions whose new COW frames go to this anon_vma.
    pub num_active_vmas: usize,
}

/// Proof that the holder may read the lock-protected state of every anon_vma under
/// `proof_root()`.
///
/// # Safety
///
/// While the implementing value is alive, no thread may mutate the `Locked` state of any
/// anon_vma whose root is `proof_root()` except through a `&mut` borrow of this value.
pub(crate) unsafe trait RootProof<M> {
    /// The root whose tree this proof covers.
    fn proof_root(&self) -> &AnonVma<M>;
}

/// The root lock held for writing.
pub(crate) struct RootWrite<'a, M> {
    root: &'a AnonVma<M>,
    _guard: RwLockWriteGuard<'a, ()>,
}

impl<M> Drop for RootWrite<'_, M> {
    fn drop(&mut self) {
        // Runs before `_guard` is dropped: the count is odd exactly while a writer is in.
        self.root.write_seq.fetch_add(1, Ordering::Relaxed);
    }
}

impl<M> RootWrite<'_, M> {
    /// The root this guard locks.
    pub(crate) fn root(&self) -> &AnonVma<M> {
        self.root
    }
}

// SAFETY: a write guard excludes every other guard of the same root lock, and mutation
// needs `&mut RootWrite`, so a shared borrow of the guard sees no mutation.
unsafe impl<M> RootProof<M> for RootWrite<'_, M> {
    fn proof_root(&self) -> &AnonVma<M> {
        self.root
    }
}

/// The root lock held for reading.
pub(crate) struct RootRead<'a, M> {
    root: &'a AnonVma<M>,
    _guard: RwLockReadGuard<'a, ()>,
}

// SAFETY: a read guard excludes every write guard of the same root lock, and mutation
// needs a write guard.
unsafe impl<M> RootProof<M> for RootRead<'_, M> {
    fn proof_root(&self) -> &AnonVma<M> {
        self.root
    }
}

impl<M> AnonVma<M> {
    fn alloc(
        id: u64,
        root: Option<Arc<AnonVma<M>>>,
        parent: Option<Arc<AnonVma<M>>>,
        counters: std::sync::Arc<Counters>,
    ) -> Arc<AnonVma<M>> {
        Counters::add(&counters.anon_vmas_allocated, 1);
        let num_children = usize::from(root.is_none());
        Arc::new(AnonVma {
            id,
            root,
            parent,
            lock: RwLock::new(()),
            write_seq: AtomicU64::new(0),
            locked: UnsafeCell::new(Locked {
                tree: IntervalTree::default(),
                num_children,
                num_active_vmas: 0,
            }),
            counters,
        })
    }

    /// A new root anon_vma (of a region's first COW frame, or of a Flat fork tree).
    pub(crate) fn new_root(id: u64, counters: std::sync::Arc<Counters>) -> Arc<AnonVma<M>> {
        AnonVma::alloc(id, None, None, counters)
    }

    /// A new anon_vma forked from `parent`, sharing its root (and so its lock).
    pub(crate) fn new_child(
        id: u64,
        parent: &Arc<AnonVma<M>>,
        counters: std::sync::Arc<Counters>,
    ) -> Arc<AnonVma<M>> {
        let root = parent.root.clone().unwrap_or_else(|| parent.clone());
        AnonVma::alloc(id, Some(root), Some(parent.clone()), counters)
    }

    /// This anon_vma's id (unique within the process, never reused).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The root of this anon_vma's fork tree (itself if it is a root).
    pub fn root(&self) -> &AnonVma<M> {
        self.root.as_deref().unwrap_or(self)
    }

    /// The root of `this` anon_vma's fork tree, as an `Arc` (for a frame shared across
    /// the tree, which must be filed under the oldest anon_vma so that a walk from it
    /// reaches every relative, as Linux's `__folio_set_anon` does for non-exclusive
    /// folios).
    pub fn root_arc(this: &Arc<AnonVma<M>>) -> Arc<AnonVma<M>> {
        this.root.clone().unwrap_or_else(|| Arc::clone(this))
    }

    /// True if this anon_vma is the root of its fork tree.
    pub fn is_root(&self) -> bool {
        self.root.is_none()
    }

    /// The anon_vma this one was forked from, if any.
    pub fn parent(&self) -> Option<&Arc<AnonVma<M>>> {
        self.parent.as_ref()
    }

    /// Takes the root lock for writing, counted as one write acquisition. `self` must be
    /// a root.
    pub(crate) fn lock_write(&self) -> RootWrite<'_, M> {
        Counters::add(&self.counters.lock_write, 1);
        self.write_uncounted()
    }

    /// Takes the root lock for writing without counting it (walks count in batches).
    pub(crate) fn write_uncounted(&self) -> RootWrite<'_, M> {
        debug_assert!(self.is_root(), "root lock taken on a non-root anon_vma");
        // Poison means a visitor panicked in an exclusive walk; the protected state is
        // only mutated by this crate's non-panicking code, so it is intact.
        let guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        self.write_seq.fetch_add(1, Ordering::Relaxed);
        RootWrite {
            root: self,
            _guard: guard,
        }
    }

    /// Takes the root lock for reading, counted as one read acquisition. `self` must be a
    /// root.
    pub(crate) fn lock_read(&self) -> RootRead<'_, M> {
        Counters::add(&self.counters.lock_read, 1);
        self.read_uncounted()
    }

    /// Takes the root lock for reading without counting it (walks count in batches).
    pub(crate) fn read_uncounted(&self) -> RootRead<'_, M> {
        debug_assert!(self.is_root(), "root lock taken on a non-root anon_vma");
        let guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        RootRead {
            root: self,
            _guard: guard,
        }
    }

    /// Tries to take the root lock for reading without waiting (uncounted: the walk
    /// counts it). `self` must be a root.
    pub(crate) fn try_read_uncounted(&self) -> Option<RootRead<'_, M>> {
        debug_assert!(self.is_root(), "root lock taken on a non-root anon_vma");
        let guard = match self.lock.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(RootRead {
            root: self,
            _guard: guard,
        })
    }

    /// The counters of the context that created this anon_vma.
    pub(crate) fn counters(&self) -> &std::sync::Arc<Counters> {
        &self.counters
    }

    /// The root's writer sequence count (odd while a writer holds the lock).
    pub(crate) fn write_seq(&self) -> u64 {
        self.write_seq.load(Ordering::Relaxed)
    }

    /// Calls `f` with this anon_vma's lock-protected state, read-only.
    ///
    /// Panics if `proof` covers another root: that is a bug in this crate (callers outside
    /// it cannot build proofs for the wrong root; `rmap_walk` checks `WalkGuard`s).
    pub(crate) fn with_locked<R>(
        &self,
        proof: &impl RootProof<M>,
        f: impl FnOnce(&Locked<M>) -> R,
    ) -> R {
        assert!(std::ptr::eq(proof.proof_root(), self.root()));
        // SAFETY: `proof` is a `RootProof` for this anon_vma's root, so no mutation of
        // `locked` happens while it (and so this shared borrow, which cannot escape `f`)
        // lives.
        self.locked.with(|p| f(unsafe { &*p }))
    }

    /// Calls `f` with this anon_vma's lock-protected state, mutably.
    ///
    /// Panics if `guard` locks another root (a bug in this crate).
    pub(crate) fn with_locked_mut<R>(
        &self,
        guard: &mut RootWrite<'_, M>,
        f: impl FnOnce(&mut Locked<M>) -> R,
    ) -> R {
        assert!(std::ptr::eq(guard.root, self.root()));
        // SAFETY: the write guard of this anon_vma's root excludes every other guard and
        // every `WalkGuard` (by its creator's promise); we hold it by `&mut`, so no other
        // borrow of any `locked` under this root exists while `f` runs.
        self.locked.with_mut(|p| f(unsafe { &mut *p }))
    }

    /// Counts of this anon_vma's links, under the root read lock (counted as one).
    pub fn stats(&self) -> AnonVmaStats {
        let guard = self.root().lock_read();
        self.with_locked(&guard, |l| AnonVmaStats {
            linked: l.tree.len(),
            num_children: l.num_children,
            num_active_vmas: l.num_active_vmas,
        })
    }

    /// Turns an `Arc<AnonVma>` into an integer a frame descriptor can keep in an atomic.
    ///
    /// The value is never zero and its three low bits are zero (the type is at least
    /// 8-aligned), so a caller may tag it, as Linux tags `page->mapping` with
    /// `PAGE_MAPPING_ANON`; untag before passing it back. The reference the `Arc` held is
    /// now owned by the integer: release it with [`AnonVma::drop_raw`] (or turn it back
    /// with [`AnonVma::from_raw`]) exactly once, or the anon_vma leaks.
    pub fn into_raw(this: Arc<AnonVma<M>>) -> usize {
        Arc::into_raw(this) as usize
    }

    /// The integer [`AnonVma::into_raw`] would return for `this`, without giving up the
    /// reference: for comparing a frame's value with a known anon_vma.
    pub fn as_raw(this: &Arc<AnonVma<M>>) -> usize {
        Arc::as_ptr(this) as usize
    }

    /// Takes back the reference owned by `raw`.
    ///
    /// # Safety
    ///
    /// `raw` must come from [`AnonVma::into_raw`] with the same `M` (untagged), and the
    /// reference it owns must not have been released yet; it is released by this call
    /// (the returned `Arc` owns it), so `raw` must not be used again unless another
    /// reference keeps the anon_vma alive.
    pub unsafe fn from_raw(raw: usize) -> Arc<AnonVma<M>> {
        // SAFETY: by the caller's contract `raw` is `Arc::into_raw` of a live
        // `Arc<AnonVma<M>>` whose reference we now take over.
        unsafe { Arc::from_raw(raw as *const AnonVma<M>) }
    }

    /// A new `Arc` for the anon_vma `raw` refers to; `raw` keeps its own reference.
    ///
    /// # Safety
    ///
    /// `raw` must come from [`AnonVma::into_raw`] with the same `M` (untagged), and its
    /// reference must not be released before this call returns (for instance: the caller
    /// holds the frame whose field holds `raw` locked, or holds a reference to the frame
    /// that keeps its field from being cleared).
    pub unsafe fn clone_from_raw(raw: usize) -> Arc<AnonVma<M>> {
        let ptr = raw as *const AnonVma<M>;
        // SAFETY: by the caller's contract `ptr` came from `Arc::into_raw` and its
        // reference is alive for the duration of both calls, so the count is at least one
        // when we increment it; the increment is the reference `from_raw` takes over.
        unsafe {
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        }
    }

    /// Borrows the anon_vma `raw` refers to, without touching its reference count.
    ///
    /// # Safety
    ///
    /// `raw` must come from [`AnonVma::into_raw`] with the same `M` (untagged), and the
    /// reference it owns (or another one) must stay alive for all of `'a`.
    pub unsafe fn borrow_raw<'a>(raw: usize) -> &'a AnonVma<M> {
        // SAFETY: by the caller's contract the pointee is a live `AnonVma<M>` for `'a`.
        unsafe { &*(raw as *const AnonVma<M>) }
    }

    /// Releases the reference owned by `raw` (the anon_vma is freed if it was the last).
    ///
    /// # Safety
    ///
    /// As for [`AnonVma::from_raw`]: `raw` came from [`AnonVma::into_raw`] with the same
    /// `M`, its reference is still owned, and `raw` is not used after this call.
    pub unsafe fn drop_raw(raw: usize) {
        // SAFETY: forwarded to the caller's contract, identical to `from_raw`'s.
        drop(unsafe { AnonVma::<M>::from_raw(raw) });
    }
}

impl<M> Drop for AnonVma<M> {
    fn drop(&mut self) {
        Counters::add(&self.counters.anon_vmas_freed, 1);
        // Release the ancestors iteratively: a long fork chain freed at once would
        // otherwise recurse once per generation.
        let mut next = self.parent.take();
        while let Some(p) = next {
            match Arc::try_unwrap(p) {
                Ok(mut ancestor) => next = ancestor.parent.take(),
                Err(_) => break,
            }
        }
    }
}

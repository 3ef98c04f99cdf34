//! Reverse maps for anonymous guest memory: "which regions may map this frame?"
//!
//! This crate answers the question the way Linux answers it for anonymous pages, with
//! the two designs the seeds compare kept side by side and chosen at run time:
//! [`Design::Chain`] (anon_vma chains, Rik van Riel 2010, seed 2) and [`Design::Flat`]
//! (one anon_vma per fork tree, before 2010). It knows nothing of frames, page tables
//! or KVM: it is generic over a mapping handle `M: Clone + Send + Sync + 'static` that
//! walks hand back (the memory manager passes e.g. a `(VmId, region index)` key or a
//! `Weak`/`Arc` of its region; an `Arc` of the region that owns the `RegionRmap` is a
//! reference cycle until [`Rmap::unlink_anon_vmas`] runs, which exit does anyway).
//!
//! # How the memory manager uses it
//!
//! 1. One [`Rmap`] context (`Rmap::new(RmapConfig { design, clone_locking,
//!    reuse_anon_vmas })`) for the whole manager; it holds the [`Counters`].
//! 2. Per region: `rmap.region(mapping, pgoff_start..pgoff_end) -> RegionRmap<M>`. Page
//!    offsets are in a space the whole fork tree shares (e.g. the gfn: a fork child has
//!    the same layout).
//! 3. Before filing the first new anonymous frame (zero-fill or COW copy) of a region:
//!    `rmap.anon_vma_prepare(&mut region) -> Arc<AnonVma<M>>`. The frame records that
//!    anon_vma ([`AnonVma::into_raw`] into an atomic) and its page offset.
//! 4. Snapshot-fork: per region, `rmap.anon_vma_fork(&mut child_region, &parent_region)`.
//!    Region split/copy: `rmap.anon_vma_clone(&mut dst, &src)`. Exit or region removal:
//!    `rmap.unlink_anon_vmas(&mut region)` (or drop the region).
//! 5. Reclaim, migration: `rmap_walk(anon_vma, pgoff, mode, |mapping, pgoff| ...)` with
//!    [`WalkMode::TryShared`] (contended counts as referenced, seed 1),
//!    [`WalkMode::Shared`], [`WalkMode::Exclusive`] or [`WalkMode::Unlocked`] with a
//!    [`WalkGuard`] (seed 4).
//!
//! Allocation failure while linking (seed 2) is [`RmapError::AllocFailed`], after which
//! every structure is exactly as before; [`Rmap::fail_allocations_after`] injects it.
//!
//! # Lock order
//!
//! ```text
//! AddressSpace.mmap_lock (guestmem; write: fork, exit, region changes -> every call
//!   |                     that takes &mut RegionRmap; read: faults, migration)
//!   anon_vma root lock (AnonVma::lock of the root; RwLock)
//!     |   write: anon_vma_prepare, anon_vma_fork, anon_vma_clone, unlink_anon_vmas
//!     |          (chain.rs: RootLocker), rmap_walk Exclusive
//!     |   read:  rmap_walk Shared / TryShared (try_read), AnonVma::stats
//!     |   none:  rmap_walk Unlocked, on a WalkGuard (caller holds every mmap_lock)
//!     page-table lock (guestmem; taken by walk visitors, trylock in reclaim, seed 1)
//!
//! guestmem's frame lock sits above the root lock (walkers lock the frame, then walk),
//! as Linux's folio lock does; see guestmem's lock tree.
//! ```
//!
//! rmap itself takes only the root lock, never two roots at once (a batched clone
//! releases one root before taking the next), and runs no caller code under it except
//! walk visitors. Mapping handles are cloned before and dropped after the lock. What the
//! root lock protects: each anon_vma's interval tree, `num_children` and
//! `num_active_vmas`, for every anon_vma under that root. A `RegionRmap`'s fields are
//! protected by `&mut` (the caller's `mmap_lock` held for writing).
//!
//! # Testing
//!
//! `cargo test -p rmap` runs the unit tests, the model-based test (`tests/model.rs`) and
//! the failure-injection test (`tests/enomem.rs`). The loom model of link and unlink
//! against concurrent walks is separate:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p rmap --release --lib loom
//! ```

mod anon_vma;
mod chain;
mod counters;
mod sync;
mod tree;
mod walk;

pub use anon_vma::{AnonVma, AnonVmaStats};
pub use chain::{CloneLocking, Design, RegionRmap, Rmap, RmapConfig, RmapError};
pub use counters::{CounterSnapshot, Counters, WALK_FLUSH_EVERY, flush_walk_counters};
pub use walk::{WalkError, WalkGuard, WalkMode, WalkOutcome, rmap_walk};

impl Rmap {
    /// [`rmap_walk`], as a method of the context (counts into the counters of the
    /// context that created `anon_vma`, which should be this one).
    pub fn rmap_walk<M>(
        &self,
        anon_vma: &AnonVma<M>,
        pgoff: u64,
        mode: WalkMode<'_, M>,
        visitor: impl FnMut(&M, u64) -> std::ops::ControlFlow<()>,
    ) -> Result<WalkOutcome, WalkError> {
        rmap_walk(anon_vma, pgoff, mode, visitor)
    }
}

#[cfg(all(test, loom))]
mod loom_tests;

//! `rmap_walk`: visiting every region that may map a frame, in four lock modes.
//!
//! A walk starts from the anon_vma a frame was filed under and the frame's page offset,
//! and calls the visitor once for every region linked to that anon_vma whose range covers
//! the offset (Linux: `rmap_walk_anon`, `anon_vma_interval_tree_foreach`). The modes
//! differ only in how the structures are kept still meanwhile:
//!
//! - [`WalkMode::Exclusive`]: the root lock for writing (Linux before 2012).
//! - [`WalkMode::Shared`]: the root lock for reading; walks run in parallel with each
//!   other and exclude only link and unlink (Linux since the rwsem, after seed 4).
//! - [`WalkMode::TryShared`]: `try_read`; if a writer holds the lock the walk returns
//!   [`WalkOutcome::Contended`] at once instead of waiting. Reclaim counts a contended
//!   frame as referenced and moves on (seed 1's trylock, applied to the root lock).
//! - [`WalkMode::Unlocked`]: no lock at all, on the strength of a [`WalkGuard`], whose
//!   `unsafe` constructor is the caller's promise that nothing links or unlinks under
//!   that root while the guard lives (seed 4: migration already holds locks that keep
//!   every region of the tree in place). Ingo's original unlocked walk relied on the
//!   caller's *own* `mmap_sem` only, which does not stop *other* address spaces of the
//!   fork tree from forking or exiting; that is why Linux took the read lock instead.
//!   The guard's contract therefore names every address space linked under the root.

use std::ops::ControlFlow;

use crate::anon_vma::{AnonVma, RootProof};
use crate::counters::{WalkLock, record_walk};

/// A caller's proof that no link or unlink runs under one root while it lives.
///
/// Build one with the `unsafe` [`WalkGuard::new`]; pass it as [`WalkMode::Unlocked`].
#[derive(Debug)]
pub struct WalkGuard<'a, M> {
    root: &'a AnonVma<M>,
}

impl<'a, M> WalkGuard<'a, M> {
    /// A guard for unlocked walks of every anon_vma under `anon_vma`'s root.
    ///
    /// # Safety
    ///
    /// For all of `'a`, no thread may run [`Rmap::anon_vma_prepare`],
    /// [`Rmap::anon_vma_fork`], [`Rmap::anon_vma_clone`] or [`Rmap::unlink_anon_vmas`]
    /// (including the unlink done by dropping a linked [`RegionRmap`]) on any region
    /// linked to an anon_vma under this root, nor on a region being linked to one. The
    /// intended way to meet this: every such call is made with the caller's
    /// `AddressSpace.mmap_lock` held for writing (the lock order at the top of this
    /// crate), and the guard's creator holds `mmap_lock` (read is enough) of *every*
    /// address space that has a region linked under this root, for all of `'a`. Holding
    /// only the address space of the frame being migrated is not enough: another VM of
    /// the same fork tree can fork or exit. Walks with the root lock (any other mode) may
    /// run concurrently. Debug builds check that no writer held or took the root lock
    /// during an unlocked walk, which catches some violations, not all.
    ///
    /// [`Rmap::anon_vma_prepare`]: crate::Rmap::anon_vma_prepare
    /// [`Rmap::anon_vma_fork`]: crate::Rmap::anon_vma_fork
    /// [`Rmap::anon_vma_clone`]: crate::Rmap::anon_vma_clone
    /// [`Rmap::unlink_anon_vmas`]: crate::Rmap::unlink_anon_vmas
    /// [`RegionRmap`]: crate::RegionRmap
    pub unsafe fn new(anon_vma: &'a AnonVma<M>) -> Self {
        WalkGuard {
            root: anon_vma.root(),
        }
    }
}

// SAFETY: `WalkGuard::new`'s contract is exactly `RootProof`'s: no mutation of any
// `Locked` state under `root` while the guard lives (mutation needs a write guard, which
// only link and unlink take, and those are excluded by the contract).
unsafe impl<M> RootProof<M> for WalkGuard<'_, M> {
    fn proof_root(&self) -> &AnonVma<M> {
        self.root
    }
}

/// How a walk keeps the structures still; see the module docs.
#[derive(Debug)]
pub enum WalkMode<'g, M> {
    /// Root lock held for writing.
    Exclusive,
    /// Root lock held for reading (waits for writers).
    Shared,
    /// Root lock tried for reading; [`WalkOutcome::Contended`] if a writer holds it.
    TryShared,
    /// No lock; the guard proves nothing changes (it must cover the walked anon_vma's
    /// root, or the walk returns [`WalkError::GuardForAnotherRoot`]).
    Unlocked(&'g WalkGuard<'g, M>),
}

impl<M> Clone for WalkMode<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for WalkMode<'_, M> {}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkOutcome {
    /// Every covering region was visited.
    Completed {
        /// Regions handed to the visitor.
        examined: u64,
    },
    /// The visitor returned `ControlFlow::Break`.
    Stopped {
        /// Regions handed to the visitor, the breaking one included.
        examined: u64,
    },
    /// `TryShared` found the root lock held for writing; nothing was visited. Reclaim
    /// treats the frame as referenced (seed 1).
    Contended,
}

impl WalkOutcome {
    /// Regions handed to the visitor (0 if contended).
    pub fn examined(&self) -> u64 {
        match *self {
            WalkOutcome::Completed { examined } | WalkOutcome::Stopped { examined } => examined,
            WalkOutcome::Contended => 0,
        }
    }
}

/// Errors of `rmap_walk`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// An unlocked walk's guard was made for another fork tree.
    #[error(
        "the WalkGuard covers root anon_vma {guard_root}, but the walked anon_vma's root is \
         {walked_root}: build the guard from the anon_vma you walk (or one under its root)"
    )]
    GuardForAnotherRoot {
        /// Id of the root the guard covers.
        guard_root: u64,
        /// Id of the walked anon_vma's root.
        walked_root: u64,
    },
}

/// Walks with the structures held still by `proof`; returns the outcome and the number
/// of tree nodes visited.
fn walk_with<M>(
    anon_vma: &AnonVma<M>,
    proof: &impl RootProof<M>,
    pgoff: u64,
    visitor: &mut impl FnMut(&M, u64) -> ControlFlow<()>,
) -> (WalkOutcome, u64) {
    let mut visited = 0u64;
    let mut examined = 0u64;
    let flow = anon_vma.with_locked(proof, |l| {
        l.tree.for_each_containing(pgoff, &mut visited, |m| {
            examined += 1;
            visitor(m, pgoff)
        })
    });
    let outcome = match flow {
        ControlFlow::Continue(()) => WalkOutcome::Completed { examined },
        ControlFlow::Break(()) => WalkOutcome::Stopped { examined },
    };
    (outcome, visited)
}

/// Calls `visitor(mapping, pgoff)` for every region that may map the frame filed under
/// `anon_vma` at page offset `pgoff`, until the visitor breaks (Linux: `rmap_walk_anon`).
///
/// Counts into the counters of the context that created `anon_vma` (batched per thread,
/// see [`Counters`](crate::Counters)). The visitor runs with the root lock held (except
/// `Unlocked`): it must not link or unlink regions of this fork tree, or it deadlocks.
pub fn rmap_walk<M>(
    anon_vma: &AnonVma<M>,
    pgoff: u64,
    mode: WalkMode<'_, M>,
    mut visitor: impl FnMut(&M, u64) -> ControlFlow<()>,
) -> Result<WalkOutcome, WalkError> {
    let root = anon_vma.root();
    let ((outcome, visited), lock) = match mode {
        WalkMode::Exclusive => {
            let guard = root.write_uncounted();
            let r = walk_with(anon_vma, &guard, pgoff, &mut visitor);
            (r, WalkLock::Write)
        }
        WalkMode::Shared => {
            let guard = root.read_uncounted();
            let r = walk_with(anon_vma, &guard, pgoff, &mut visitor);
            (r, WalkLock::Read)
        }
        WalkMode::TryShared => match root.try_read_uncounted() {
            Some(guard) => {
                let r = walk_with(anon_vma, &guard, pgoff, &mut visitor);
                (r, WalkLock::TryRead)
            }
            None => ((WalkOutcome::Contended, 0), WalkLock::Contended),
        },
        WalkMode::Unlocked(guard) => {
            if !std::ptr::eq(guard.root, root) {
                return Err(WalkError::GuardForAnotherRoot {
                    guard_root: guard.root.id(),
                    walked_root: root.id(),
                });
            }
            let seq = root.write_seq();
            debug_assert!(seq % 2 == 0, "unlocked walk while the root is write-locked");
            let r = walk_with(anon_vma, guard, pgoff, &mut visitor);
            debug_assert_eq!(
                root.write_seq(),
                seq,
                "root was written during unlocked walk"
            );
            (r, WalkLock::Unlocked)
        }
    };
    record_walk(anon_vma.counters(), lock, visited, outcome.examined());
    Ok(outcome)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::{Design, Rmap, RmapConfig};

    fn collect(av: &AnonVma<u32>, pgoff: u64, mode: WalkMode<'_, u32>) -> Vec<u32> {
        let mut seen = Vec::new();
        let out = rmap_walk(av, pgoff, mode, |m, p| {
            assert_eq!(p, pgoff);
            seen.push(*m);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(out.examined(), seen.len() as u64);
        seen.sort_unstable();
        seen
    }

    #[test]
    fn every_mode_finds_parent_and_children_for_a_parent_frame() {
        let rmap = Rmap::default();
        let mut p = rmap.region(0u32, 0..8).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let mut kids = Vec::new();
        for i in 1..=3 {
            let mut c = rmap.region(i, 0..8).unwrap();
            rmap.anon_vma_fork(&mut c, &p).unwrap();
            kids.push(c);
        }
        // SAFETY: this test is single-threaded and links nothing while the guard lives.
        let guard = unsafe { WalkGuard::new(&pav) };
        for mode in [
            WalkMode::Exclusive,
            WalkMode::Shared,
            WalkMode::TryShared,
            WalkMode::Unlocked(&guard),
        ] {
            assert_eq!(collect(&pav, 5, mode), vec![0, 1, 2, 3], "{mode:?}");
        }
        // A child's own frame is found in its own region only.
        let cav = kids[1].anon_vma().unwrap().clone();
        assert_eq!(collect(&cav, 5, WalkMode::Shared), vec![2]);
    }

    #[test]
    fn flat_walk_examines_the_whole_tree() {
        let rmap = Rmap::new(RmapConfig {
            design: Design::Flat,
            ..RmapConfig::default()
        });
        let mut p = rmap.region(0u32, 0..8).unwrap();
        rmap.anon_vma_prepare(&mut p).unwrap();
        let mut kids = Vec::new();
        for i in 1..=3 {
            let mut c = rmap.region(i, 0..8).unwrap();
            rmap.anon_vma_fork(&mut c, &p).unwrap();
            kids.push(c);
        }
        let cav = kids[1].anon_vma().unwrap().clone();
        assert_eq!(collect(&cav, 5, WalkMode::Shared), vec![0, 1, 2, 3]);
    }

    #[test]
    fn try_shared_reports_contended_while_a_writer_holds_the_root() {
        let rmap = Rmap::default();
        let mut p = rmap.region(0u32, 0..8).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let writer = pav.lock_write();
        let out = rmap_walk(&pav, 1, WalkMode::TryShared, |_, _| {
            ControlFlow::Continue(())
        });
        drop(writer);
        assert_eq!(out, Ok(WalkOutcome::Contended));
        assert_eq!(rmap.snapshot().contended, 1);
    }

    #[test]
    fn pages_outside_a_regions_range_do_not_visit_it() {
        let rmap = Rmap::default();
        let mut p = rmap.region(0u32, 0..8).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let mut half = rmap.region(1u32, 4..8).unwrap();
        rmap.anon_vma_clone(&mut half, &p).unwrap();
        assert_eq!(collect(&pav, 2, WalkMode::Shared), vec![0]);
        assert_eq!(collect(&pav, 6, WalkMode::Shared), vec![0, 1]);
    }

    #[test]
    fn a_guard_for_another_tree_is_an_error() {
        let rmap = Rmap::default();
        let mut a = rmap.region(0u32, 0..8).unwrap();
        let aav = rmap.anon_vma_prepare(&mut a).unwrap();
        let mut b = rmap.region(1u32, 0..8).unwrap();
        let bav = rmap.anon_vma_prepare(&mut b).unwrap();
        // SAFETY: single-threaded; nothing links while the guard lives.
        let guard = unsafe { WalkGuard::new(&aav) };
        let out = rmap_walk(&bav, 0, WalkMode::Unlocked(&guard), |_, _| {
            ControlFlow::Continue(())
        });
        assert!(matches!(out, Err(WalkError::GuardForAnotherRoot { .. })));
    }

    #[test]
    fn a_break_stops_the_walk_and_reports_stopped() {
        let rmap = Rmap::default();
        let mut p = rmap.region(0u32, 0..8).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let mut c = rmap.region(1u32, 0..8).unwrap();
        rmap.anon_vma_fork(&mut c, &p).unwrap();
        let out = rmap_walk(&pav, 0, WalkMode::Shared, |_, _| ControlFlow::Break(()));
        assert_eq!(out, Ok(WalkOutcome::Stopped { examined: 1 }));
    }

    #[test]
    fn raw_round_trip_keeps_the_anon_vma_alive() {
        let rmap = Rmap::default();
        let mut p = rmap.region(0u32, 0..8).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let raw = AnonVma::into_raw(pav.clone());
        assert_eq!(raw & 7, 0);
        assert_eq!(raw, AnonVma::as_raw(&pav));
        rmap.unlink_anon_vmas(&mut p);
        drop(pav);
        assert_eq!(
            rmap.snapshot().anon_vmas_freed,
            0,
            "the raw reference keeps it"
        );
        // SAFETY: `raw` came from `into_raw` and its reference is still owned.
        let again = unsafe { AnonVma::<u32>::clone_from_raw(raw) };
        // SAFETY: as above; the reference is alive while `borrowed` is used.
        let borrowed = unsafe { AnonVma::<u32>::borrow_raw(raw) };
        assert_eq!(borrowed.id(), again.id());
        drop(again);
        // SAFETY: `raw`'s reference is released exactly once, here.
        unsafe { AnonVma::<u32>::drop_raw(raw) };
        assert_eq!(rmap.snapshot().anon_vmas_freed, 1);
    }
}

//! Loom models of the root-lock protocol: link and unlink racing with walks.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p rmap --release --lib loom`. Each model
//! is small (one or two writers, one walker) and bounds preemptions, so that loom explores
//! every interleaving of the root lock and the lock-protected cells within seconds; loom
//! also checks that no access to an anon_vma's lock-protected state races with a write.

use std::ops::ControlFlow;

use loom::sync::Arc as LArc;
use loom::thread;

use crate::{Design, Rmap, RmapConfig, WalkMode, WalkOutcome, rmap_walk};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.check(f);
}

fn walk_ids(av: &crate::AnonVma<u32>, mode: WalkMode<'_, u32>) -> Option<Vec<u32>> {
    let mut seen = Vec::new();
    let out = rmap_walk(av, 0, mode, |m, _| {
        seen.push(*m);
        ControlFlow::Continue(())
    })
    .ok()?;
    if out == WalkOutcome::Contended {
        return None;
    }
    seen.sort_unstable();
    Some(seen)
}

/// A fork and an exit of a child race with walks of the parent's anon_vma: every walk
/// sees the parent, sees the child at most once, and never sees anything else.
fn fork_exit_against_walk(design: Design) {
    model(move || {
        let rmap = Rmap::new(RmapConfig {
            design,
            ..RmapConfig::default()
        });
        let mut parent = rmap.region(0u32, 0..4).expect("non-empty range");
        let pav = rmap.anon_vma_prepare(&mut parent).expect("no failpoint");
        let parent = LArc::new(parent);

        let writer = {
            let rmap = rmap.clone();
            let parent = parent.clone();
            thread::spawn(move || {
                let mut child = rmap.region(1u32, 0..4).expect("non-empty range");
                rmap.anon_vma_fork(&mut child, &parent)
                    .expect("no failpoint");
                rmap.unlink_anon_vmas(&mut child);
            })
        };

        for mode in [WalkMode::Shared, WalkMode::TryShared] {
            if let Some(seen) = walk_ids(&pav, mode) {
                assert!(seen == [0] || seen == [0, 1], "walk saw {seen:?}");
            }
        }
        writer.join().expect("writer thread");
        assert_eq!(walk_ids(&pav, WalkMode::Shared), Some(vec![0]));
        drop(parent);
        let s = rmap.snapshot();
        assert_eq!(s.avcs_allocated, s.avcs_freed);
    });
}

#[test]
fn loom_chain_fork_exit_against_walk() {
    fork_exit_against_walk(Design::Chain);
}

#[test]
fn loom_flat_fork_exit_against_walk() {
    fork_exit_against_walk(Design::Flat);
}

/// Two forks race to reuse the same ancestor anon_vma (no active region, one child):
/// exactly one of them may take it (Linux's 2022 double-reuse bug is the other outcome).
#[test]
fn loom_concurrent_forks_reuse_an_anon_vma_at_most_once() {
    model(|| {
        let rmap = Rmap::default();
        let mut p0 = rmap.region(0u32, 0..4).expect("non-empty range");
        rmap.anon_vma_prepare(&mut p0).expect("no failpoint");
        let mut p1 = rmap.region(1u32, 0..4).expect("non-empty range");
        rmap.anon_vma_fork(&mut p1, &p0).expect("no failpoint");
        let a1 = p1.anon_vma().expect("forked").clone();
        let mut p2 = rmap.region(2u32, 0..4).expect("non-empty range");
        rmap.anon_vma_fork(&mut p2, &p1).expect("no failpoint");
        let mut p2b = rmap.region(3u32, 0..4).expect("non-empty range");
        rmap.anon_vma_clone(&mut p2b, &p2).expect("no failpoint");
        rmap.unlink_anon_vmas(&mut p1);
        let stats = a1.stats();
        assert_eq!((stats.num_active_vmas, stats.num_children), (0, 1));

        let forkers: Vec<_> = [p2, p2b]
            .into_iter()
            .enumerate()
            .map(|(i, src)| {
                let rmap = rmap.clone();
                thread::spawn(move || {
                    let mut child = rmap.region(10 + i as u32, 0..4).expect("non-empty");
                    rmap.anon_vma_fork(&mut child, &src).expect("no failpoint");
                    (src, child)
                })
            })
            .collect();
        let regions: Vec<_> = forkers
            .into_iter()
            .map(|t| t.join().expect("forker thread"))
            .collect();
        let reusers = regions
            .iter()
            .filter(|(_, c)| c.anon_vma().is_some_and(|a| LArc::ptr_eq(a, &a1)))
            .count();
        assert_eq!(reusers, 1);
        assert_eq!(a1.stats().num_active_vmas, 1);
        assert_eq!(rmap.snapshot().anon_vmas_reused, 1);
    });
}

//! Failure injection: an allocation failure during fork or clone (seed 2: "linking a VMA
//! to anon_vmas now involves memory allocations") returns `AllocFailed` and leaves every
//! structure exactly as it was: the source's chain, the destination (still unlinked),
//! every anon_vma's tree and counts, and what walks find. The operation then succeeds
//! once memory is back.

// Runs on std primitives only; the loom build (`--cfg loom`) tests the lib alone.
#![cfg(not(loom))]

use std::ops::ControlFlow;

use rmap::{
    AnonVmaStats, CloneLocking, Design, RegionRmap, Rmap, RmapConfig, RmapError, WalkMode,
    rmap_walk,
};

/// A three-generation tree: root region 0, its child 1, grandchild 2; returns them.
fn tree(rmap: &Rmap) -> Vec<RegionRmap<u32>> {
    let mut r0 = rmap.region(0u32, 0..16).unwrap();
    rmap.anon_vma_prepare(&mut r0).unwrap();
    let mut r1 = rmap.region(1u32, 0..16).unwrap();
    rmap.anon_vma_fork(&mut r1, &r0).unwrap();
    let mut r2 = rmap.region(2u32, 0..16).unwrap();
    rmap.anon_vma_fork(&mut r2, &r1).unwrap();
    vec![r0, r1, r2]
}

type State = Vec<(Vec<u64>, Option<u64>, Vec<AnonVmaStats>, Vec<Vec<u32>>)>;

fn state(regions: &[RegionRmap<u32>]) -> State {
    regions
        .iter()
        .map(|r| {
            let walks = r
                .chain()
                .map(|av| {
                    let mut seen = Vec::new();
                    rmap_walk(av, 3, WalkMode::Shared, |m, _| {
                        seen.push(*m);
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                    seen.sort_unstable();
                    seen
                })
                .collect();
            (
                r.chain_ids(),
                r.anon_vma().map(|a| a.id()),
                r.chain().map(|a| a.stats()).collect(),
                walks,
            )
        })
        .collect()
}

fn configs() -> Vec<RmapConfig> {
    let mut out = Vec::new();
    for design in [Design::Chain, Design::Flat] {
        for clone_locking in [CloneLocking::Batched, CloneLocking::PerEntry] {
            out.push(RmapConfig {
                design,
                clone_locking,
                reuse_anon_vmas: true,
            });
        }
    }
    out
}

#[test]
fn enomem_during_fork_leaves_every_structure_unchanged() {
    for config in configs() {
        let rmap = Rmap::new(config);
        let regions = tree(&rmap);
        let before = state(&regions);
        // Chain: the grandchild's chain has 3 entries, so a fork needs 4 Avcs and an
        // anon_vma (5 allocations); Flat needs 1 Avc.
        let needed = match config.design {
            Design::Chain => 5,
            Design::Flat => 1,
        };
        for budget in 0..needed {
            let mut child = rmap.region(9u32, 0..16).unwrap();
            rmap.fail_allocations_after(budget);
            let err = rmap.anon_vma_fork(&mut child, &regions[2]).unwrap_err();
            rmap.clear_failpoint();
            assert!(
                matches!(err, RmapError::AllocFailed { .. }),
                "{config:?}: {err}"
            );
            assert_eq!(child.chain_len(), 0, "{config:?} budget {budget}");
            assert!(child.anon_vma().is_none());
            assert_eq!(state(&regions), before, "{config:?} budget {budget}");
        }
        assert_eq!(rmap.snapshot().alloc_failures, needed);
        let mut child = rmap.region(9u32, 0..16).unwrap();
        rmap.fail_allocations_after(needed);
        rmap.anon_vma_fork(&mut child, &regions[2]).unwrap();
        rmap.clear_failpoint();
        assert_eq!(child.chain_len() as u64, needed.min(4));
    }
}

#[test]
fn enomem_during_clone_leaves_every_structure_unchanged() {
    for config in configs() {
        let rmap = Rmap::new(config);
        let regions = tree(&rmap);
        let before = state(&regions);
        let needed = regions[2].chain_len() as u64;
        for budget in 0..needed {
            let mut dst = rmap.region(9u32, 4..8).unwrap();
            rmap.fail_allocations_after(budget);
            let err = rmap.anon_vma_clone(&mut dst, &regions[2]).unwrap_err();
            rmap.clear_failpoint();
            assert!(matches!(err, RmapError::AllocFailed { .. }));
            assert_eq!(dst.chain_len(), 0);
            assert_eq!(state(&regions), before, "{config:?} budget {budget}");
        }
        let mut dst = rmap.region(9u32, 4..8).unwrap();
        rmap.fail_allocations_after(needed);
        rmap.anon_vma_clone(&mut dst, &regions[2]).unwrap();
        assert_eq!(dst.chain_len(), regions[2].chain_len());
    }
}

#[test]
fn failed_links_leak_nothing() {
    let rmap = Rmap::default();
    {
        let regions = tree(&rmap);
        for budget in 0..5 {
            let mut child = rmap.region(9u32, 0..16).unwrap();
            rmap.fail_allocations_after(budget);
            let _ = rmap.anon_vma_fork(&mut child, &regions[2]);
            rmap.clear_failpoint();
        }
    }
    let s = rmap.snapshot();
    assert_eq!(s.avcs_allocated, s.avcs_freed);
    assert_eq!(s.anon_vmas_allocated, s.anon_vmas_freed);
}

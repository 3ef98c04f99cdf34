//! Model-based test: random create / fork / split / exit / COW sequences across fork
//! trees, in both designs and both clone lockings, checked against a brute-force model.
//!
//! The model keeps, for every live frame, the anon_vma it was filed under (as the raw
//! value a frame descriptor stores), its page offset, and the set of regions that map it
//! (a fork child maps all its parent's frames; a split copy maps its source's frames in
//! its range; a COW or zero-fill replaces one region's frame at one offset with a new one
//! filed under that region's `anon_vma_prepare`; an exit removes the region everywhere).
//!
//! Invariants checked after every operation, for every live frame and in a walk mode that
//! rotates through Exclusive, Shared, TryShared and Unlocked:
//! 1. No miss: every region that maps the frame is visited (a miss is data loss in
//!    reclaim: a mapping left behind on a frame that is freed).
//! 2. No stale entry: every visited region is live and its range covers the offset.
//! 3. No duplicate: a walk visits each region at most once.
//! 4. A single-threaded TryShared walk never reports `Contended`.
//!
//! And structurally, for every live region:
//! 5. Its anon_vma, when set, is on its chain, and all anon_vmas of its chain share one
//!    root (so a batched clone takes one lock).
//! 6. `Flat`: the chain has at most one entry.
//! 7. Chain entries allocated minus freed equals the sum of live chain lengths.
//!
//! Failure injection is one of the operations: it arms the allocation failpoint for the
//! next fork, split or COW; if that operation fails, every live region's chain (entry ids
//! and anon_vma) and every linked anon_vma's counts must be exactly as before.
//! 8. At the end, once every region exited and every frame was freed, every chain entry
//!    and every anon_vma has been freed.

// Runs on std primitives only; the loom build (`--cfg loom`) tests the lib alone.
#![cfg(not(loom))]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;

use proptest::prelude::*;
use rmap::{
    AnonVma, CloneLocking, Design, RegionRmap, Rmap, RmapConfig, RmapError, WalkGuard, WalkMode,
    WalkOutcome, rmap_walk,
};

#[derive(Debug, Clone)]
enum Op {
    Create { start: u64, len: u64 },
    Fork { r: usize },
    Split { r: usize, start: u64, len: u64 },
    Exit { r: usize },
    Touch { r: usize, page: u64 },
    FailNext { budget: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0u64..16, 1u64..16).prop_map(|(start, len)| Op::Create { start, len }),
        3 => any::<usize>().prop_map(|r| Op::Fork { r }),
        1 => (any::<usize>(), 0u64..16, 1u64..16)
            .prop_map(|(r, start, len)| Op::Split { r, start, len }),
        2 => any::<usize>().prop_map(|r| Op::Exit { r }),
        6 => (any::<usize>(), any::<u64>()).prop_map(|(r, page)| Op::Touch { r, page }),
        1 => (0u64..4).prop_map(|budget| Op::FailNext { budget }),
    ]
}

struct Region {
    rr: RegionRmap<u32>,
    /// Page offset -> frame id.
    pages: BTreeMap<u64, u64>,
}

struct Frame {
    raw: usize,
    pgoff: u64,
    mappers: BTreeSet<u32>,
}

struct Model {
    rmap: Rmap,
    regions: BTreeMap<u32, Region>,
    frames: HashMap<u64, Frame>,
    next_region: u32,
    next_frame: u64,
    step: usize,
}

/// Everything a failed operation must leave unchanged.
type Digest = Vec<(u32, Vec<u64>, Option<u64>, Vec<(usize, usize, usize)>)>;

impl Model {
    fn pick(&self, r: usize) -> Option<u32> {
        if self.regions.is_empty() {
            return None;
        }
        self.regions.keys().nth(r % self.regions.len()).copied()
    }

    fn new_region(&mut self, pgoff: std::ops::Range<u64>) -> (u32, RegionRmap<u32>) {
        let id = self.next_region;
        self.next_region += 1;
        let rr = self
            .rmap
            .region(id, pgoff)
            .expect("model ranges are non-empty");
        (id, rr)
    }

    fn unmap(&mut self, region: u32, frame: u64) {
        let f = self.frames.get_mut(&frame).expect("mapped frame exists");
        f.mappers.remove(&region);
        if f.mappers.is_empty() {
            let f = self.frames.remove(&frame).expect("just seen");
            // SAFETY: `f.raw` came from `AnonVma::into_raw` when the frame was created and
            // is released exactly once, here, when its last mapper goes.
            unsafe { AnonVma::<u32>::drop_raw(f.raw) };
        }
    }

    fn digest(&self) -> Digest {
        self.regions
            .iter()
            .map(|(id, r)| {
                let stats =
                    r.rr.chain()
                        .map(|a| {
                            let s = a.stats();
                            (s.linked, s.num_children, s.num_active_vmas)
                        })
                        .collect();
                (
                    *id,
                    r.rr.chain_ids(),
                    r.rr.anon_vma().map(|a| a.id()),
                    stats,
                )
            })
            .collect()
    }

    /// Applies `op`; returns whether an allocation failure was observed.
    fn apply(&mut self, op: &Op) -> Result<(), RmapError> {
        match *op {
            Op::Create { start, len } => {
                let (id, rr) = self.new_region(start..start + len);
                self.regions.insert(
                    id,
                    Region {
                        rr,
                        pages: BTreeMap::new(),
                    },
                );
            }
            Op::Fork { r } => {
                let Some(p) = self.pick(r) else { return Ok(()) };
                let range = self.regions[&p].rr.pgoff();
                let (id, mut rr) = self.new_region(range);
                self.rmap.anon_vma_fork(&mut rr, &self.regions[&p].rr)?;
                let pages = self.regions[&p].pages.clone();
                for f in pages.values() {
                    self.frames.get_mut(f).expect("mapped").mappers.insert(id);
                }
                self.regions.insert(id, Region { rr, pages });
            }
            Op::Split { r, start, len } => {
                let Some(p) = self.pick(r) else { return Ok(()) };
                let src = self.regions[&p].rr.pgoff();
                let (s, e) = (src.start.max(start), src.end.min(start + len));
                if s >= e {
                    return Ok(());
                }
                let (id, mut rr) = self.new_region(s..e);
                self.rmap.anon_vma_clone(&mut rr, &self.regions[&p].rr)?;
                let pages: BTreeMap<u64, u64> = self.regions[&p]
                    .pages
                    .range(s..e)
                    .map(|(k, v)| (*k, *v))
                    .collect();
                for f in pages.values() {
                    self.frames.get_mut(f).expect("mapped").mappers.insert(id);
                }
                self.regions.insert(id, Region { rr, pages });
            }
            Op::Exit { r } => {
                let Some(id) = self.pick(r) else {
                    return Ok(());
                };
                let mut region = self.regions.remove(&id).expect("picked");
                if self.step % 2 == 0 {
                    self.rmap.unlink_anon_vmas(&mut region.rr);
                } // else: dropping the region unlinks it
                for f in region.pages.values() {
                    self.unmap(id, *f);
                }
            }
            Op::Touch { r, page } => {
                let Some(id) = self.pick(r) else {
                    return Ok(());
                };
                let region = self.regions.get_mut(&id).expect("picked");
                let range = region.rr.pgoff();
                let pgoff = range.start + page % (range.end - range.start);
                let av = self.rmap.anon_vma_prepare(&mut region.rr)?;
                let frame = self.next_frame;
                self.next_frame += 1;
                let old = region.pages.insert(pgoff, frame);
                self.frames.insert(
                    frame,
                    Frame {
                        raw: AnonVma::into_raw(av),
                        pgoff,
                        mappers: BTreeSet::from([id]),
                    },
                );
                if let Some(old) = old {
                    self.unmap(id, old);
                }
            }
            Op::FailNext { .. } => {}
        }
        Ok(())
    }

    fn check(&self, design: Design) {
        for (fid, f) in &self.frames {
            // SAFETY: the frame owns `f.raw`'s reference until it is unmapped everywhere.
            let av = unsafe { AnonVma::<u32>::borrow_raw(f.raw) };
            // SAFETY: single-threaded: nothing links or unlinks while the guard lives.
            let guard = unsafe { WalkGuard::new(av) };
            let mode = match (*fid as usize + self.step) % 4 {
                0 => WalkMode::Exclusive,
                1 => WalkMode::Shared,
                2 => WalkMode::TryShared,
                _ => WalkMode::Unlocked(&guard),
            };
            let mut seen = Vec::new();
            let out = rmap_walk(av, f.pgoff, mode, |m, _| {
                seen.push(*m);
                ControlFlow::Continue(())
            })
            .expect("the guard is for this anon_vma's root");
            assert_ne!(out, WalkOutcome::Contended, "invariant 4");
            let set: BTreeSet<u32> = seen.iter().copied().collect();
            assert_eq!(set.len(), seen.len(), "invariant 3: duplicate in {seen:?}");
            assert!(
                f.mappers.is_subset(&set),
                "invariant 1: frame {fid} at {} mapped by {:?}, walk saw {set:?}",
                f.pgoff,
                f.mappers
            );
            for r in &set {
                let region = self.regions.get(r).expect("invariant 2: stale region");
                assert!(region.rr.pgoff().contains(&f.pgoff), "invariant 2: range");
            }
        }
        let mut links = 0u64;
        for r in self.regions.values() {
            let chain: Vec<_> = r.rr.chain().collect();
            links += chain.len() as u64;
            if let Some(av) = r.rr.anon_vma() {
                assert!(
                    chain.iter().any(|c| std::sync::Arc::ptr_eq(c, av)),
                    "inv. 5"
                );
            }
            if let Some(first) = chain.first() {
                assert!(chain.iter().all(|c| std::ptr::eq(c.root(), first.root())));
            }
            if design == Design::Flat {
                assert!(chain.len() <= 1, "invariant 6");
            }
        }
        let s = self.rmap.snapshot();
        assert_eq!(s.avcs_allocated - s.avcs_freed, links, "invariant 7");
    }
}

fn run(config: RmapConfig, ops: &[Op]) {
    let mut m = Model {
        rmap: Rmap::new(config),
        regions: BTreeMap::new(),
        frames: HashMap::new(),
        next_region: 0,
        next_frame: 0,
        step: 0,
    };
    let mut armed = None;
    for op in ops {
        m.step += 1;
        if let Op::FailNext { budget } = *op {
            armed = Some(budget);
            continue;
        }
        let before = armed.map(|b| {
            m.rmap.fail_allocations_after(b);
            m.digest()
        });
        let result = m.apply(op);
        m.rmap.clear_failpoint();
        match (result, before) {
            (Ok(()), _) => {}
            (Err(RmapError::AllocFailed { .. }), Some(before)) => {
                assert_eq!(m.digest(), before, "failed {op:?} changed the structures");
            }
            (Err(e), _) => panic!("{op:?} failed unexpectedly: {e}"),
        }
        if !matches!(op, Op::Create { .. }) {
            armed = None;
        }
        m.check(config.design);
    }
    let regions = std::mem::take(&mut m.regions);
    for (id, region) in regions {
        drop(region.rr);
        for f in region.pages.values() {
            m.unmap(id, *f);
        }
    }
    assert!(m.frames.is_empty());
    let s = m.rmap.snapshot();
    assert_eq!(s.avcs_allocated, s.avcs_freed, "invariant 8");
    assert_eq!(s.anon_vmas_allocated, s.anon_vmas_freed, "invariant 8");
}

fn config() -> impl Strategy<Value = RmapConfig> {
    (
        prop_oneof![Just(Design::Chain), Just(Design::Flat)],
        prop_oneof![Just(CloneLocking::Batched), Just(CloneLocking::PerEntry)],
        any::<bool>(),
    )
        .prop_map(|(design, clone_locking, reuse_anon_vmas)| RmapConfig {
            design,
            clone_locking,
            reuse_anon_vmas,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn walks_never_miss_a_mapping(config in config(), ops in prop::collection::vec(op(), 1..80)) {
        run(config, &ops);
    }
}

/// A long fork-exit-COW history in both designs, so that reuse and deep chains are
/// exercised beyond what short random sequences reach.
#[test]
fn long_generational_history_keeps_every_invariant() {
    for design in [Design::Chain, Design::Flat] {
        for reuse_anon_vmas in [true, false] {
            let mut ops = vec![Op::Create { start: 0, len: 8 }];
            for g in 0..60usize {
                ops.push(Op::Touch {
                    r: g,
                    page: g as u64,
                });
                ops.push(Op::Fork { r: g });
                ops.push(Op::Fork { r: g + 1 });
                ops.push(Op::Touch { r: g + 2, page: 3 });
                ops.push(Op::Exit { r: g * 7 });
            }
            let config = RmapConfig {
                design,
                clone_locking: CloneLocking::Batched,
                reuse_anon_vmas,
            };
            run(config, &ops);
        }
    }
}

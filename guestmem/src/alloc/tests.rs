//! Unit tests of the allocators (the loom models stay in `alloc.rs`).

use super::*;
use std::collections::HashSet;

fn drain_all(a: &Allocator, cpu: usize) -> Vec<u32> {
    std::iter::from_fn(|| a.alloc(0, cpu)).collect()
}

#[test]
fn every_design_hands_out_each_frame_once_then_reports_exhaustion() {
    for kind in AllocatorKind::ALL {
        let a = Allocator::new(kind, 1000, 2);
        let got = drain_all(&a, 0);
        let set: HashSet<u32> = got.iter().copied().collect();
        assert_eq!(got.len(), 1000, "{kind:?}");
        assert_eq!(set.len(), 1000, "{kind:?}: a frame was handed out twice");
        assert_eq!(a.free_frames(), 0, "{kind:?}");
    }
}

#[test]
fn frames_cached_on_another_cpu_are_drained_before_exhaustion() {
    for kind in AllocatorKind::ALL {
        let a = Allocator::new(kind, 256, 2);
        let got = drain_all(&a, 0);
        // Free everything on CPU 1's slot, then allocate all from CPU 0.
        for f in &got {
            a.free(*f, 0, 1);
        }
        assert_eq!(a.free_frames(), 256, "{kind:?}");
        assert_eq!(drain_all(&a, 0).len(), 256, "{kind:?}");
    }
}

#[test]
fn free_batch_returns_every_frame_and_zone_merges_back() {
    for kind in AllocatorKind::ALL {
        let a = Allocator::new(kind, 4096, 2);
        let got = drain_all(&a, 1);
        a.free_batch(&got);
        assert_eq!(a.free_frames(), 4096, "{kind:?}");
        a.drain();
        assert_eq!(a.zone_free_blocks().len(), 8, "{kind:?}: 8 blocks of 512");
    }
}

#[test]
fn free_batch_takes_one_zone_lock_per_batch_for_the_lock_designs() {
    let a = Allocator::new(AllocatorKind::GlobalLock, 4096, 1);
    let got = drain_all(&a, 0);
    let before = a.zone_acquisitions();
    a.free_batch(&got);
    assert_eq!(a.zone_acquisitions() - before, 4096 / MAG_SIZE as u64);
}

#[test]
fn high_order_runs_are_aligned_and_disjoint_from_order_zero() {
    for kind in AllocatorKind::ALL {
        let a = Allocator::new(kind, 2048, 2);
        let run = a.alloc(9, 0).unwrap();
        assert_eq!(run % 512, 0);
        let singles = drain_all(&a, 0);
        assert_eq!(singles.len(), 2048 - 512, "{kind:?}");
        assert!(
            singles.iter().all(|&f| f < run || f >= run + 512),
            "{kind:?}"
        );
        a.free(run, 9, 0);
        assert_eq!(a.free_frames(), 512);
    }
}

#[test]
fn magazine_depot_absorbs_frees_without_the_zone() {
    let a = Allocator::new(AllocatorKind::Magazine, 1 << 16, 1);
    let got: Vec<u32> = (0..1024).map(|_| a.alloc(0, 0).unwrap()).collect();
    for f in &got {
        a.free(*f, 0, 0);
    }
    let before = a.zone_acquisitions();
    let again: Vec<u32> = (0..1024).map(|_| a.alloc(0, 0).unwrap()).collect();
    assert_eq!(
        a.zone_acquisitions(),
        before,
        "reuse came from magazines and depot"
    );
    let (x, y): (HashSet<u32>, HashSet<u32>) =
        (got.into_iter().collect(), again.into_iter().collect());
    assert_eq!(x, y);
}

#[test]
fn magazine_steals_another_slot_when_the_preferred_one_is_busy() {
    let a = Allocator::new(AllocatorKind::Magazine, 1024, 2);
    let Design::Magazine(m) = &a.design else {
        panic!("built a magazine allocator");
    };
    let busy = m.slots[0].0.lock();
    let f = a.alloc(0, 0).expect("a frame from slot 1");
    drop(busy);
    assert_eq!(m.slots[0].0.lock().loaded.n, 0, "slot 0 untouched");
    assert_eq!(
        m.slots[1].0.lock().loaded.n,
        MAG_SIZE - 1,
        "slot 1 refilled"
    );
    a.free(f, 0, 0);
    assert_eq!(
        m.slots[0].0.lock().loaded.n,
        1,
        "freed into the free slot 0"
    );
    assert_eq!(a.free_frames(), 1024);
}

#[test]
fn a_multi_frame_request_drains_a_full_depot_but_not_a_nearly_empty_one() {
    // 2048 frames, 16 CPUs: the depot keeps up to 32 full magazines, the whole zone.
    let a = Allocator::new(AllocatorKind::Magazine, 2048, 16);
    let all: Vec<u32> = (0..2048).map(|_| a.alloc(0, 0).expect("a frame")).collect();
    a.free_batch(&all);
    // Every free frame is in the depot: without the drain no 64-frame block exists.
    let run = a.alloc(6, 0).expect("the depot drained into the zone");
    a.free(run, 6, 0);
    // A depot with fewer than DEPOT_DRAIN_MIN magazines is left alone.
    let all: Vec<u32> = (0..2048).map(|_| a.alloc(0, 0).expect("a frame")).collect();
    let few = (DEPOT_DRAIN_MIN - 1) * MAG_SIZE;
    a.free_batch(&all[..few]);
    assert!(a.alloc(6, 0).is_none(), "no drain for a few magazines");
    a.free_batch(&all[few..]);
    assert_eq!(a.free_frames(), 2048);
}

/// Threads that all claim the same CPUs, so that slots are contended, stolen and
/// drained all the time (the pool-level stress test in `tests/alloc_stress.rs` runs
/// each thread on its real CPU, where slots rarely collide).
#[test]
fn colliding_cpu_hints_never_hand_a_frame_to_two_owners() {
    use std::sync::atomic::{AtomicBool, Ordering::AcqRel};
    const FRAMES: u32 = 1024;
    for kind in AllocatorKind::ALL {
        let a = Allocator::new(kind, FRAMES, 2);
        let owned: Vec<AtomicBool> = (0..FRAMES).map(|_| AtomicBool::new(false)).collect();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (a, owned) = (&a, &owned);
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000usize {
                        let cpu = (i >> 3 ^ t) & 1;
                        if held.len() < 200 && (i * 7 + t) % 5 < 3 {
                            if let Some(f) = a.alloc(0, cpu) {
                                assert!(
                                    !owned[f as usize].swap(true, AcqRel),
                                    "{kind:?}: {f} twice"
                                );
                                held.push(f);
                            }
                        } else if let Some(f) = held.pop() {
                            assert!(owned[f as usize].swap(false, AcqRel));
                            a.free(f, 0, cpu);
                        }
                    }
                    for f in held {
                        assert!(owned[f as usize].swap(false, AcqRel));
                        a.free(f, 0, t & 1);
                    }
                });
            }
        });
        assert_eq!(a.free_frames(), u64::from(FRAMES), "{kind:?}");
    }
}

#[test]
fn kind_names_round_trip() {
    for k in AllocatorKind::ALL {
        assert_eq!(k.name().parse::<AllocatorKind>(), Ok(k));
    }
    assert!("buddy".parse::<AllocatorKind>().is_err());
}

//! Reclaim's referenced check (`Manager::frame_referenced`) over real fork trees, in both
//! reverse-map designs and both locking modes: trees whose children copied the block
//! (each sharer has its own young bit) and trees whose blocks stay shared after the fork
//! (one entry, and one young bit, for every sharer). For a shared block the check must
//! still clear what it reports, and an access through the block must be seen by the
//! next check: the block keeps those young states in bitmaps beside its read-only
//! entries.

use std::sync::Arc;

use guestmem::mmu::NoopMmu;
use guestmem::{
    AllocatorKind, Gfn, Gpa, Manager, ManagerConfig, Order, PAGE_SIZE, Pool, PoolConfig,
    ReferencedLocking, RegionSpec,
};

fn manager(design: rmap::Design) -> Arc<Manager> {
    let pool =
        Arc::new(Pool::new(&PoolConfig::uniform(8 << 20, 1, AllocatorKind::Magazine)).unwrap());
    Manager::new(
        pool,
        ManagerConfig {
            fault_around: Order::ZERO,
            cow_around: Order::ZERO,
            cow_run: guestmem::CowRun::default(),
            rmap: rmap::RmapConfig {
                design,
                ..Default::default()
            },
        },
    )
}

const RAM: [RegionSpec; 1] = [RegionSpec {
    start: Gfn(0),
    pages: 16,
}];

#[test]
fn walks_find_every_mapper_and_chain_examines_only_the_owner_of_a_cow_copy() {
    for design in [rmap::Design::Chain, rmap::Design::Flat] {
        let mm = manager(design);
        let parent = mm.create(&RAM, Arc::new(NoopMmu)).unwrap();
        parent.write(Gpa(0), &[1; 2 * PAGE_SIZE]).unwrap();
        let children: Vec<_> = (0..5)
            .map(|_| parent.fork(Arc::new(NoopMmu)).unwrap())
            .collect();
        // Page 0 stays shared by all six; every child copies page 1, and with it the
        // block: each mapping of page 0 has its own young bit (see the shared-block tests).
        for c in &children {
            c.write(Gpa(PAGE_SIZE as u64), &[2; 8]).unwrap();
        }
        let shared = parent.pte(Gfn(0)).unwrap().pfn().unwrap();
        let r = mm.frame_referenced(shared, ReferencedLocking::Blocking);
        assert_eq!(
            r.referenced, 6,
            "{design:?}: every mapping of the shared page was young"
        );
        assert!(!r.contended);
        let again = mm.frame_referenced(shared, ReferencedLocking::Trylock);
        assert_eq!(again.referenced, 0, "{design:?}: young bits were cleared");

        let copy = children[4].pte(Gfn(1)).unwrap().pfn().unwrap();
        let r = mm.frame_referenced(copy, ReferencedLocking::Trylock);
        assert_eq!(r.referenced, 1, "{design:?}");
        match design {
            rmap::Design::Chain => assert_eq!(r.examined, 1, "chain: only the owner"),
            rmap::Design::Flat => assert_eq!(r.examined, 6, "flat: the whole fork tree"),
        }
        drop(children);
        drop(parent);
        assert_eq!(mm.pool().free_frames(), mm.pool().total_frames());
    }
}

#[test]
fn trylock_reports_contention_instead_of_waiting() {
    let mm = manager(rmap::Design::Chain);
    let vm = mm.create(&RAM, Arc::new(NoopMmu)).unwrap();
    vm.write(Gpa(0), &[1; 8]).unwrap();
    let pfn = vm.pte(Gfn(0)).unwrap().pfn().unwrap();
    // Hold the frame lock as swap-out or migration would.
    assert!(mm.pool().frame(pfn).try_lock());
    let r = mm.frame_referenced(pfn, ReferencedLocking::Trylock);
    assert!(r.contended && r.is_referenced() && r.examined == 0);
    mm.pool().frame(pfn).unlock();
    let r = mm.frame_referenced(pfn, ReferencedLocking::Trylock);
    assert_eq!((r.referenced, r.contended), (1, false));
}

/// A parent with one written page, forked into five children that never write: every
/// block stays shared by all six.
fn shared_tree(design: rmap::Design) -> (Arc<Manager>, Vec<Arc<guestmem::AddressSpace>>) {
    let mm = manager(design);
    let parent = mm.create(&RAM, Arc::new(NoopMmu)).unwrap();
    parent.write(Gpa(0), &[1; 8]).unwrap();
    let mut vms = vec![parent];
    for _ in 0..5 {
        let child = vms[0].fork(Arc::new(NoopMmu)).unwrap();
        vms.push(child);
    }
    for vm in &vms {
        let e = vm.entry(Gfn(0)).unwrap();
        assert_eq!(e.sharers, 6, "{design:?}: the block is still shared by all");
    }
    (mm, vms)
}

#[test]
fn a_frame_in_a_block_still_shared_after_fork_is_walked_for_every_sharer() {
    for design in [rmap::Design::Chain, rmap::Design::Flat] {
        for locking in [ReferencedLocking::Blocking, ReferencedLocking::Trylock] {
            let (mm, vms) = shared_tree(design);
            // Children only read: nothing is copied.
            for c in &vms[1..] {
                let mut b = [0u8; 8];
                c.read(Gpa(0), &mut b).unwrap();
                assert_eq!(b, [1; 8]);
            }
            let pfn = vms[0].pte(Gfn(0)).unwrap().pfn().unwrap();
            for vm in &vms {
                let e = vm.entry(Gfn(0)).unwrap();
                assert_eq!(
                    (e.pte.pfn(), e.sharers),
                    (Some(pfn), 6),
                    "{design:?}: reads leave the block shared"
                );
            }
            let r = mm.frame_referenced(pfn, locking);
            assert!(!r.contended, "{design:?} {locking:?}");
            assert_eq!(
                r.examined, 6,
                "{design:?} {locking:?}: every sharer is walked"
            );
            // One entry, in one block six VMs share: it counts once, and the check
            // clears it for all of them (see the next test).
            assert_eq!(
                r.referenced, 1,
                "{design:?} {locking:?}: the shared young entry counts once"
            );
            assert!(!mm.frame_referenced(pfn, locking).is_referenced());
            assert_eq!(mm.mappers(pfn), 6);
            drop(vms);
            assert_eq!(mm.pool().free_frames(), mm.pool().total_frames());
        }
    }
}

#[test]
fn young_bits_in_a_block_still_shared_after_fork_are_cleared_by_the_check() {
    for design in [rmap::Design::Chain, rmap::Design::Flat] {
        let (mm, vms) = shared_tree(design);
        let pfn = vms[0].pte(Gfn(0)).unwrap().pfn().unwrap();
        let first = mm.frame_referenced(pfn, ReferencedLocking::Blocking);
        assert!(first.is_referenced(), "{design:?}: written before the fork");
        // Nobody touches the page in between.
        let again = mm.frame_referenced(pfn, ReferencedLocking::Blocking);
        assert_eq!(
            again.referenced, 0,
            "{design:?}: the young bits of a shared block were not cleared"
        );
        for vm in &vms {
            assert!(
                !vm.pte(Gfn(0)).unwrap().is_young(),
                "{design:?}: {:?} still sees its entry young",
                vm.id()
            );
        }
    }
}

#[test]
fn a_read_through_a_shared_block_after_the_check_is_seen_by_the_next_check() {
    for design in [rmap::Design::Chain, rmap::Design::Flat] {
        let mm = manager(design);
        let parent = mm.create(&RAM, Arc::new(NoopMmu)).unwrap();
        parent.write(Gpa(0), &[1; 8]).unwrap();
        let pfn = parent.pte(Gfn(0)).unwrap().pfn().unwrap();
        // The block is the parent's alone: the check clears the bit.
        assert_eq!(
            mm.frame_referenced(pfn, ReferencedLocking::Blocking)
                .referenced,
            1
        );
        assert_eq!(
            mm.frame_referenced(pfn, ReferencedLocking::Blocking)
                .referenced,
            0
        );
        let children: Vec<_> = (0..5)
            .map(|_| parent.fork(Arc::new(NoopMmu)).unwrap())
            .collect();
        assert!(
            !mm.frame_referenced(pfn, ReferencedLocking::Blocking)
                .is_referenced(),
            "{design:?}: nobody touched the page since the last check"
        );
        let mut b = [0u8; 8];
        children[2].read(Gpa(0), &mut b).unwrap();
        assert_eq!(b, [1; 8]);
        assert_eq!(
            children[2].entry(Gfn(0)).unwrap().sharers,
            6,
            "still shared"
        );
        let r = mm.frame_referenced(pfn, ReferencedLocking::Blocking);
        assert!(
            r.is_referenced(),
            "{design:?}: a child's read through the shared block was invisible: {r:?}"
        );
    }
}

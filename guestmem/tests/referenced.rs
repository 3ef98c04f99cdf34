//! Reclaim's referenced check (`Manager::frame_referenced`) over real fork trees, in both
//! reverse-map designs and both locking modes.

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
        // Page 0 stays shared by all six; every child copies page 1.
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

//! Migration of guest pages between nodes (issue 11): every byte survives, frames shared
//! by clones move once, the target node's limits are respected, and migration runs
//! beside fork, copy-on-write, exit, reclaim and writes without losing anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use guestmem::mmu::NoopMmu;
use guestmem::reclaim::ReclaimConfig;
use guestmem::reclaim::swap::{SwapConfig, SwapDevice};
use guestmem::{
    AddressSpace, AllocatorKind, Gfn, Gpa, Manager, ManagerConfig, MigrateWalk, NodeId, PAGE_SIZE,
    Pool, PoolConfig, RegionSpec,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const WALKS: [MigrateWalk; 3] = [
    MigrateWalk::Exclusive,
    MigrateWalk::Shared,
    MigrateWalk::Unlocked,
];

fn manager(frames_per_node: &[u64]) -> Arc<Manager> {
    let pool = Pool::new(&PoolConfig {
        nodes: frames_per_node
            .iter()
            .map(|&frames| guestmem::NodeConfig {
                frames,
                host_node: None,
            })
            .collect(),
        allocator: AllocatorKind::Magazine,
    })
    .unwrap();
    Manager::new(Arc::new(pool), ManagerConfig::default())
}

fn ram(pages: u64) -> [RegionSpec; 1] {
    [RegionSpec {
        start: Gfn(0),
        pages,
    }]
}

fn word(seed: u64, page: u64) -> u64 {
    (seed << 32 | page).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Writes page `p`'s first and last words for `seed`.
fn put(vm: &AddressSpace, p: u64, seed: u64) {
    let w = word(seed, p).to_le_bytes();
    vm.write(Gpa(p * PAGE_SIZE as u64), &w).unwrap();
    vm.write(Gpa(p * PAGE_SIZE as u64 + PAGE_SIZE as u64 - 8), &w)
        .unwrap();
}

/// What page `p` holds: its first and last words (0 if never written).
fn get(vm: &AddressSpace, p: u64) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    if let Err(e) = vm.read(Gpa(p * PAGE_SIZE as u64), &mut a) {
        panic!("{e}: {:?}", vm.entry(Gfn(p)));
    }
    vm.read(Gpa(p * PAGE_SIZE as u64 + PAGE_SIZE as u64 - 8), &mut b)
        .unwrap();
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

fn node_of(mm: &Manager, vm: &AddressSpace, p: u64) -> Option<NodeId> {
    let e = vm.entry(Gfn(p)).unwrap();
    e.pte.pfn().map(|pfn| mm.pool().node_of(pfn).id())
}

fn assert_all_returned(mm: &Manager) {
    assert_eq!(
        mm.pool().free_frames(),
        mm.pool().total_frames(),
        "every frame back in the pool"
    );
}

#[test]
fn a_vm_moves_to_another_node_and_back_with_every_byte() {
    for walk in WALKS {
        let mm = manager(&[2048, 2048]);
        let vm = mm.create(&ram(1024), Arc::new(NoopMmu)).unwrap();
        for p in 0..1024 {
            put(&vm, p, 1);
        }
        assert!((0..1024).all(|p| node_of(&mm, &vm, p) == Some(NodeId(0))));
        for (to, round) in [(NodeId(1), 0), (NodeId(0), 1), (NodeId(1), 2)] {
            let st = vm.migrate(Gfn(0)..Gfn(1024), to, walk).unwrap();
            assert_eq!(st.pages, 1024, "{walk:?} round {round}: {st:?}");
            assert_eq!(st.busy + st.no_memory + st.failed, 0, "{st:?}");
            // Two naturally aligned runs of 512: one host unmap each (the view maps).
            assert_eq!(st.runs, 2, "{st:?}");
            assert!(st.host_unmaps <= st.runs, "{st:?}");
            for p in 0..1024 {
                assert_eq!(node_of(&mm, &vm, p), Some(to), "{walk:?} page {p}");
                assert_eq!(get(&vm, p), (word(1, p), word(1, p)), "page {p}");
            }
            let again = vm.migrate(Gfn(0)..Gfn(1024), to, walk).unwrap();
            assert_eq!((again.pages, again.already), (0, 1024), "{again:?}");
        }
        // Writable stays writable: rewriting costs no copy-on-write.
        let cows = vm.counters().cow_copies;
        for p in 0..1024 {
            put(&vm, p, 2);
        }
        assert_eq!(vm.counters().cow_copies, cows, "entries came back writable");
        assert_eq!(mm.pool().node(NodeId(0)).free_frames(), 2048);
        vm.exit();
        assert_all_returned(&mm);
    }
}

#[test]
fn a_frame_shared_by_clones_moves_once_and_every_clone_maps_the_new_one() {
    for walk in WALKS {
        let mm = manager(&[4096, 4096]);
        let parent = mm.create(&ram(512), Arc::new(NoopMmu)).unwrap();
        for p in 0..512 {
            put(&parent, p, 3);
        }
        let clones: Vec<_> = (0..4)
            .map(|_| parent.fork(Arc::new(NoopMmu)).unwrap())
            .collect();
        // One clone rewrites half its pages: those are its own now.
        for p in 0..256 {
            put(&clones[0], p, 4);
        }
        let used0 = mm.pool().total_frames() - mm.pool().free_frames();
        let st = parent.migrate(Gfn(0)..Gfn(512), NodeId(1), walk).unwrap();
        assert_eq!(st.pages, 512, "{walk:?} {st:?}");
        let used1 = mm.pool().total_frames() - mm.pool().free_frames();
        assert_eq!(used0, used1, "moved, not copied: {used0} -> {used1}");
        for (k, c) in clones.iter().enumerate() {
            for p in 0..512 {
                let own = k == 0 && p < 256;
                let want = if own { word(4, p) } else { word(3, p) };
                assert_eq!(get(c, p), (want, want), "clone {k} page {p}");
                let node = node_of(&mm, c, p);
                // A clone's own copies stay where they were; shared pages followed.
                assert_eq!(
                    node,
                    Some(if own { NodeId(0) } else { NodeId(1) }),
                    "clone {k} page {p}"
                );
            }
        }
        for p in 0..512 {
            assert_eq!(get(&parent, p), (word(3, p), word(3, p)));
        }
        // The clones still share with the parent: a write copies.
        put(&clones[1], 7, 9);
        assert_eq!(get(&parent, 7), (word(3, 7), word(3, 7)));
        for c in clones {
            c.exit();
        }
        parent.exit();
        assert_all_returned(&mm);
    }
}

#[test]
fn a_full_target_node_fails_the_move_and_the_pages_stay() {
    let mm = manager(&[2048, 64]);
    let vm = mm.create(&ram(1024), Arc::new(NoopMmu)).unwrap();
    for p in 0..1024 {
        put(&vm, p, 5);
    }
    let st = vm
        .migrate(Gfn(0)..Gfn(1024), NodeId(1), MigrateWalk::Shared)
        .unwrap();
    assert_eq!(st.pages, 0, "{st:?}");
    assert_eq!(st.no_memory, 1024, "{st:?}");
    for p in 0..1024 {
        assert_eq!(node_of(&mm, &vm, p), Some(NodeId(0)));
        assert_eq!(get(&vm, p), (word(5, p), word(5, p)));
    }
    // A range that fits moves.
    let st = vm
        .migrate(Gfn(0)..Gfn(64), NodeId(1), MigrateWalk::Shared)
        .unwrap();
    assert_eq!(st.pages, 64, "{st:?}");
    let err = vm
        .migrate(Gfn(0)..Gfn(64), NodeId(2), MigrateWalk::Shared)
        .unwrap_err();
    assert!(err.to_string().contains("2 node(s)"), "{err}");
    vm.exit();
    assert_all_returned(&mm);
}

/// One worker: VMs created, forked, written and read at random against a model, and
/// exited, while other threads migrate and reclaim.
fn worker(
    mm: &Arc<Manager>,
    seed: u64,
    pages: u64,
    vms_out: &std::sync::Mutex<Vec<Arc<AddressSpace>>>,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut vms: Vec<(Arc<AddressSpace>, HashMap<u64, u64>)> = Vec::new();
    let first = mm.create(&ram(pages), Arc::new(NoopMmu)).unwrap();
    vms_out.lock().unwrap().push(Arc::clone(&first));
    vms.push((first, HashMap::new()));
    for _ in 0..600 {
        let k = rng.random_range(0..vms.len());
        match rng.random_range(0..10) {
            0 if vms.len() < 5 => {
                let child = vms[k].0.fork(Arc::new(NoopMmu)).unwrap();
                let model = vms[k].1.clone();
                vms_out.lock().unwrap().push(Arc::clone(&child));
                vms.push((child, model));
            }
            1 if vms.len() > 1 => {
                let (vm, model) = vms.swap_remove(k);
                for (&p, &s) in &model {
                    assert_eq!(
                        get(&vm, p),
                        (word(s, p), word(s, p)),
                        "page {p} before exit"
                    );
                }
                vm.exit();
            }
            2..=5 => {
                let p = rng.random_range(0..pages);
                let s = rng.random_range(1..1000);
                put(&vms[k].0, p, s);
                vms[k].1.insert(p, s);
            }
            _ => {
                let p = rng.random_range(0..pages);
                let want = vms[k]
                    .1
                    .get(&p)
                    .map_or((0, 0), |&s| (word(s, p), word(s, p)));
                assert_eq!(get(&vms[k].0, p), want, "page {p}");
            }
        }
    }
    for (vm, model) in vms {
        for (&p, &s) in &model {
            assert_eq!(get(&vm, p), (word(s, p), word(s, p)), "page {p} at the end");
        }
        vm.exit();
    }
}

#[test]
fn migration_beside_fork_cow_reclaim_writes_and_exits_loses_nothing() {
    const PAGES: u64 = 256;
    for walk in WALKS {
        let mm = manager(&[768, 768]);
        let dev = SwapDevice::create(&SwapConfig {
            slots: 16384,
            ..Default::default()
        })
        .unwrap();
        mm.attach_swap(dev, ReclaimConfig::for_pool(1536)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(std::sync::Mutex::new(Vec::<Arc<AddressSpace>>::new()));
        let migrator = {
            let (mm, stop, live) = (Arc::clone(&mm), Arc::clone(&stop), Arc::clone(&live));
            std::thread::spawn(move || {
                let mut node = 1u16;
                while !stop.load(Ordering::Relaxed) {
                    let vms: Vec<_> = live.lock().unwrap().clone();
                    for vm in vms {
                        // An exited VM says so; that is not a failure.
                        let _ = vm.migrate(Gfn(0)..Gfn(PAGES), NodeId(node), walk);
                    }
                    node ^= 1;
                    let _ = &mm;
                    std::thread::yield_now();
                }
            })
        };
        let reclaimer = {
            let (mm, stop) = (Arc::clone(&mm), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    mm.shrink_node(0, 32, None);
                    mm.shrink_node(1, 32, None);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        // Rounds until migration, swap-out and swap-in all ran beside the workers (on a
        // busy machine one round may pass before a thread runs at all).
        for round in 0..50u64 {
            let workers: Vec<_> = (0..2)
                .map(|t| {
                    let (mm, live) = (Arc::clone(&mm), Arc::clone(&live));
                    std::thread::spawn(move || worker(&mm, round << 8 | t, PAGES, &live))
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            live.lock().unwrap().clear();
            let r = mm.reclaim_stats();
            if mm.migrate_stats().pages > 5000 && r.written > 0 && r.major_faults > 0 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        migrator.join().unwrap();
        reclaimer.join().unwrap();
        let st = mm.migrate_stats();
        let r = mm.reclaim_stats();
        assert!(st.pages > 5000, "{walk:?}: migration ran: {st:?}");
        assert!(
            r.written > 0 && r.major_faults > 0,
            "{walk:?}: reclaim ran: {r:?}"
        );
        assert_eq!(mm.swap_cache_frames(), 0, "swap cache empty");
        assert_all_returned(&mm);
    }
}

/// Pages of `vm`'s `0 .. pages` on each of two nodes.
fn placement(mm: &Manager, vm: &AddressSpace, pages: u64) -> [u64; 2] {
    let mut n = [0; 2];
    for p in 0..pages {
        if let Some(node) = node_of(mm, vm, p) {
            n[usize::from(node.0)] += 1;
        }
    }
    n
}

#[test]
fn allocation_follows_the_vms_node_policy() {
    use guestmem::NodePolicy;
    let mm = manager(&[1024, 1024]);
    // First touch: the faulting thread's home node.
    let vm = mm.create(&ram(512), Arc::new(NoopMmu)).unwrap();
    assert_eq!(vm.policy(), NodePolicy::FirstTouch);
    std::thread::scope(|s| {
        s.spawn(|| {
            guestmem::set_home_node(NodeId(1));
            for p in 0..256 {
                put(&vm, p, 1);
            }
        });
    });
    for p in 256..512 {
        put(&vm, p, 1);
    }
    assert_eq!(placement(&mm, &vm, 512), [256, 256], "home node 1, then 0");
    // Forks inherit the policy.
    vm.set_policy(NodePolicy::Bind(NodeId(1))).unwrap();
    let child = vm.fork(Arc::new(NoopMmu)).unwrap();
    assert_eq!(child.policy(), NodePolicy::Bind(NodeId(1)));
    child.exit();
    vm.exit();

    // Preferred: node 1 until it is full, then node 0.
    let vm = mm.create(&ram(1536), Arc::new(NoopMmu)).unwrap();
    vm.set_policy(NodePolicy::Preferred(NodeId(1))).unwrap();
    for p in 0..1536 {
        put(&vm, p, 2);
    }
    assert_eq!(placement(&mm, &vm, 1536), [512, 1024]);
    vm.exit();

    // Bind: node 1 only; a full node 1 fails the VM although node 0 has room.
    let vm = mm.create(&ram(1536), Arc::new(NoopMmu)).unwrap();
    vm.set_policy(NodePolicy::Bind(NodeId(1))).unwrap();
    let mut failed = None;
    for p in 0..1536 {
        let w = 1u64.to_le_bytes();
        if let Err(e) = vm.write(Gpa(p * PAGE_SIZE as u64), &w) {
            failed = Some((p, e));
            break;
        }
    }
    let (at, e) = failed.expect("node 1 runs out");
    assert_eq!(at, 1024, "{e}");
    assert_eq!(placement(&mm, &vm, 1024), [0, 1024]);
    assert_eq!(mm.pool().node(NodeId(0)).free_frames(), 1024);
    vm.exit();

    // Interleave: both nodes, in turn.
    let vm = mm.create(&ram(1024), Arc::new(NoopMmu)).unwrap();
    vm.set_policy(NodePolicy::Interleave).unwrap();
    for p in 0..1024 {
        put(&vm, p, 3);
    }
    let [a, b] = placement(&mm, &vm, 1024);
    assert!(a >= 256 && b >= 256, "{a} / {b}");
    for p in 0..1024 {
        assert_eq!(get(&vm, p), (word(3, p), word(3, p)));
    }
    let e = vm.set_policy(NodePolicy::Bind(NodeId(5))).unwrap_err();
    assert!(e.to_string().contains("node5 does not exist"), "{e}");
    vm.exit();
    assert_all_returned(&mm);
}

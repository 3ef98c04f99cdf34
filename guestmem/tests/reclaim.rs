//! Reclaim and swap on the manager, driven by software accesses: every byte must survive
//! swap-out and swap-in, a frame shared by clones is written once, same-filled pages are
//! never written, referenced pages stay, and at the end every frame and slot is back.
//!
//! The concurrent model runs a reclaimer thread beside threads that fork, write (COW),
//! read and exit VMs in a pool smaller than what they touch, checking every byte against
//! a reference model.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use guestmem::mmu::NoopMmu;
use guestmem::reclaim::swap::{SwapConfig, SwapDevice, SwapIo};
use guestmem::reclaim::{Punch, ReclaimConfig};
use guestmem::{
    AddressSpace, AllocatorKind, Gfn, Gpa, Manager, ManagerConfig, PAGE_SIZE, Pool, PoolConfig,
    ReferencedLocking, RegionSpec,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn manager(frames: u64, slots: u64, design: rmap::Design) -> Arc<Manager> {
    manager_with(
        frames,
        slots,
        design,
        ReferencedLocking::Trylock,
        SwapIo::default(),
    )
}

fn manager_with(
    frames: u64,
    slots: u64,
    design: rmap::Design,
    locking: ReferencedLocking,
    io: SwapIo,
) -> Arc<Manager> {
    let pool = Arc::new(
        Pool::new(&PoolConfig {
            nodes: vec![guestmem::NodeConfig {
                frames,
                host_node: None,
            }],
            allocator: AllocatorKind::Magazine,
        })
        .unwrap(),
    );
    let mm = Manager::new(
        pool,
        ManagerConfig {
            rmap: rmap::RmapConfig {
                design,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let dev = SwapDevice::create(&SwapConfig {
        slots,
        io,
        ..Default::default()
    })
    .unwrap();
    let mut cfg = ReclaimConfig::for_pool(frames);
    cfg.referenced = locking;
    mm.attach_swap(dev, cfg).unwrap();
    mm
}

fn ram(pages: u64) -> [RegionSpec; 1] {
    [RegionSpec {
        start: Gfn(0),
        pages,
    }]
}

/// The page contents the tests write: a word per 8 bytes from (seed, page).
fn pattern(seed: u64, page: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ page.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut v = Vec::with_capacity(PAGE_SIZE);
    for _ in 0..PAGE_SIZE / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Writes `pattern(seed, p)` to every page `p` of `0 .. pages`.
fn fill(vm: &AddressSpace, pages: u64, seed: u64) {
    for p in 0..pages {
        vm.write(Gpa(p * PAGE_SIZE as u64), &pattern(seed, p))
            .unwrap();
    }
}

/// What page `p` holds after writes with `seed` (`None`: never written, zero).
fn expected(seed: Option<u64>, p: u64) -> Vec<u8> {
    seed.map_or_else(|| vec![0u8; PAGE_SIZE], |s| pattern(s, p))
}

fn read_page(vm: &AddressSpace, page: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    vm.read(Gpa(page * PAGE_SIZE as u64), &mut buf).unwrap();
    buf
}

/// Everything is back: no frame charged or in use, no slot used, nothing cached.
fn assert_all_returned(mm: &Manager) {
    assert_eq!(mm.swap_cache_frames(), 0, "swap cache empty");
    let dev = mm.swap_device().unwrap();
    assert_eq!(dev.stats().used, 0, "every slot freed");
    assert_eq!(
        mm.pool().free_frames(),
        mm.pool().total_frames(),
        "every frame back in the pool"
    );
    assert_eq!(mm.lru_sizes(), (0, 0), "LRU lists empty");
}

#[test]
fn a_vm_touching_four_times_its_pool_keeps_every_byte() {
    let mm = manager(256, 4096, rmap::Design::Chain);
    let vm = mm.create(&ram(1024), Arc::new(NoopMmu)).unwrap();
    fill(&vm, 1024, 1);
    for p in 0..1024 {
        assert!(read_page(&vm, p) == pattern(1, p), "page {p}");
    }
    let st = mm.reclaim_stats();
    assert!(st.written >= 768, "most pages went to swap: {st:?}");
    assert!(st.major_faults > 0 && st.direct_runs > 0, "{st:?}");
    assert!(vm.counters().major_faults > 0);
    assert!(vm.memory().swapped > 0);
    vm.exit();
    assert_all_returned(&mm);
}

#[test]
fn a_frame_shared_by_clones_is_written_once_and_read_back_once() {
    for design in [rmap::Design::Chain, rmap::Design::Flat] {
        let mm = manager(1024, 1024, design);
        let parent = mm.create(&ram(64), Arc::new(NoopMmu)).unwrap();
        for p in 0..64 {
            parent
                .write(Gpa(p * PAGE_SIZE as u64), &pattern(2, p))
                .unwrap();
        }
        let clones: Vec<_> = (0..8)
            .map(|_| parent.fork(Arc::new(NoopMmu)).unwrap())
            .collect();
        // Some clones copy their block (by writing one page elsewhere), some keep sharing
        // the parent's: both kinds of mapping must be found and replaced.
        for c in clones.iter().step_by(2) {
            c.write(Gpa(63 * PAGE_SIZE as u64), &pattern(2, 63))
                .unwrap();
        }
        let res = mm.shrink_node(0, u64::MAX, None);
        // Two passes: the first finds them young (just written) and activates them.
        let res2 = mm.shrink_node(0, u64::MAX, None);
        assert!(res.reclaimed + res2.reclaimed >= 63, "{res:?} {res2:?}");
        let st = mm.reclaim_stats();
        assert_eq!(
            st.written + st.filled,
            st.reclaimed,
            "one write per frame, however many VMs map it: {st:?}"
        );
        for c in &clones {
            assert!(c.memory().swapped >= 63, "{:?}", c.memory());
        }
        let before = mm.reclaim_stats().major_faults;
        for vm in std::iter::once(&parent).chain(&clones) {
            for p in 0..64 {
                assert!(read_page(vm, p) == pattern(2, p), "{design:?} page {p}");
            }
        }
        // 64 frames of the parent's, and the four private copies of page 63.
        let reads = mm.reclaim_stats().major_faults - before;
        assert_eq!(
            reads, 68,
            "each slot read once, the other VMs hit the swap cache"
        );
        drop(clones);
        drop(parent);
        assert_all_returned(&mm);
    }
}

#[test]
fn same_filled_pages_are_stored_as_markers_not_written() {
    let mm = manager(512, 1024, rmap::Design::Chain);
    let vm = mm.create(&ram(128), Arc::new(NoopMmu)).unwrap();
    let fill = 0xabab_cdcd_0101_2323u64.to_le_bytes().repeat(PAGE_SIZE / 8);
    for p in 0..64 {
        vm.write(Gpa(p * PAGE_SIZE as u64), &fill).unwrap();
    }
    for p in 64..128 {
        // Touched, all zero.
        vm.write(Gpa(p * PAGE_SIZE as u64), &[0u8; 8]).unwrap();
    }
    mm.shrink_node(0, u64::MAX, None);
    mm.shrink_node(0, u64::MAX, None);
    let st = mm.reclaim_stats();
    assert_eq!(st.written, 0, "{st:?}");
    assert_eq!(st.filled, 128, "{st:?}");
    assert_eq!(mm.swap_device().unwrap().stats().bytes_written, 0);
    for p in 0..64 {
        assert!(read_page(&vm, p) == fill);
    }
    for p in 64..128 {
        assert!(read_page(&vm, p) == vec![0u8; PAGE_SIZE]);
    }
    drop(vm);
    assert_all_returned(&mm);
}

#[test]
fn referenced_pages_stay_and_cold_ones_go() {
    for locking in [ReferencedLocking::Trylock, ReferencedLocking::Blocking] {
        let mm = manager_with(1024, 1024, rmap::Design::Chain, locking, SwapIo::default());
        let vm = mm.create(&ram(512), Arc::new(NoopMmu)).unwrap();
        fill(&vm, 512, 3);
        // Age: clear every young bit, as an earlier pass would.
        for p in 0..512 {
            let pfn = vm.pte(Gfn(p)).unwrap().pfn().unwrap();
            mm.frame_referenced(pfn, ReferencedLocking::Blocking);
        }
        for p in 0..64 {
            read_page(&vm, p);
        }
        let res = mm.shrink_node(0, 448, None);
        assert_eq!(res.reclaimed, 448, "{locking:?} {res:?}");
        for p in 0..64 {
            assert!(vm.pte(Gfn(p)).unwrap().is_present(), "hot page {p} stayed");
        }
        assert_eq!(vm.memory().swapped, 448);
        for p in 0..512 {
            assert!(read_page(&vm, p) == pattern(3, p));
        }
        drop(vm);
        assert_all_returned(&mm);
    }
}

#[test]
fn a_write_after_swap_in_takes_the_page_out_of_the_cache() {
    let mm = manager(512, 512, rmap::Design::Chain);
    let vm = mm.create(&ram(64), Arc::new(NoopMmu)).unwrap();
    fill(&vm, 64, 4);
    mm.shrink_node(0, u64::MAX, None);
    mm.shrink_node(0, u64::MAX, None);
    assert_eq!(vm.memory().swapped, 64);
    // Read in, with its readahead run (the 64 entries around it): the slots are kept
    // (the frames are clean).
    assert!(read_page(&vm, 5) == pattern(4, 5));
    assert_eq!(mm.swap_cache_frames(), 64);
    assert_eq!(mm.reclaim_stats().major_faults, 64);
    let used = mm.swap_device().unwrap().stats().used;
    // Write: the frame is this VM's alone, so it is reused and its slot freed, with the
    // rest of its copy-on-write run (pages 6..64, this VM's alone too, made writable in
    // the same fault); pages 0..5 stay cached and clean.
    vm.write(Gpa(5 * PAGE_SIZE as u64), &[7u8; 16]).unwrap();
    assert_eq!(mm.swap_cache_frames(), 5);
    assert_eq!(mm.swap_device().unwrap().stats().used, used - 59);
    let mut want = pattern(4, 5);
    want[..16].copy_from_slice(&[7u8; 16]);
    assert!(read_page(&vm, 5) == want);
    // Reclaiming the clean cached pages again costs no write.
    assert!(read_page(&vm, 6) == pattern(4, 6));
    let written = mm.reclaim_stats().written;
    for _ in 0..3 {
        mm.shrink_node(0, u64::MAX, None);
    }
    let st = mm.reclaim_stats();
    assert_eq!(
        st.written,
        written + 59,
        "only the pages made writable: {st:?}"
    );
    assert!(st.clean_dropped >= 5, "{st:?}");
    assert!(read_page(&vm, 5) == want);
    assert!(read_page(&vm, 6) == pattern(4, 6));
    drop(vm);
    assert_all_returned(&mm);
}

/// The concurrent model: a reclaimer thread shrinks all the time while worker threads
/// fork, write, read and exit their own VM families (each checked against its own model)
/// in a pool a third of what they touch.
#[test]
fn reclaim_beside_fork_cow_reads_and_exits_loses_nothing() {
    const PAGES: u64 = 96;
    for (design, io) in [
        (rmap::Design::Chain, SwapIo::Pwritev),
        (rmap::Design::Flat, SwapIo::Pwritev),
        // Asynchronous writes: a batch is in flight while the next is unmapped.
        (rmap::Design::Chain, SwapIo::IoUring),
    ] {
        let mm = manager_with(384, 8192, design, ReferencedLocking::Trylock, io);
        let stop = Arc::new(AtomicBool::new(false));
        let reclaimer = {
            let mm = Arc::clone(&mm);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    mm.shrink_node(0, 32, None);
                    std::thread::yield_now();
                }
            })
        };
        // Rounds until the reclaimer has swapped pages out and faults have read them
        // back (on a busy machine one round may pass before it runs at all).
        for round in 0..50u64 {
            let workers: Vec<_> = (0..3)
                .map(|t| {
                    let mm = Arc::clone(&mm);
                    std::thread::spawn(move || worker(&mm, round << 8 | t, PAGES))
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            let st = mm.reclaim_stats();
            if st.written > 0 && st.major_faults > 0 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        reclaimer.join().unwrap();
        let st = mm.reclaim_stats();
        assert!(
            st.written > 0 && st.major_faults > 0,
            "{design:?} {io:?} {st:?}"
        );
        assert_all_returned(&mm);
    }
}

fn worker(mm: &Arc<Manager>, seed: u64, pages: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    // Each VM and its model: page -> (seed of its contents, or 0 for never written).
    let mut vms: Vec<(Arc<AddressSpace>, HashMap<u64, u64>)> = Vec::new();
    vms.push((
        mm.create(&ram(pages), Arc::new(NoopMmu)).unwrap(),
        HashMap::new(),
    ));
    for step in 0..1500u64 {
        let i = rng.random_range(0..vms.len());
        match rng.random_range(0..20) {
            0..=9 => {
                let p = rng.random_range(0..pages);
                let s = seed << 32 | step;
                vms[i]
                    .0
                    .write(Gpa(p * PAGE_SIZE as u64), &pattern(s, p))
                    .unwrap();
                vms[i].1.insert(p, s);
            }
            10..=16 => {
                let p = rng.random_range(0..pages);
                let want = expected(vms[i].1.get(&p).copied(), p);
                assert!(
                    read_page(&vms[i].0, p) == want,
                    "vm {i} page {p} step {step}"
                );
            }
            17 | 18 if vms.len() < 4 => {
                let child = vms[i].0.fork(Arc::new(NoopMmu)).unwrap();
                let model = vms[i].1.clone();
                vms.push((child, model));
            }
            _ if vms.len() > 1 => {
                vms.swap_remove(i).0.exit();
            }
            _ => {}
        }
    }
    for (vm, model) in &vms {
        for p in 0..pages {
            let want = expected(model.get(&p).copied(), p);
            assert!(read_page(vm, p) == want, "final check, page {p}");
        }
    }
    for (vm, _) in vms {
        vm.exit();
    }
}

/// One VM four times its pool, a reclaimer thread beside a thread writing and reading
/// whole runs at random (readahead and run installs under concurrent reclaim).
#[test]
fn readahead_and_run_installs_beside_a_reclaimer_keep_every_byte() {
    let mm = manager(1024, 8192, rmap::Design::Chain);
    let vm = mm.create(&ram(4096), Arc::new(NoopMmu)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reclaimer = {
        let mm = Arc::clone(&mm);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                mm.shrink_node(0, 64, None);
            }
        })
    };
    let mut model = vec![0u64; 4096];
    let mut rng = SmallRng::seed_from_u64(11);
    for step in 1..4000u64 {
        let p = rng.random_range(0..4096u64);
        if rng.random_range(0..3) == 0 {
            vm.write(Gpa(p * PAGE_SIZE as u64), &pattern(step, p))
                .unwrap();
            model[p as usize] = step;
        } else {
            let want = expected(Some(model[p as usize]).filter(|&s| s != 0), p);
            assert!(read_page(&vm, p) == want, "page {p} at step {step}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    reclaimer.join().unwrap();
    for p in 0..4096u64 {
        let want = expected(Some(model[p as usize]).filter(|&s| s != 0), p);
        assert!(read_page(&vm, p) == want, "final, page {p}");
    }
    drop(vm);
    assert_all_returned(&mm);
}

#[test]
fn mlocked_pages_are_never_swapped_and_forks_inherit_the_lock() {
    let mm = manager(1024, 1024, rmap::Design::Chain);
    let vm = mm.create(&ram(256), Arc::new(NoopMmu)).unwrap();
    fill(&vm, 256, 5);
    // Locked after the pages are present (the boot region's case) ...
    vm.mlock(Gfn(0)..Gfn(16)).unwrap();
    let child = vm.fork(Arc::new(NoopMmu)).unwrap();
    // ... and the child's own copies of locked pages are locked too.
    child.write(Gpa(3 * PAGE_SIZE as u64), &[9u8; 8]).unwrap();
    for _ in 0..3 {
        mm.shrink_node(0, u64::MAX, None);
    }
    for space in [&vm, &child] {
        for p in 0..16 {
            assert!(
                space.pte(Gfn(p)).unwrap().is_present(),
                "locked page {p} stayed"
            );
        }
        assert_eq!(space.memory().swapped, 240, "every other page went");
    }
    assert!(mm.reclaim_stats().unevictable > 0);
    drop(child);
    drop(vm);
    assert_all_returned(&mm);
}

#[test]
fn a_vm_over_its_frame_limit_reclaims_its_own_pages_and_a_sibling_keeps_its_own() {
    let mm = manager(2048, 4096, rmap::Design::Chain);
    let sibling = mm.create(&ram(256), Arc::new(NoopMmu)).unwrap();
    for p in 0..256 {
        sibling
            .write(Gpa(p * PAGE_SIZE as u64), &pattern(6, p))
            .unwrap();
    }
    let vm = mm.create(&ram(1024), Arc::new(NoopMmu)).unwrap();
    vm.set_limit(Some(128));
    fill(&vm, 1024, 7);
    assert!(vm.charge().usage <= 128, "{:?}", vm.charge());
    assert_eq!(
        sibling.memory().swapped,
        0,
        "the sibling's pages were not taken"
    );
    for p in 0..1024 {
        assert!(read_page(&vm, p) == pattern(7, p), "page {p}");
    }
    for p in 0..256 {
        assert!(read_page(&sibling, p) == pattern(6, p));
    }
    drop(vm);
    drop(sibling);
    assert_all_returned(&mm);
}

/// A host view that keeps what the host would: per page, a hole or the memfd offset it
/// maps, and counts host mappings as the kernel merges them (a run of holes, or of pages
/// at consecutive offsets, is one mapping).
#[derive(Debug)]
struct MappingModel {
    pages: std::sync::Mutex<Vec<Option<u64>>>,
}

impl MappingModel {
    fn new(pages: u64) -> MappingModel {
        MappingModel {
            pages: std::sync::Mutex::new(vec![None; pages as usize]),
        }
    }

    fn mappings(&self) -> u64 {
        let pages = self.pages.lock().unwrap();
        let merges = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => true,
            (Some(x), Some(y)) => y == x + PAGE_SIZE as u64,
            _ => false,
        };
        1 + pages.windows(2).filter(|w| !merges(w[0], w[1])).count() as u64
    }
}

impl guestmem::mmu::HostMmu for MappingModel {
    fn map_run(&self, run: guestmem::mmu::MapRun<'_>) -> Result<(), guestmem::mmu::HostMmuError> {
        let mut pages = self.pages.lock().unwrap();
        for i in 0..run.pages {
            pages[(run.gfn.0 + i) as usize] = Some(run.file_offset + i * PAGE_SIZE as u64);
        }
        Ok(())
    }
    fn unmap_run(&self, gfn: Gfn, n: u64) -> Result<(), guestmem::mmu::HostMmuError> {
        let mut pages = self.pages.lock().unwrap();
        for i in 0..n {
            pages[(gfn.0 + i) as usize] = None;
        }
        Ok(())
    }
    fn protect_run(&self, _: Gfn, _: u64, _: bool) -> Result<(), guestmem::mmu::HostMmuError> {
        Ok(())
    }
}

#[test]
fn reclaiming_every_other_page_does_not_split_host_mappings_per_page() {
    const PAGES: u64 = 4096;
    let mm = manager(2 * PAGES, PAGES, rmap::Design::Chain);
    let view = Arc::new(MappingModel::new(PAGES));
    let vm = mm.create(&ram(PAGES), view.clone()).unwrap();
    fill(&vm, PAGES, 9);
    assert!(
        view.mappings() <= PAGES / 64,
        "fault-around maps runs: {} mappings",
        view.mappings()
    );
    for p in 0..PAGES {
        let pfn = vm.pte(Gfn(p)).unwrap().pfn().unwrap();
        mm.frame_referenced(pfn, ReferencedLocking::Blocking);
    }
    // Every even page is hot (read again before every pass), every odd page cold: the
    // worst case for splitting. No block is idle as a whole, so the frame-by-frame
    // pass does the work.
    let mut reclaimed = 0;
    for _ in 0..64 {
        for p in (0..PAGES).step_by(2) {
            read_page(&vm, p);
        }
        reclaimed += mm.shrink_node(0, 256, None).reclaimed;
        if reclaimed >= PAGES / 2 {
            break;
        }
    }
    assert!(reclaimed >= PAGES / 2, "{:?}", mm.reclaim_stats());
    // One hole per reclaimed page would make a mapping per page; whole spans keep it to
    // at most two per span.
    let bound = 2 * PAGES / guestmem::space::UNMAP_SPAN + 1;
    assert!(
        view.mappings() <= bound,
        "{} host mappings after reclaiming every other page (bound {bound})",
        view.mappings()
    );
    // A call that passes over the lists more than once can age a hot page a second
    // time before it is read again: allow a batch of them.
    let hot_lost = (0..PAGES)
        .step_by(2)
        .filter(|&p| !vm.pte(Gfn(p)).unwrap().is_present())
        .count();
    assert!(hot_lost <= 32, "{hot_lost} hot pages reclaimed");
    for p in 0..PAGES {
        assert!(read_page(&vm, p) == pattern(9, p), "page {p}");
    }
    drop(vm);
    assert_all_returned(&mm);
}

/// Reclaims until `n` of `vm`'s pages are swapped out.
fn swap_out(mm: &Manager, vm: &AddressSpace, n: u64) {
    for _ in 0..8 {
        if vm.memory().swapped >= n {
            return;
        }
        mm.shrink_node(0, n, None);
    }
    panic!("{n} pages swapped out: {:?}", mm.reclaim_stats());
}

#[test]
fn freed_host_memory_goes_back_at_reclaim_or_once_memory_is_idle() {
    let page = PAGE_SIZE as u64;
    for punch in [Punch::OnReclaim, Punch::WhenIdle] {
        let pool = Arc::new(
            Pool::new(&PoolConfig {
                nodes: vec![guestmem::NodeConfig {
                    frames: 4096,
                    host_node: None,
                }],
                allocator: AllocatorKind::Magazine,
            })
            .unwrap(),
        );
        let mm = Manager::new(pool, ManagerConfig::default());
        let dev = SwapDevice::create(&SwapConfig {
            slots: 4096,
            ..Default::default()
        })
        .unwrap();
        let mut cfg = ReclaimConfig::for_pool(4096);
        cfg.punch = punch;
        mm.attach_swap(dev, cfg).unwrap();
        let vm = mm.create(&ram(2048), Arc::new(NoopMmu)).unwrap();
        fill(&vm, 2048, 7);
        let full = mm.pool().resident_bytes().unwrap();
        assert!(full >= 2048 * page, "{punch:?}: {full}");
        swap_out(&mm, &vm, 1024);
        let reclaimed = mm.reclaim_stats().reclaimed;
        let after = mm.pool().resident_bytes().unwrap();
        match punch {
            Punch::OnReclaim => assert!(
                after <= full - reclaimed * page,
                "{punch:?}: reclaim returned its frames' memory ({full} -> {after}, {reclaimed} frames)"
            ),
            Punch::WhenIdle => {
                assert_eq!(
                    after, full,
                    "{punch:?}: reclaim keeps freed memory for reuse"
                );
                // Memory is ample (free frames above the high watermark): the background
                // reclaimer returns what stays free, once per period.
                mm.background_reclaim();
                let idle = mm.pool().resident_bytes().unwrap();
                assert!(
                    idle <= full - (reclaimed - 64) * page,
                    "{punch:?}: idle free memory returned ({full} -> {idle}, {reclaimed} frames)"
                );
                let punched = mm.reclaim_stats().punched;
                mm.background_reclaim();
                assert_eq!(mm.reclaim_stats().punched, punched, "once per period");
            }
        }
        for p in 0..2048 {
            assert!(read_page(&vm, p) == pattern(7, p), "{punch:?}: page {p}");
        }
        vm.exit();
        assert_all_returned(&mm);
    }
}

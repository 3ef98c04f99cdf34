//! The address space keeps its own safety contracts, whoever drives it: a fork
//! write-protects the parent's host view before sharing anything, an exit revokes the
//! host view before freeing any frame (and leaks rather than frees when it cannot), a
//! panic under a page-table lock fails only that VM, and each VM's frame charge, limit
//! and reservation hold against its siblings.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use guestmem::mmu::{HostMmu, HostMmuError, MapRun, NoopMmu};
use guestmem::{
    AddressSpace, AllocatorKind, ChargeError, ChildOptions, Gfn, Gpa, Manager, ManagerConfig,
    PAGE_SIZE, Pool, PoolConfig, RegionSpec, SpaceError,
};

const PAGES: u64 = 2048;

fn manager(frames: u64) -> (Arc<Pool>, Arc<Manager>) {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(
            frames * PAGE_SIZE as u64,
            1,
            AllocatorKind::Magazine,
        ))
        .expect("pool"),
    );
    (
        Arc::clone(&pool),
        Manager::new(pool, ManagerConfig::default()),
    )
}

fn space(mm: &Arc<Manager>, mmu: Arc<dyn HostMmu>) -> Arc<AddressSpace> {
    mm.create(
        &[RegionSpec {
            start: Gfn(0),
            pages: PAGES,
        }],
        mmu,
    )
    .expect("create")
}

fn write_pages(vm: &AddressSpace, first: u64, n: u64, tag: u8) -> Result<(), SpaceError> {
    for g in first..first + n {
        vm.write(Gpa(g * PAGE_SIZE as u64), &[tag; 8])?;
    }
    Ok(())
}

fn read_tag(vm: &AddressSpace, g: u64) -> u8 {
    let mut b = [0u8; 8];
    vm.read(Gpa(g * PAGE_SIZE as u64), &mut b).expect("read");
    b[0]
}

fn io_err(op: &'static str, gfn: Gfn, pages: u64) -> HostMmuError {
    HostMmuError {
        op,
        gfn,
        pages,
        source: std::io::Error::from_raw_os_error(libc::EIO),
    }
}

/// A host view that checks, at each call that matters, what the manager has done so far.
#[derive(Debug, Default)]
struct Probe {
    pool: Mutex<Option<Arc<Pool>>>,
    /// The child's host view, to see whether a fork created the child's tables yet.
    child: Mutex<Option<Arc<dyn HostMmu>>>,
    /// `Arc::strong_count` of the child view when the parent was protected.
    child_refs_at_protect: AtomicUsize,
    /// Free frames in the pool when the view was revoked.
    free_at_revoke: AtomicU64,
    revoked: AtomicBool,
    fail_protect: AtomicBool,
    fail_revoke: AtomicBool,
    /// Panic in map_run at this gfn (u64::MAX: never).
    panic_at: AtomicU64,
}

impl Probe {
    fn new() -> Arc<Probe> {
        let p = Probe::default();
        p.panic_at.store(u64::MAX, Ordering::Relaxed);
        Arc::new(p)
    }
}

impl HostMmu for Probe {
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError> {
        let at = self.panic_at.load(Ordering::Relaxed);
        if (run.gfn.0..run.gfn.0 + run.pages).contains(&at) {
            panic!("injected panic in map_run at {at}");
        }
        Ok(())
    }
    fn unmap_run(&self, _gfn: Gfn, _pages: u64) -> Result<(), HostMmuError> {
        Ok(())
    }
    fn protect_run(&self, _gfn: Gfn, _pages: u64, _w: bool) -> Result<(), HostMmuError> {
        Ok(())
    }
    fn protect_for_fork(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        if let Some(c) = self.child.lock().unwrap().as_ref() {
            self.child_refs_at_protect
                .store(Arc::strong_count(c), Ordering::SeqCst);
        }
        if self.fail_protect.load(Ordering::Relaxed) {
            return Err(io_err("protect_for_fork", gfn, pages));
        }
        Ok(())
    }
    fn revoke(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        if let Some(p) = self.pool.lock().unwrap().as_ref() {
            self.free_at_revoke.store(p.free_frames(), Ordering::SeqCst);
        }
        self.revoked.store(true, Ordering::SeqCst);
        if self.fail_revoke.load(Ordering::Relaxed) {
            return Err(io_err("revoke", gfn, pages));
        }
        Ok(())
    }
}

#[test]
fn fork_protects_the_parents_view_before_it_shares_a_block() {
    let (_pool, mm) = manager(8192);
    let probe = Probe::new();
    let parent = space(&mm, probe.clone());
    write_pages(&parent, 0, 600, 1).unwrap();
    let child_view: Arc<dyn HostMmu> = Arc::new(NoopMmu);
    *probe.child.lock().unwrap() = Some(Arc::clone(&child_view));
    // Held here, in the probe, and by the argument: 3. Every child table made before the
    // protection would hold one more.
    let child = parent.fork(Arc::clone(&child_view)).expect("fork");
    assert_eq!(probe.child_refs_at_protect.load(Ordering::SeqCst), 3);
    assert_eq!(read_tag(&child, 5), 1);
    child.exit();
    // A failed protection shares nothing: a parent that never forked keeps its blocks
    // its own and writable.
    let probe = Probe::new();
    let parent = space(&mm, probe.clone());
    write_pages(&parent, 0, 600, 1).unwrap();
    probe.fail_protect.store(true, Ordering::Relaxed);
    let before = mm.live_charges();
    let e = parent.fork(Arc::new(NoopMmu)).unwrap_err();
    assert!(matches!(e, SpaceError::Host { .. }), "{e}");
    let entry = parent.entry(Gfn(5)).unwrap();
    assert_eq!(entry.sharers, 1, "nothing shared after a failed protect");
    assert!(entry.pte.is_writable());
    assert_eq!(mm.live_charges(), before, "no charge left behind");
}

#[test]
fn exit_revokes_the_host_view_before_it_frees_a_frame() {
    let (pool, mm) = manager(8192);
    let probe = Probe::new();
    *probe.pool.lock().unwrap() = Some(Arc::clone(&pool));
    let vm = space(&mm, probe.clone());
    write_pages(&vm, 0, 700, 7).unwrap();
    let free_before = pool.free_frames();
    vm.exit();
    assert!(probe.revoked.load(Ordering::SeqCst));
    assert_eq!(
        probe.free_at_revoke.load(Ordering::SeqCst),
        free_before,
        "no frame was freed before the view was revoked"
    );
    assert_eq!(pool.free_frames(), pool.total_frames());
    assert_eq!(mm.unclaimed_frames(), pool.total_frames());
}

#[test]
fn an_exit_whose_view_cannot_be_revoked_leaks_its_frames_even_after_its_clones_go() {
    let (pool, mm) = manager(8192);
    let probe = Probe::new();
    probe.fail_revoke.store(true, Ordering::Relaxed);
    let vm = space(&mm, probe.clone());
    write_pages(&vm, 0, 700, 7).unwrap();
    let child = vm.fork(Arc::new(NoopMmu)).expect("fork");
    let used = pool.total_frames() - pool.free_frames();
    vm.exit();
    // The child's view was revoked normally; it copies nothing, so the shared blocks it
    // lets go of were also named by the parent's stale view: none may be freed.
    child.exit();
    assert_eq!(
        pool.total_frames() - pool.free_frames(),
        used,
        "frames leaked, not freed"
    );
    // Another VM still gets clean frames from what is left.
    let other = space(&mm, Arc::new(NoopMmu));
    write_pages(&other, 0, 100, 9).unwrap();
    assert_eq!(read_tag(&other, 99), 9);
}

#[test]
fn a_panic_under_a_page_table_lock_fails_that_vm_alone() {
    let (pool, mm) = manager(8192);
    let probe = Probe::new();
    let bad = space(&mm, probe.clone());
    let good = space(&mm, Arc::new(NoopMmu));
    write_pages(&bad, 600, 10, 3).unwrap();
    probe.panic_at.store(5, Ordering::Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = bad.handle_fault(Gfn(5), guestmem::Access::Write);
    }));
    assert!(r.is_err(), "the injected panic happened");
    probe.panic_at.store(u64::MAX, Ordering::Relaxed);
    // Block 0 is poisoned: every use of it fails with a clear error, never a hang.
    match bad.handle_fault(Gfn(7), guestmem::Access::Write) {
        Err(SpaceError::Poisoned {
            lock: "page-table", ..
        }) => {}
        other => panic!("expected Poisoned, got {other:?}"),
    }
    assert!(matches!(
        bad.write(Gpa(8 * PAGE_SIZE as u64), &[1]),
        Err(SpaceError::Poisoned { .. })
    ));
    assert!(matches!(
        bad.fork(Arc::new(NoopMmu)),
        Err(SpaceError::Poisoned { .. })
    ));
    // Its other block, and its sibling, are untouched.
    assert_eq!(read_tag(&bad, 605), 3);
    write_pages(&good, 0, 1000, 4).unwrap();
    assert_eq!(read_tag(&good, 999), 4);
    // Exit frees what it can trust and keeps the poisoned block's frames.
    let used_by_good = {
        bad.exit();
        pool.total_frames() - pool.free_frames()
    };
    good.exit();
    let leaked = pool.total_frames() - pool.free_frames();
    assert!(leaked > 0 && leaked < used_by_good, "leaked {leaked}");
}

#[test]
fn a_vm_at_its_limit_fails_alone_and_gets_its_frames_back_at_exit() {
    let (pool, mm) = manager(8192);
    let capped = space(&mm, Arc::new(NoopMmu));
    capped.set_limit(Some(100));
    let sibling = space(&mm, Arc::new(NoopMmu));
    let e = write_pages(&capped, 0, 200, 1).unwrap_err();
    match &e {
        SpaceError::Charge(ChargeError::Limit { limit: 100, .. }) => {}
        other => panic!("expected the limit, got {other}"),
    }
    assert!(e.to_string().contains("memory limit"), "{e}");
    // Fault-around fell back to single frames: exactly the limit is used.
    assert_eq!(capped.charge().usage, 100);
    assert!(capped.charge().failcnt >= 1);
    write_pages(&sibling, 0, 1500, 2).unwrap();
    assert_eq!(read_tag(&sibling, 1499), 2);
    assert_eq!(read_tag(&capped, 99), 1);
    // Raising the limit lets it go on.
    capped.set_limit(None);
    write_pages(&capped, 100, 100, 1).unwrap();
    capped.exit();
    sibling.exit();
    assert_eq!(pool.free_frames(), pool.total_frames());
    assert_eq!(mm.live_charges(), 0);
}

/// Forks a clone with `reserve` frames reserved, lets a greedy sibling take every frame
/// it can, then has the clone copy `need` pages. Returns the sibling's error and the
/// clone's result.
fn greedy_sibling_against_a_clone(reserve: u64, need: u64) -> (SpaceError, Result<(), SpaceError>) {
    let (_pool, mm) = manager(4096);
    let parent = space(&mm, Arc::new(NoopMmu));
    write_pages(&parent, 0, 512, 5).unwrap();
    let clone = parent
        .fork_with(
            Arc::new(NoopMmu),
            ChildOptions {
                limit: None,
                reserve,
            },
        )
        .expect("fork");
    assert_eq!(clone.charge().reserved, reserve);
    let greedy = mm
        .create(
            &[RegionSpec {
                start: Gfn(0),
                pages: 8192,
            }],
            Arc::new(NoopMmu),
        )
        .unwrap();
    let e = write_pages(&greedy, 0, 8192, 6).unwrap_err();
    let r = write_pages(&clone, 0, need, 7);
    if r.is_ok() {
        assert_eq!(read_tag(&clone, need - 1), 7);
        assert_eq!(read_tag(&parent, need - 1), 5, "the parent kept its bytes");
    }
    (e, r)
}

#[test]
fn a_reservation_gives_a_clone_its_copies_whatever_a_sibling_takes() {
    let (e, r) = greedy_sibling_against_a_clone(300, 256);
    assert!(
        matches!(e, SpaceError::Charge(ChargeError::Reserved { .. })),
        "the greedy VM is told the rest is reserved: {e}"
    );
    r.expect("the clone copies within its reservation");
    // Without the reservation the same clone runs out: the check above can fail.
    let (e, r) = greedy_sibling_against_a_clone(0, 256);
    assert!(matches!(e, SpaceError::Alloc { .. }), "{e}");
    assert!(r.is_err(), "no reservation, no frames left");
}

#[test]
fn a_reservation_that_cannot_be_made_refuses_the_fork_and_changes_nothing() {
    let (pool, mm) = manager(1024);
    let parent = space(&mm, Arc::new(NoopMmu));
    write_pages(&parent, 0, 64, 5).unwrap();
    let charges = mm.live_charges();
    let e = parent
        .fork_with(
            Arc::new(NoopMmu),
            ChildOptions {
                limit: None,
                reserve: 2000,
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, SpaceError::Charge(ChargeError::Reserve { .. })),
        "{e}"
    );
    assert_eq!(mm.live_charges(), charges);
    assert_eq!(parent.entry(Gfn(3)).unwrap().sharers, 1);
    assert_eq!(
        mm.unclaimed_frames(),
        pool.total_frames() - parent.charge().usage
    );
}

#[test]
fn frames_a_clone_shares_stay_charged_to_the_parent_after_it_exits() {
    let (pool, mm) = manager(8192);
    let parent = space(&mm, Arc::new(NoopMmu));
    write_pages(&parent, 0, 640, 5).unwrap();
    let charged = parent.charge().usage;
    let child = parent.fork(Arc::new(NoopMmu)).unwrap();
    assert_eq!(child.charge().usage, 0, "sharing charges nothing");
    parent.exit();
    assert_eq!(mm.live_charges(), 2, "the exited parent's charge lives on");
    assert_eq!(mm.unclaimed_frames(), pool.total_frames() - charged);
    assert_eq!(read_tag(&child, 639), 5);
    child.exit();
    assert_eq!(mm.live_charges(), 0);
    assert_eq!(mm.unclaimed_frames(), pool.total_frames());
}

#[test]
fn a_region_larger_than_max_region_pages_is_refused() {
    let (_pool, mm) = manager(1024);
    let e = mm
        .create(
            &[RegionSpec {
                start: Gfn(0),
                pages: guestmem::space::MAX_REGION_PAGES + 1,
            }],
            Arc::new(NoopMmu),
        )
        .unwrap_err();
    assert!(matches!(e, SpaceError::BadRegion { .. }), "{e}");
}

#[test]
fn a_fragmented_pool_still_maps_runs_not_single_frames() {
    use guestmem::mmu::{MmuCall, RecordingMmu};
    use guestmem::{FrameInit, NodeId, Order};
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(
            1024 * PAGE_SIZE as u64,
            1,
            AllocatorKind::GlobalLock,
        ))
        .expect("pool"),
    );
    // Take every 8-frame block, give back every other one: no free block above 8 frames.
    let eight = Order::new(3).unwrap();
    let mut blocks = Vec::new();
    while let Ok(p) = pool.alloc(NodeId(0), eight, FrameInit::Zeroed) {
        blocks.push(p);
    }
    for p in blocks.iter().step_by(2) {
        pool.free(*p, eight);
    }
    let mm = Manager::new(Arc::clone(&pool), ManagerConfig::default());
    let rec = Arc::new(RecordingMmu::default());
    let vm = space(&mm, rec.clone());
    write_pages(&vm, 0, 64, 1).unwrap();
    let maps: Vec<u64> = rec
        .take()
        .into_iter()
        .filter_map(|c| match c {
            MmuCall::Map { pages, .. } => Some(pages),
            _ => None,
        })
        .collect();
    assert_eq!(
        maps,
        vec![8; 8],
        "eight runs of eight pages, not 64 single frames"
    );
    vm.exit();
    for p in blocks.iter().skip(1).step_by(2) {
        pool.free(*p, eight);
    }
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_fault_on_a_long_run_of_frames_maps_it_across_blocks_in_one_host_call() {
    use guestmem::mmu::{MmuCall, RecordingMmu};
    use guestmem::{Access, FaultOutcome};
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(
            4 * PAGES * PAGE_SIZE as u64,
            1,
            AllocatorKind::GlobalLock,
        ))
        .expect("pool"),
    );
    let mm = Manager::new(pool, ManagerConfig::default());
    let parent = space(&mm, Arc::new(NoopMmu));
    write_pages(&parent, 0, 1536, 7).unwrap();
    let contiguous = (1..1536).all(|g| {
        let p = |g| parent.pte(Gfn(g)).unwrap().pfn().unwrap().0;
        p(g) == p(g - 1) + 1
    });
    assert!(contiguous, "a fresh pool hands out ascending frames");
    let maps = |rec: &RecordingMmu| -> Vec<(Gfn, u64, bool)> {
        rec.take()
            .into_iter()
            .filter_map(|c| match c {
                MmuCall::Map {
                    gfn,
                    pages,
                    writable,
                    ..
                } => Some((gfn, pages, writable)),
                _ => None,
            })
            .collect()
    };
    // A clone's first read maps all three blocks of its parent's run, read-only, at once,
    // and says so (the VMM wakes every access waiting in it).
    let rec = Arc::new(RecordingMmu::default());
    let child = parent.fork(rec.clone()).unwrap();
    let (o, run) = child.handle_fault_run(Gfn(3), Access::Read).unwrap();
    assert_eq!(o, FaultOutcome::MapExisting { pages: 1536 });
    assert_eq!(run, Gfn(0)..Gfn(1536));
    assert_eq!(maps(&rec), vec![(Gfn(0), 1536, false)]);
    assert_eq!(read_tag(&child, 1535), 7);
    // Where the frames stop following each other (the parent's copy of page 700 after
    // its write), the run stops.
    write_pages(&parent, 700, 1, 8).unwrap();
    let rec2 = Arc::new(RecordingMmu::default());
    let child2 = parent.fork(rec2.clone()).unwrap();
    let (_, run) = child2.handle_fault_run(Gfn(0), Access::Read).unwrap();
    assert!(
        run.start == Gfn(0) && run.end.0 > 512 && run.end.0 <= 700,
        "{run:?}"
    );
    assert_eq!(maps(&rec2), vec![(Gfn(0), run.end.0, false)]);
    assert_eq!(read_tag(&child2, 700), 8);
    assert_eq!(read_tag(&child, 700), 7);
    for vm in [child2, child, parent] {
        vm.exit();
    }
}

#[test]
fn first_touch_runs_grow_along_a_sequential_fill_and_stay_small_elsewhere() {
    let (_pool, mm) = manager(4 * PAGES);
    let vm = space(&mm, Arc::new(NoopMmu));
    write_pages(&vm, 0, 2048, 1).unwrap();
    let c = vm.counters();
    // 64, 64, 128, 256, then 512-page runs (a block at most): 7 faults, not 32.
    assert_eq!((c.zero_fill_faults, c.zero_fill_pages), (7, 2048), "{c:?}");
    // Scattered first touches get the configured 64 pages each.
    let other = space(&mm, Arc::new(NoopMmu));
    for g in [100, 700, 1300, 1900] {
        write_pages(&other, g, 1, 2).unwrap();
    }
    let c = other.counters();
    assert_eq!((c.zero_fill_faults, c.zero_fill_pages), (4, 256), "{c:?}");
    for vm in [other, vm] {
        vm.exit();
    }
}

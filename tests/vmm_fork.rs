//! Snapshot-fork of running KVM guests on guestmem-managed memory (issue 6): one VM
//! forked into 8 clones, each writing its own pattern; a clone of a clone; the memory
//! accounting and COW counters checked against what the guests did; every frame back at
//! exit; forks refused by the pool's reserve leave the parent running. Needs /dev/kvm
//! (fails saying so unless SKIP_KVM=1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Order, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::{
    CmdResult, Command, ForkError, ForkOptions, ManagedVm, Op, ShellPool, VcpuError, VmConfig,
    open_fds,
};

mod common;
use common::hypervisor;

/// Tests run on parallel threads of one process; the one that counts open descriptors
/// takes this for writing, every other test for reading.
static FD_COUNTING: std::sync::RwLock<()> = std::sync::RwLock::new(());
const MIB: u64 = 1 << 20;
/// Pages each clone rewrites.
const SLICE: u64 = 64;
/// Pages the parent fills before the fork.
const FILLED: u64 = 1024;

fn manager(pool_bytes: u64) -> (Arc<Pool>, Arc<Manager>) {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(pool_bytes, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    (pool, mm)
}

/// As [`manager`], but first touches map one page each (no fault-around), so that a fill
/// of fresh pages takes one fault per page; with `copy_around` false, copy-on-write
/// faults copy one page each too.
fn manager_page_at_a_time(pool_bytes: u64, copy_around: bool) -> (Arc<Pool>, Arc<Manager>) {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(pool_bytes, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let defaults = ManagerConfig::default();
    let cfg = ManagerConfig {
        fault_around: Order::ZERO,
        cow_around: if copy_around {
            defaults.cow_around
        } else {
            Order::ZERO
        },
        ..defaults
    };
    let mm = Manager::new(pool.clone(), cfg);
    (pool, mm)
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// The process's open descriptors once background teardown is over: no `window-retire`
/// thread left (they close retired VMs' descriptors) and the count steady for 50 ms.
/// Gives up waiting after 5 s and returns the count then.
fn settled_fds() -> u64 {
    let count = || open_fds().expect("count open descriptors in /proc/self/fd");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = count();
    let mut steady = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = count();
        steady = if now == last && threads_named("window-retire") == 0 {
            steady + 1
        } else {
            0
        };
        last = now;
        if steady >= 5 {
            break;
        }
    }
    last
}

fn data(page: u64) -> Gfn {
    Gfn(DATA_START / 4096 + page)
}

fn slice(i: u64) -> Gfn {
    data(i * SLICE)
}

fn run(vm: &ManagedVm, cmd: Command) -> vmm::CmdResult {
    vm.vm()
        .run(0, cmd)
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn verify(vm: &ManagedVm, start: Gfn, pages: u64, seed: u64) -> u64 {
    run(vm, Command::new(Op::Verify, start, pages, seed)).mismatches()
}

/// Verifies pages `0 .. FILLED` of `vm`: `own` maps slice index -> the seed it rewrote
/// with; every other page must still hold the parent's seed 1.
fn verify_all(vm: &ManagedVm, own: &[(u64, u64)]) {
    let mut page = 0;
    while page < FILLED {
        let (pages, seed) = match own.iter().find(|(s, _)| s * SLICE == page) {
            Some(&(_, seed)) => (SLICE, seed),
            None => (SLICE, 1),
        };
        assert_eq!(
            verify(vm, data(page), pages, seed),
            0,
            "pages {page}.. should hold seed {seed}"
        );
        page += pages;
    }
}

#[test]
fn fork_into_8_clones_each_keeps_its_own_bytes_and_accounting_matches() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager(128 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(32 * MIB, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), FILLED, 1));
    let resident = parent.memory().resident;
    assert!(resident >= FILLED);
    let used_before = pool.total_frames() - pool.free_frames();

    let (clones, timing) = parent.fork(&hv, &ForkOptions::new(8)).expect("fork 8");
    assert_eq!(clones.len(), 8);
    assert_eq!(timing.clone_ns.len(), 8);
    // Right after the fork nothing is copied: every VM maps the same frames.
    assert_eq!(pool.total_frames() - pool.free_frames(), used_before);
    for c in &clones {
        let m = c.memory();
        assert_eq!(m.resident, resident);
        assert_eq!(m.private, 0);
        assert!((m.pss - resident as f64 / 9.0).abs() < 1e-6, "{m:?}");
    }

    // Clone i rewrites slice i; the parent, still running, rewrites slice 8.
    for (i, c) in clones.iter().enumerate() {
        run(
            c,
            Command::new(Op::Fill, slice(i as u64), SLICE, 100 + i as u64),
        );
    }
    run(&parent, Command::new(Op::Fill, slice(8), SLICE, 50));

    for (i, c) in clones.iter().enumerate() {
        verify_all(c, &[(i as u64, 100 + i as u64)]);
    }
    verify_all(&parent, &[(8, 50)]);

    // Every write to a shared page was a copy: one per page written, in each VM.
    for c in &clones {
        let k = c.counters();
        assert_eq!(k.cow_copies, SLICE, "{k:?}");
        assert_eq!(k.zero_fill_pages, 0, "{k:?}");
        let m = c.memory();
        assert_eq!(m.resident, resident);
        assert_eq!(m.private, SLICE);
        assert_eq!(m.shared, resident - SLICE);
        // Own slice alone; 7 other clone slices shared by 8 VMs (parent + 7 clones);
        // the parent's slice 8 (old frames) by the 8 clones; the rest by all 9.
        let pss = SLICE as f64
            + 7.0 * SLICE as f64 / 8.0
            + SLICE as f64 / 8.0
            + (resident - 9 * SLICE) as f64 / 9.0;
        assert!((m.pss - pss).abs() < 1e-6, "{} vs {pss}", m.pss);
    }
    assert_eq!(parent.counters().cow_copies, SLICE);
    let pm = parent.memory();
    assert_eq!(pm.private, SLICE);
    assert_eq!(pm.shared, resident - SLICE);
    // PSS adds up to the frames in use: each frame counted once across all VMs.
    let used = pool.total_frames() - pool.free_frames();
    let pss: f64 = clones.iter().map(|c| c.memory().pss).sum::<f64>() + pm.pss;
    assert!((pss - used as f64).abs() < 1e-3, "{pss} vs {used}");
    assert_eq!(used, used_before + 9 * SLICE);

    drop(clones);
    drop(parent);
    assert_eq!(
        pool.free_frames(),
        pool.total_frames(),
        "exiting VMs return every frame"
    );
}

#[test]
fn an_in_place_fork_keeps_the_parents_window_and_every_vms_bytes() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager(96 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(32 * MIB, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), FILLED, 1));
    let window = parent.vm().window().clone();
    let swaps = window.swaps();
    let opts = vmm::ForkOptions {
        parent: vmm::ParentMode::InPlace,
        ..vmm::ForkOptions::new(2)
    };
    let (clones, t) = parent.fork(&hv, &opts).expect("in-place fork");
    assert_eq!(t.rebirth_ns, 0, "no move to a fresh VM");
    assert!(Arc::ptr_eq(&window, parent.vm().window()), "same window");
    assert_eq!(window.swaps(), swaps, "the window was not swapped");
    // The parent's reads after the fork fault nothing: its pages stayed mapped.
    let before = parent.fault_counts();
    run(&parent, Command::new(Op::Touch, data(0), FILLED, 0));
    assert_eq!(
        parent.fault_counts().total(),
        before.total(),
        "reads faulted"
    );
    // Its writes fault and copy: the clones keep the old bytes, each VM its own.
    for (i, c) in clones.iter().enumerate() {
        run(
            c,
            Command::new(Op::Fill, slice(i as u64), SLICE, 100 + i as u64),
        );
    }
    run(&parent, Command::new(Op::Fill, slice(2), SLICE, 50));
    assert_eq!(parent.counters().cow_copies, SLICE);
    verify_all(&parent, &[(2, 50)]);
    for (i, c) in clones.iter().enumerate() {
        verify_all(c, &[(i as u64, 100 + i as u64)]);
    }
    // The next fork is a rebirth again (the mode is per fork).
    let (more, t) = parent.fork(&hv, &vmm::ForkOptions::new(1)).expect("fork");
    assert!(t.rebirth_ns > 0, "{t:?}");
    verify_all(&more[0], &[(2, 50)]);
    drop(more);
    drop(clones);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_clone_of_a_clone_keeps_its_own_bytes() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager(96 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(32 * MIB, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), FILLED, 1));
    let (mut clones, _) = parent.fork(&hv, &ForkOptions::new(1)).expect("fork");
    let child = clones.pop().expect("one clone");
    run(&child, Command::new(Op::Fill, slice(0), SLICE, 100));
    let (mut grand, _) = child
        .fork(&hv, &ForkOptions::new(1))
        .expect("fork the clone");
    let grand = grand.pop().expect("one grandchild");
    run(&grand, Command::new(Op::Fill, slice(1), SLICE, 200));
    run(&child, Command::new(Op::Fill, slice(2), SLICE, 300));

    verify_all(&parent, &[]);
    verify_all(&child, &[(0, 100), (2, 300)]);
    verify_all(&grand, &[(0, 100), (1, 200)]);
    // The grandchild copied only what it wrote; slice 0 it shares with its parent.
    assert_eq!(grand.counters().cow_copies, SLICE);
    let g = grand.memory();
    assert_eq!(g.private, SLICE);
    // The child's slice 0 frames were private to it before the second fork and are
    // shared with the grandchild now; only slice 2, written after it, is its own.
    assert_eq!(child.memory().private, SLICE);
    assert_eq!(g.shared, g.resident - SLICE);
    // The child wrote slice 0 (copy) and slice 2 (copy: the grandchild still maps it).
    assert_eq!(child.counters().cow_copies, 2 * SLICE);

    drop(grand);
    drop(child);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn clones_continue_a_command_in_flight_at_the_same_instruction() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    // One fault per page: the fill below takes thousands of faults, and a clone's counters
    // say which pages it wrote itself.
    let (pool, mm) = manager_page_at_a_time(160 * MIB, false);
    let parent = ManagedVm::new(&hv, &VmConfig::new(64 * MIB, 1), &mm).expect("parent");
    // The clones' VMs exist before the fork, so the fork pauses the parent at once.
    let shells = ShellPool::new(parent.vm().config());
    shells.fill(&hv, 2).expect("shells");
    let pages = 8192;
    let boot = parent.memory().resident;
    let v = &parent.vm().vcpus()[0];
    v.submit(Command::new(Op::Fill, data(0), pages, 9))
        .expect("submit");
    // Fork once an eighth of the fill is written: seven eighths (7168 faults) are still
    // ahead of the vCPU, far longer than a fork's pause.
    let deadline = Instant::now() + Duration::from_secs(60);
    while parent.memory().resident < boot + pages / 8 {
        assert!(Instant::now() < deadline, "the fill made no progress");
        std::thread::sleep(Duration::from_micros(200));
    }
    let (clones, _) = parent
        .fork_with(&hv, &ForkOptions::new(2), Some(&shells))
        .expect("fork");
    assert_eq!(
        v.wait().expect("parent finishes its fill"),
        CmdResult::default()
    );
    for (i, c) in clones.iter().enumerate() {
        match c.vm().vcpus()[0].wait() {
            Ok(r) => assert_eq!(r, CmdResult::default(), "clone {i}"),
            Err(VcpuError::NothingInFlight(_)) => {
                panic!("clone {i} had no command in flight: the fill was not continued")
            }
            Err(e) => panic!("clone {i}: {e}"),
        }
        let k = c.counters();

        // The clone wrote the pages after the fork point itself (fresh pages) and copied at
        // most the one page the vCPU was in: it went on at the parent's instruction, it did
        // not start the fill again (that would copy the thousand pages written before).
        assert!(k.cow_copies <= 1, "clone {i} restarted the fill: {k:?}");
        assert!(
            k.zero_fill_pages > 0 && k.zero_fill_pages <= pages - pages / 8,
            "clone {i} wrote {} fresh pages of {pages}: {k:?}",
            k.zero_fill_pages
        );
        assert_eq!(c.memory().resident, boot + pages, "clone {i}");
        assert_eq!(verify(c, data(0), pages, 9), 0, "clone {i}");
    }
    // Both clones went on from the one snapshot: the same pages were ahead of each.
    assert_eq!(
        clones[0].counters().zero_fill_pages,
        clones[1].counters().zero_fill_pages
    );
    assert_eq!(verify(&parent, data(0), pages, 9), 0);
    drop(clones);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_fork_refused_by_the_pool_reserve_leaves_the_parent_running() {
    // Counts the process's descriptors: no other test may open or close any meanwhile.
    let _alone = FD_COUNTING.write().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager(48 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(32 * MIB, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), FILLED, 1));
    let free = pool.free_frames();
    // Earlier tests' retired VMs close their descriptors on background threads: wait for
    // those, so that the count before and after the fork can be compared exactly.
    let fds = settled_fds();
    let opts = ForkOptions {
        clones: 8,
        reserve_pages: free / 4,
        parent: vmm::ParentMode::Rebirth,
    };
    match parent.fork(&hv, &opts) {
        Err(ForkError::PoolExhausted { need, free: f, .. }) => {
            assert_eq!(f, free);
            assert_eq!(need, 8 * (free / 4));
        }
        other => panic!("expected PoolExhausted, got {other:?}"),
    }
    assert_eq!(pool.free_frames(), free, "nothing allocated");
    assert_eq!(
        settled_fds(),
        fds,
        "a refused fork leaves no descriptor behind"
    );
    verify_all(&parent, &[]);
    // The parent keeps working.
    run(&parent, Command::new(Op::Fill, slice(3), SLICE, 7));
    verify_all(&parent, &[(3, 7)]);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_clone_that_runs_out_of_frames_fails_alone_and_returns_them() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    // 32 MiB guest on a 16 MiB pool: the parent's 4 MiB fit, a clone rewriting 12 MiB
    // does not.
    let (pool, mm) = manager(16 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(32 * MIB, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), FILLED, 1));
    let (mut clones, _) = parent.fork(&hv, &ForkOptions::new(1)).expect("fork");
    let clone = clones.pop().expect("clone");
    // The clone reads the parent's pages first: they are mapped into its window read-only,
    // over frames the parent still uses.
    clone
        .vm()
        .run(0, Command::new(Op::Touch, data(0), FILLED, 0))
        .expect("touch");
    // It fails filling fresh pages above them, so those stay shared and read-only.
    let r = clone
        .vm()
        .run(0, Command::new(Op::Fill, data(FILLED), 3 * FILLED, 5));
    match r {
        Err(VcpuError::FaultFailed { reason, .. }) => {
            assert!(reason.to_string().contains("frame"), "{reason}")
        }
        other => panic!("expected the clone to run out of frames, got {other:?}"),
    }
    // A failed VM's window must not become a way into frames others share: writes to it
    // complete (on private memory) and the parent's bytes stay as they were.
    for p in 0..FILLED {
        clone
            .vm()
            .window()
            .write_u64s(data(p).gpa(), &[0xDEAD_BEEF])
            .expect("write into the failed clone's window");
    }
    drop(clone);
    verify_all(&parent, &[]);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

/// Waits for the command each vCPU of `vm` runs; every one must have had one in flight.
fn wait_every_vcpu(vm: &ManagedVm, what: &str) {
    for v in vm.vm().vcpus() {
        match v.wait() {
            Ok(_) => {}
            Err(VcpuError::NothingInFlight(_)) => {
                panic!("{what}: vCPU {} had no command in flight", v.id())
            }
            Err(e) => panic!("{what}: vCPU {}: {e}", v.id()),
        }
    }
}

/// Pages per vCPU per round in the fork-while-writing test: each round fills a fresh
/// region of two halves, one per vCPU.
const HALF: u64 = 2048;
/// A region's quarters, the unit of the fork-while-writing test's own writes.
const QUARTER: u64 = HALF / 2;

/// Quarter `q` of region `r` in the fork-while-writing test.
fn quarter(r: u64, q: u64) -> Gfn {
    data(r * 2 * HALF + q * QUARTER)
}

/// Runs `cmds` on `vm`'s vCPUs, round robin, all at once; each must succeed.
fn run_all(vm: &ManagedVm, cmds: &[Command], what: &str) {
    let vcpus = vm.vm().vcpus();
    for (n, &cmd) in cmds.iter().enumerate() {
        vcpus[n % vcpus.len()].submit(cmd).expect("submit");
    }
    for n in 0..cmds.len() {
        let v = &vcpus[n % vcpus.len()];
        if let Err(e) = v.wait() {
            panic!("{what}: vCPU {}: {e}", v.id());
        }
    }
}

/// Checks every region of `vm` against `map` (region -> the seed of each quarter;
/// regions past its end were never written by `vm` and must have no page in its page
/// table).
fn verify_regions(vm: &ManagedVm, map: &[[u64; 4]], regions: u64, what: &str) {
    for r in 0..regions {
        for q in 0..4 {
            let at = quarter(r, q);
            match map.get(r as usize) {
                Some(seeds) => assert_eq!(
                    verify(vm, at, QUARTER, seeds[q as usize]),
                    0,
                    "{what}: region {r} quarter {q} should hold seed {}",
                    seeds[q as usize]
                ),
                None => {
                    for g in at.0..at.0 + QUARTER {
                        let pte = vm.space().pte(Gfn(g)).expect("pte");
                        assert!(
                            !pte.is_present(),
                            "{what}: region {r} was never written by this VM, but {} is \
                             present",
                            Gfn(g)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_parent_forked_again_and_again_while_its_vcpus_write_keeps_every_byte() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    // One fault per fresh page keeps the parent's fills running long enough to fork in
    // their middle (copies go by runs, so that seven VMs' windows stay well under the
    // host's mapping limit).
    let (pool, mm) = manager_page_at_a_time(256 * MIB, true);
    let parent = ManagedVm::new(&hv, &VmConfig::new(64 * MIB, 2), &mm).expect("parent");
    let shells = ShellPool::new(parent.vm().config());
    let rounds = 3;
    // Round r: the parent's two vCPUs fill the fresh region r (half i with
    // `1000r + 1 + i`) and it is forked into two clones in the middle of that. Then, all
    // at once, in every region so far the parent rewrites quarter 0 with its own seed
    // `1000r + 100`, clone k quarter k + 1 with `1000r + 200 + k`, and nobody quarter 3.
    // Each VM's writes land on pages the other two still share with it, so a byte
    // leaking from any VM into another shows in the one it leaked into.
    let in_flight = |r: u64| [1000 * r + 1, 1000 * r + 2];
    let writer_seed = |r: u64, writer: u64| match writer {
        0 => 1000 * r + 100,
        k => 1000 * r + 200 + (k - 1),
    };
    let mut parent_map: Vec<[u64; 4]> = Vec::new();
    let mut all: Vec<(ManagedVm, Vec<[u64; 4]>)> = Vec::new();
    for round in 0..rounds {
        shells.fill(&hv, 2).expect("shells");
        // Fork once an eighth of a half is written: both vCPUs are then mid-fill.
        let faults = parent.fault_counts().total();
        for (i, v) in parent.vm().vcpus().iter().enumerate() {
            let at = quarter(round, 2 * i as u64);
            v.submit(Command::new(Op::Fill, at, HALF, in_flight(round)[i]))
                .expect("submit");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while parent.fault_counts().total() < faults + HALF / 8 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the fills made no progress"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let vm_fd_before = Arc::as_ptr(&parent.vm().vm_fd());
        let (clones, t) = parent
            .fork_with(&hv, &ForkOptions::new(2), Some(&shells))
            .expect("fork");
        if t.rebirth_ns > 0 {
            // The parent moved into a fresh KVM VM.
            assert_ne!(Arc::as_ptr(&parent.vm().vm_fd()), vm_fd_before);
        }
        // The fills in flight at the fork complete in all three VMs; the clones inherit
        // the parent's older regions.
        wait_every_vcpu(&parent, &format!("round {round}, parent"));
        for (k, c) in clones.iter().enumerate() {
            wait_every_vcpu(c, &format!("round {round}, clone {k}"));
        }
        let [s0, s1] = in_flight(round);
        parent_map.push([s0, s0, s1, s1]);
        let vms: Vec<&ManagedVm> = std::iter::once(&parent).chain(clones.iter()).collect();
        let mut maps = vec![parent_map.clone(); vms.len()];
        let name = |w: usize| match w {
            0 => "parent".to_string(),
            k => format!("clone {}", k - 1),
        };
        for (w, vm) in vms.iter().enumerate() {
            let what = format!("round {round}, {}, after the fill in flight", name(w));
            verify_regions(vm, &maps[w], round + 1, &what);
        }
        // Every VM writes its own quarter of every region, concurrently with the others.
        let own: Vec<Vec<Command>> = (0..vms.len() as u64)
            .map(|w| {
                (0..=round)
                    .map(|r| Command::new(Op::Fill, quarter(r, w), QUARTER, writer_seed(round, w)))
                    .collect()
            })
            .collect();
        std::thread::scope(|s| {
            for (w, vm) in vms.iter().enumerate() {
                let (cmds, what) = (&own[w], format!("round {round}, {}", name(w)));
                s.spawn(move || run_all(vm, cmds, &what));
            }
        });
        for (w, map) in maps.iter_mut().enumerate() {
            for seeds in map.iter_mut() {
                seeds[w] = writer_seed(round, w as u64);
            }
        }
        for (w, vm) in vms.iter().enumerate() {
            let what = format!("round {round}, {}, after the writes", name(w));
            verify_regions(vm, &maps[w], round + 1, &what);
        }
        drop(vms);
        let mut maps = maps.into_iter();
        parent_map = maps.next().expect("the parent's map");
        all.extend(clones.into_iter().zip(maps));
    }
    // Older clones kept their own bytes although the parent and later clones rewrote
    // theirs, and have nothing of the regions the parent filled after their fork.
    for (n, (c, map)) in all.iter().enumerate() {
        verify_regions(c, map, rounds, &format!("clone {n} at the end"));
    }
    verify_regions(&parent, &parent_map, rounds, "parent at the end");
    assert!(parent.vm().window().swaps() >= 1);
    drop(all);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn clones_made_from_pre_created_shells_run_and_keep_their_own_bytes() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager(96 * MIB);
    let cfg = VmConfig::new(32 * MIB, 1);
    let shells = vmm::ShellPool::new(&cfg);
    shells.fill(&hv, 4).expect("shells");
    let other = vmm::ShellPool::new(&VmConfig::new(16 * MIB, 1));
    other.fill(&hv, 1).expect("a shell of another shape");
    let parent = ManagedVm::new(&hv, &cfg, &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), FILLED, 1));
    let (clones, _) = parent
        .fork_with(&hv, &ForkOptions::new(6), Some(&shells))
        .expect("fork 6 with 4 shells");
    assert!(shells.is_empty(), "all 4 shells used");
    assert!(
        parent
            .fork_with(&hv, &ForkOptions::new(1), Some(&other))
            .is_ok()
    );
    assert_eq!(other.len(), 1, "a shell of another shape is not used");
    for (i, c) in clones.iter().enumerate() {
        run(
            c,
            Command::new(Op::Fill, slice(i as u64), SLICE, 100 + i as u64),
        );
    }
    for (i, c) in clones.iter().enumerate() {
        verify_all(c, &[(i as u64, 100 + i as u64)]);
        assert_eq!(c.counters().cow_copies, SLICE);
    }
    verify_all(&parent, &[]);
    drop(clones);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

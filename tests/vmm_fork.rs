//! Snapshot-fork of running KVM guests on guestmem-managed memory (issue 6): one VM
//! forked into 8 clones, each writing its own pattern; a clone of a clone; the memory
//! accounting and COW counters checked against what the guests did; every frame back at
//! exit; forks refused by the pool's reserve leave the parent running. Needs /dev/kvm
//! (fails saying so unless SKIP_KVM=1).

use std::sync::Arc;

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::{Command, ForkError, ForkOptions, ManagedVm, Op, VcpuError, VmConfig, open_fds};

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
    let (pool, mm) = manager(128 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(64 * MIB, 1), &mm).expect("parent");
    let pages = 4096;
    let v = &parent.vm().vcpus()[0];
    v.submit(Command::new(Op::Fill, data(0), pages, 9))
        .expect("submit");
    std::thread::sleep(std::time::Duration::from_millis(2));
    let (clones, _) = parent.fork(&hv, &ForkOptions::new(2)).expect("fork");
    v.wait().expect("parent finishes its fill");
    for c in &clones {
        // The fill was either in flight (the clone finishes it) or done before the fork.
        match c.vm().vcpus()[0].wait() {
            Ok(_) | Err(VcpuError::NothingInFlight(_)) => {}
            Err(e) => panic!("clone: {e}"),
        }
        assert_eq!(verify(c, data(0), pages, 9), 0);
    }
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
    let fds = open_fds();
    let opts = ForkOptions {
        clones: 8,
        reserve_pages: free / 4,
    };
    match parent.fork(&hv, &opts) {
        Err(ForkError::PoolExhausted { need, free: f, .. }) => {
            assert_eq!(f, free);
            assert_eq!(need, 8 * (free / 4));
        }
        other => panic!("expected PoolExhausted, got {other:?}"),
    }
    assert_eq!(pool.free_frames(), free, "nothing allocated");
    // Earlier tests' VMs may still be torn down in the background (fewer descriptors
    // later); a leak would show as more.
    assert!(
        open_fds() <= fds,
        "no descriptor leaked: {:?} > {fds:?}",
        open_fds()
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

#[test]
fn a_parent_forked_again_and_again_while_its_vcpus_write_keeps_every_byte() {
    let _shared = FD_COUNTING.read().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    // Each round, the parent and both clones may each write 32 MiB.
    let (pool, mm) = manager(384 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(64 * MIB, 2), &mm).expect("parent");
    let vcpus = parent.vm().vcpus();
    let half = 4096;
    let mut all = Vec::new();
    for round in 0..3u64 {
        // Both vCPUs rewrite their halves with this round's seeds while the fork happens.
        for (i, v) in vcpus.iter().enumerate() {
            v.submit(Command::new(
                Op::Fill,
                data(i as u64 * half),
                half,
                10 * round + i as u64,
            ))
            .expect("submit");
        }
        let vm_fd_before = Arc::as_ptr(&parent.vm().vm_fd());
        let (clones, t) = parent.fork(&hv, &ForkOptions::new(2)).expect("fork");
        if t.rebirth_ns > 0 {
            // The parent moved into a fresh KVM VM.
            assert_ne!(Arc::as_ptr(&parent.vm().vm_fd()), vm_fd_before);
        }
        for vm in std::iter::once(&parent).chain(clones.iter()) {
            for v in vm.vm().vcpus() {
                match v.wait() {
                    Ok(_) | Err(VcpuError::NothingInFlight(_)) => {}
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
        }
        for vm in std::iter::once(&parent).chain(clones.iter()) {
            for i in 0..2u64 {
                assert_eq!(
                    verify(vm, data(i * half), half, 10 * round + i),
                    0,
                    "round {round}, half {i}"
                );
            }
        }
        all.extend(clones);
    }
    // Older clones kept their own round's bytes although the parent rewrote its memory.
    for (k, c) in all.iter().enumerate() {
        let round = k as u64 / 2;
        assert_eq!(verify(c, data(0), half, 10 * round), 0, "clone {k}");
    }
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

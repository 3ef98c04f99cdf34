//! Clones held by worker processes (`vmm::worker`): a VM of this process forked into
//! clones in two workers, each seeing the parent's memory, writing its own copy and
//! faulting through this process's manager; a worker killed mid-run takes only its own
//! clones; every frame back at the end. Needs /dev/kvm (fails saying so unless
//! SKIP_KVM=1).

use std::path::Path;
use std::sync::Arc;

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::worker::{RemoteShells, RemoteVm, WorkerError, WorkerPool};
use vmm::{Command, ForkOptions, Hypervisor, ManagedVm, Op, VmConfig};

mod common;

const MIB: u64 = 1 << 20;
const MEM: u64 = 32 * MIB;
const DATA: Gfn = Gfn(DATA_START / 4096);
const FILLED: u64 = 2048;

fn setup() -> Option<(Hypervisor, Arc<Pool>, Arc<Manager>, ManagedVm)> {
    if !common::kvm() {
        return None;
    }
    let hv = Hypervisor::new().expect("open /dev/kvm");
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(4 * MEM, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let parent = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("parent VM");
    parent
        .vm()
        .run(0, Command::new(Op::Fill, DATA, FILLED, 11))
        .expect("parent fill");
    Some((hv, pool, mm, parent))
}

fn workers(mm: &Manager, n: usize) -> WorkerPool {
    WorkerPool::spawn(Path::new(env!("CARGO_BIN_EXE_vmm")), n, mm, 2).expect("start workers")
}

/// `n` clones of `parent` in shells of `pool_workers` (the shells first, then the clones).
fn fork_into(
    hv: &Hypervisor,
    parent: &ManagedVm,
    pool_workers: &WorkerPool,
    n: usize,
) -> (RemoteShells, Vec<RemoteVm>) {
    let shells = pool_workers
        .shells(&VmConfig::new(MEM, 1), n)
        .expect("shells");
    let (clones, _) = parent
        .fork_remote(hv, &ForkOptions::new(n), &shells)
        .expect("fork");
    (shells, clones)
}

#[test]
fn clones_in_worker_processes_share_the_parents_memory_and_copy_what_they_write() {
    let Some((hv, pool, mm, parent)) = setup() else {
        return;
    };
    let pool_workers = workers(&mm, 2);
    let shells = pool_workers
        .shells(&VmConfig::new(MEM, 1), 4)
        .expect("shells in the workers");
    assert_eq!(shells.len(), 4);
    let (clones, timing) = parent
        .fork_remote(&hv, &ForkOptions::new(4), &shells)
        .expect("fork into the workers");
    assert_eq!(timing.from_shells, 4);
    let pids: std::collections::HashSet<u32> = clones.iter().map(|c| c.pid()).collect();
    assert_eq!(pids.len(), 2, "the clones are spread over both workers");
    assert!(!pids.contains(&std::process::id()));
    for (k, c) in clones.iter().enumerate() {
        // The parent's pattern, read through faults this process resolves.
        let r = c
            .run(0, Command::new(Op::Verify, DATA, FILLED, 11))
            .expect("clone verify");
        assert_eq!(r.mismatches(), 0, "clone {k} sees the parent's memory");
        // Its own pattern over the first 64 pages: copy-on-write in this process.
        let seed = 100 + k as u64;
        c.run(0, Command::new(Op::Fill, DATA, 64, seed))
            .expect("clone write");
    }
    for (k, c) in clones.iter().enumerate() {
        let seed = 100 + k as u64;
        let r = c
            .run(0, Command::new(Op::Verify, DATA, 64, seed))
            .expect("clone verify own");
        assert_eq!(r.mismatches(), 0, "clone {k} keeps its own writes");
        let (counts, failed) = c.fault_counts().expect("fault counts");
        assert!(failed.is_none(), "{failed:?}");
        assert!(
            counts.total() > 0,
            "clone {k}'s faults were counted in its worker"
        );
        assert!(
            c.space().counters().cow_copies > 0,
            "clone {k} copied on write"
        );
    }
    // The parent is untouched by its clones' writes.
    let r = parent
        .vm()
        .run(0, Command::new(Op::Verify, DATA, FILLED, 11))
        .expect("parent verify");
    assert_eq!(r.mismatches(), 0);
    drop(clones);
    drop(shells);
    drop(pool_workers);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");
}

#[test]
fn a_killed_worker_takes_only_its_own_clones() {
    let Some((hv, pool, mm, parent)) = setup() else {
        return;
    };
    let pool_workers = workers(&mm, 2);
    let (shells, clones) = fork_into(&hv, &parent, &pool_workers, 4);
    let victim = pool_workers.pids()[0];
    for c in &clones {
        c.run(0, Command::new(Op::Fill, DATA, 16, 5))
            .expect("write");
    }
    // SAFETY: kill sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    for c in &clones {
        let r = c.run(0, Command::new(Op::Verify, DATA, 16, 5));
        if c.pid() == victim {
            assert!(
                matches!(r, Err(WorkerError::Gone { .. } | WorkerError::Io { .. })),
                "a clone of the killed worker: {r:?}"
            );
        } else {
            assert_eq!(r.expect("a sibling runs on").mismatches(), 0);
            // And still faults through this process: new pages, copied on write.
            c.run(0, Command::new(Op::Fill, Gfn(DATA.0 + 100), 32, 6))
                .expect("sibling writes");
        }
    }
    let r = parent
        .vm()
        .run(0, Command::new(Op::Verify, DATA, FILLED, 11))
        .expect("parent verify");
    assert_eq!(r.mismatches(), 0);
    drop(clones);
    drop(shells);
    drop(pool_workers);
    drop(parent);
    assert_eq!(
        pool.free_frames(),
        pool.total_frames(),
        "a dead worker's clones' frames come back"
    );
}

#[test]
fn a_frozen_worker_is_ended_at_its_deadline_and_only_its_clones_go() {
    let Some((hv, pool, mm, parent)) = setup() else {
        return;
    };
    let pool_workers = workers(&mm, 2);
    let (shells, clones) = fork_into(&hv, &parent, &pool_workers, 2);
    pool_workers.set_answer_within(std::time::Duration::from_secs(5));
    let victim = pool_workers.pids()[0];
    // SAFETY: kill sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGSTOP) }, 0);
    let t = std::time::Instant::now();
    for c in &clones {
        let r = c.run(0, Command::new(Op::Verify, DATA, FILLED, 11));
        if c.pid() == victim {
            assert!(
                matches!(r, Err(WorkerError::Gone { .. })),
                "a clone of the frozen worker: {r:?}"
            );
        } else {
            assert_eq!(r.expect("a sibling runs on").mismatches(), 0);
        }
    }
    // A hang bound, not a speed claim: unbounded before there was a deadline.
    assert!(t.elapsed() < std::time::Duration::from_secs(60));
    // Ended and reaped: no process of that pid is left, not even a zombie.
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(victim as i32, 0) }, -1);
    drop(clones);
    drop(shells);
    drop(pool_workers);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");
}

#[test]
fn a_fork_of_a_vm_with_many_vcpus_restores_every_vcpu_in_its_worker() {
    // 40 vCPU states with their XSAVE areas are more than one socket message holds.
    const VCPUS: u32 = 40;
    if !common::kvm() {
        return;
    }
    let hv = Hypervisor::new().expect("open /dev/kvm");
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(4 * MEM, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let cfg = VmConfig::new(MEM, VCPUS);
    let parent = ManagedVm::new(&hv, &cfg, &mm).expect("parent VM");
    parent
        .vm()
        .run(VCPUS as usize - 1, Command::new(Op::Fill, DATA, 64, 3))
        .expect("parent fill");
    let pool_workers = workers(&mm, 1);
    let shells = pool_workers.shells(&cfg, 1).expect("shell");
    let (clones, _) = parent
        .fork_remote(&hv, &ForkOptions::new(1), &shells)
        .expect("fork");
    for i in [0, VCPUS - 1] {
        let r = clones[0]
            .run(i, Command::new(Op::Verify, DATA, 64, 3))
            .expect("a restored vCPU runs");
        assert_eq!(r.mismatches(), 0);
    }
    drop(clones);
    drop(shells);
    drop(pool_workers);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");
}

#[test]
fn a_long_wait_of_one_clone_does_not_hold_up_a_siblings_in_the_same_worker() {
    let Some((hv, pool, mm, parent)) = setup() else {
        return;
    };
    let pool_workers = workers(&mm, 1);
    let (shells, clones) = fork_into(&hv, &parent, &pool_workers, 2);
    let (long, short) = (&clones[0], &clones[1]);
    // Minutes of random reads, waited on with no limit on another thread.
    long.submit(0, Command::random(DATA, FILLED, 9, 1 << 40))
        .expect("submit the long command");
    let done = std::sync::atomic::AtomicBool::new(false);
    let checked = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let r = long.wait(0, None);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        });
        // A bound on the test, not a speed claim: a sibling held up until the long
        // command ends would otherwise wait for minutes; stopped here, it fails below.
        s.spawn(|| {
            let t = std::time::Instant::now();
            while !checked.load(std::sync::atomic::Ordering::SeqCst) {
                if t.elapsed() > std::time::Duration::from_secs(30) {
                    long.stop();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        // Let the long wait reach the worker first.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let r = short
            .run(0, Command::new(Op::Verify, DATA, FILLED, 11))
            .expect("the sibling's command and wait");
        assert_eq!(r.mismatches(), 0);
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "the sibling's result came while the long command still ran"
        );
        checked.store(true, std::sync::atomic::Ordering::SeqCst);
        long.stop();
        let r = waiter.join().expect("waiter");
        assert!(r.is_err(), "a stopped command ends with an error: {r:?}");
    });
    drop(clones);
    drop(shells);
    drop(pool_workers);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");
}

#[test]
fn the_last_of_a_pool_ends_its_workers_and_fault_threads() {
    let Some((hv, _pool, mm, parent)) = setup() else {
        return;
    };
    let pool_workers = workers(&mm, 2);
    let server = pool_workers.fault_server();
    let pids = pool_workers.pids();
    let shells = pool_workers
        .shells(&VmConfig::new(MEM, 1), 3)
        .expect("shells");
    let (clones, _) = parent
        .fork_remote(&hv, &ForkOptions::new(2), &shells)
        .expect("fork");
    clones[0]
        .run(0, Command::new(Op::Fill, DATA, 8, 1))
        .expect("write");
    drop(pool_workers);
    assert!(server.upgrade().is_some(), "serving while clones remain");
    drop(clones);
    drop(shells);
    assert!(
        server.upgrade().is_none(),
        "the fault server and its threads ended"
    );
    for pid in pids {
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid as i32, 0) };
        assert_eq!(r, -1, "worker {pid} exited and was reaped");
    }
}

#[test]
fn a_program_that_is_not_a_worker_is_a_clear_error() {
    if !common::kvm() {
        return;
    }
    let pool =
        Arc::new(Pool::new(&PoolConfig::uniform(MEM, 1, AllocatorKind::Magazine)).expect("pool"));
    let mm = Manager::new(pool, ManagerConfig::default());
    let e = WorkerPool::spawn(Path::new("/bin/true"), 1, &mm, 1).expect_err("not a worker");
    assert!(e.to_string().contains("serve_if_worker"), "{e}");
}

#[test]
fn vmm_fork_with_workers_verifies_every_clone_a_worker_holds() {
    if !common::kvm() {
        return;
    }
    for nodes in ["1", "2"] {
        let r = common::report(
            &[
                "fork",
                "--mem",
                "32M",
                "--clones",
                "4",
                "--workers",
                "2",
                "--nodes",
                nodes,
                "--phase1",
                "fill:seed=1:pages=2048",
                "--phase2",
                "fill:seed=2:pages=64:stride=64",
                "--json",
            ],
            0,
        );
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["frames_returned_at_exit"], true);
        assert_eq!(r["config"]["workers"], 2);
        assert_eq!(r["clones_from_shells"], 4);
        let vms = r["vms"].as_array().expect("vms");
        assert_eq!(vms.len(), 5);
        for v in &vms[1..] {
            assert_eq!(v["verified"], true, "{v}");
            // Its own 64 pages copied in this process, for a guest in a worker.
            assert_eq!(v["cow_copies"], 64, "{v}");
            assert_eq!(v["memory_pages"]["private"], 64, "{v}");
            // The worker's handler counted the faults it sent here (its window starts
            // as holes: the writes that copied are first faults too).
            assert!(v["faults"]["missing_write"].as_u64() > Some(0), "{v}");
        }
    }
}

#[test]
fn workers_with_what_they_cannot_do_yet_exit_2() {
    common::rejects(&["fork", "--workers", "65"], "between 1 and 64");
    common::rejects(
        &["fork", "--workers", "2", "--grandchild"],
        "--grandchild is not supported yet",
    );
    common::rejects(
        &["fork", "--workers", "2", "--vcpu-nodes", "0"],
        "--vcpu-nodes is not supported yet",
    );
    common::rejects(
        &["fork", "--workers", "2", "--corrupt", "clone 1"],
        "--corrupt of a clone is not supported yet",
    );
}

#[test]
fn clones_in_workers_past_the_timeout_are_stopped_and_named() {
    if !common::kvm() {
        return;
    }
    let endless = ["random:count=1073741824:pages=16"; 3].join(",");
    let t = std::time::Instant::now();
    let out = common::vmm(&[
        "fork",
        "--mem",
        "8M",
        "--clones",
        "2",
        "--workers",
        "2",
        "--timeout",
        "1",
        "--phase1",
        "fill:pages=16",
        "--phase2",
        &endless,
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // A hang bound, not a speed claim: the guests alone would run for about a minute.
    assert!(t.elapsed() < std::time::Duration::from_secs(30), "{err}");
    assert!(err.contains("--timeout of 1 s"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    for v in r["vms"].as_array().expect("vms") {
        assert_eq!(v["verified"], false, "{v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("--timeout of 1 s"),
            "every VM timed out, none lost: {v}"
        );
    }
}

/// Descriptors of VMs and their sockets that process `pid` has open now (KVM and
/// userfaultfd objects, eventfds, sockets; not what a library opens once, lazily).
#[cfg(feature = "failpoints")]
fn vm_fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| {
                let t = t.to_string_lossy();
                t.starts_with("anon_inode:") || t.starts_with("socket:")
            })
            .count()
    })
}

#[cfg(feature = "failpoints")]
#[test]
fn a_reply_the_worker_cannot_send_fails_that_request_and_the_worker_serves_on() {
    let Some((hv, pool, mm, parent)) = setup() else {
        return;
    };
    let pool_workers = workers(&mm, 1);
    let pid = pool_workers.pids()[0];
    let before = vm_fds_of(pid);
    // The reply to the next request (a batch of shells, with their sockets) fails to
    // send, as it would with ENOMEM.
    pool_workers.fail_next_reply(0).expect("arm");
    let e = pool_workers
        .shells(&VmConfig::new(MEM, 1), 2)
        .expect_err("the batch's reply never arrived");
    assert!(
        e.to_string().contains("could not send its reply"),
        "the request failed with the worker's reason: {e}"
    );
    // The shells no one knows are dropped in the worker (on its reaper thread).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while vm_fds_of(pid) != before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        vm_fds_of(pid),
        before,
        "the unsent shells' descriptors closed"
    );
    // The same worker serves on: clones forked into it see the parent's memory.
    let (shells, clones) = fork_into(&hv, &parent, &pool_workers, 2);
    assert!(clones.iter().all(|c| c.pid() == pid));
    for (k, c) in clones.iter().enumerate() {
        let r = c
            .run(0, Command::new(Op::Verify, DATA, FILLED, 11))
            .expect("clone verify");
        assert_eq!(r.mismatches(), 0, "clone {k} sees the parent's memory");
    }
    drop(clones);
    drop(shells);
    drop(pool_workers);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");
}

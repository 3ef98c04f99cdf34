//! Limits that VMs of one process share fail only the VM that hits them: two VMs on a
//! frame pool too small for both, and a VM whose window is fragmented past the host's
//! mapping limit (`vm.max_map_count`) next to a sibling. In both, the VM that runs out
//! stops with an error naming the limit, and its sibling, writing all along, keeps every
//! word it wrote. Runs in its own test binary (it takes this process to its mapping
//! limit); its tests run one at a time. Needs /dev/kvm (fails saying so unless
//! SKIP_KVM=1).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Order, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::sys::mman;
use vmm::{Command, ManagedVm, Op, VcpuError, VmConfig};

mod common;
use common::hypervisor;

const MIB: u64 = 1 << 20;
/// Pages the sibling writes.
const SIBLING_PAGES: u64 = 1024;

/// One test at a time: the mapping-limit test leaves no mapping for anything else.
static ALONE: Mutex<()> = Mutex::new(());

fn data(page: u64) -> Gfn {
    Gfn(DATA_START / 4096 + page)
}

fn manager(pool_bytes: u64, cfg: ManagerConfig) -> (Arc<Pool>, Arc<Manager>) {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(pool_bytes, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let mm = Manager::new(pool.clone(), cfg);
    (pool, mm)
}

fn verify(vm: &ManagedVm, start: Gfn, pages: u64, seed: u64) -> u64 {
    vm.vm()
        .run(0, Command::new(Op::Verify, start, pages, seed))
        .unwrap_or_else(|e| panic!("verify: {e}"))
        .mismatches()
}

/// Runs `sibling` rewriting and verifying its pages with a new seed each time until `stop`,
/// every command succeeding; returns the last seed written.
fn keep_writing(sibling: &ManagedVm, stop: &AtomicBool) -> u64 {
    let mut seed = 1;
    while !stop.load(Ordering::Relaxed) {
        seed += 1;
        sibling
            .vm()
            .run(0, Command::new(Op::Fill, data(0), SIBLING_PAGES, seed))
            .unwrap_or_else(|e| panic!("the sibling failed writing: {e}"));
        assert_eq!(
            verify(sibling, data(0), SIBLING_PAGES, seed),
            0,
            "seed {seed}"
        );
    }
    seed
}

/// Runs `cmd` on `vm` while `sibling` keeps writing; returns `cmd`'s outcome and the
/// sibling's last seed.
fn run_beside(
    vm: &ManagedVm,
    cmd: Command,
    sibling: &ManagedVm,
) -> (Result<vmm::CmdResult, VcpuError>, u64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| keep_writing(sibling, &stop));
        let r = vm.vm().run(0, cmd);
        stop.store(true, Ordering::Relaxed);
        (r, writer.join().expect("the sibling's writer"))
    })
}

#[test]
fn of_two_vms_on_a_pool_too_small_for_both_the_one_that_runs_out_fails_alone() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    // 16 MiB of frames: the sibling's 4 MiB fit, the other VM's 32 MiB do not.
    let (pool, mm) = manager(16 * MIB, ManagerConfig::default());
    let cfg = VmConfig::new(40 * MIB, 1);
    let sibling = ManagedVm::new(&hv, &cfg, &mm).expect("sibling");
    sibling
        .vm()
        .run(0, Command::new(Op::Fill, data(0), SIBLING_PAGES, 1))
        .expect("the sibling's first fill");
    let greedy = ManagedVm::new(&hv, &cfg, &mm).expect("the second VM");

    let (r, seed) = run_beside(
        &greedy,
        Command::new(Op::Fill, data(0), 8 * SIBLING_PAGES, 7),
        &sibling,
    );
    match r {
        Err(e @ VcpuError::FaultFailed { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("frame pool is exhausted"), "{msg}");
            assert!(msg.contains("give the pool more memory"), "{msg}");
        }
        other => panic!("expected the second VM to run out of frames, got {other:?}"),
    }
    assert_eq!(pool.free_frames(), 0, "the pool really ran out");
    sibling_outlives(sibling, greedy, seed);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_vm_fragmented_past_the_mapping_limit_fails_alone_beside_a_running_sibling() {
    fragmented_beside_a_sibling(false);
}

#[test]
fn a_vm_fragmented_past_its_window_budget_fails_alone_before_the_host_limit() {
    fragmented_beside_a_sibling(true);
}

/// A VM scattering its window over the pool until it fails, beside a running sibling:
/// with `budget`, the window's default mapping budget stops it (a quarter of the host's
/// limit, so the process keeps mappings for everyone else); without, the host limit.
fn fragmented_beside_a_sibling(budget: bool) {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    let limit = mman::max_map_count().expect("read vm.max_map_count");
    if limit > 100_000 {
        eprintln!("skipping: vm.max_map_count is {limit}, too high to reach quickly");
        return;
    }
    // One page per fault: pages touched in random order land on frames in that order, so
    // no two neighbours merge and the window becomes a mapping per page.
    let cfg = ManagerConfig {
        fault_around: Order::ZERO,
        ..ManagerConfig::default()
    };
    let (pool, mm) = manager(384 * MIB, cfg);
    let sibling = ManagedVm::new(&hv, &VmConfig::new(16 * MIB, 1), &mm).expect("sibling");
    sibling
        .vm()
        .run(0, Command::new(Op::Fill, data(0), SIBLING_PAGES, 1))
        .expect("the sibling's first fill");
    // 512 MiB, twice as many pages as the process may have mappings.
    let fragmented = ManagedVm::new(&hv, &VmConfig::new(512 * MIB, 1), &mm).expect("second VM");
    if !budget {
        fragmented.vm().window().set_map_budget(u64::MAX);
    }
    let before = mman::map_count().expect("count mappings");
    assert!(
        before + 1000 < limit,
        "{before} mappings of {limit} before the test"
    );
    let pages = 512 * MIB / 4096 - DATA_START / 4096;

    let (r, seed) = run_beside(
        &fragmented,
        Command::random(data(0), pages, 5, 4 * limit),
        &sibling,
    );
    match r {
        Err(e @ VcpuError::FaultFailed { .. }) if budget => {
            let msg = e.to_string();
            assert!(msg.contains("budget"), "{msg}");
            let used = fragmented.vm().window().host_mappings().expect("maps");
            let allowed = fragmented.vm().window().map_budget();
            // Plus the private page the failed fault was released onto (its vCPU stops).
            assert!(used <= allowed + 2, "{used} mappings, budget {allowed}");
            assert!(
                mman::map_count().expect("count") + limit / 2 < limit,
                "the process keeps most of its mappings"
            );
        }
        Err(e @ VcpuError::FaultFailed { .. }) => {
            assert!(e.is_host_limit(), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("vm.max_map_count"), "{msg}");
            assert!(msg.contains("sysctl -w vm.max_map_count="), "{msg}");
        }
        other => panic!("expected the mapping limit, got {other:?}"),
    }
    sibling_outlives(sibling, fragmented, seed);
    // The fault that met the limit may not have undone its host mapping (that needs a
    // mapping too): its frame stayed with the VM, and the exit's revoke freed it.
    assert_eq!(
        pool.free_frames(),
        pool.total_frames(),
        "every frame came back"
    );
}

/// Beside `failed`, the sibling has every word it wrote (`seed` over its first
/// `SIBLING_PAGES`) and is not failed; once `failed` is gone, the sibling maps new pages
/// again and still verifies. Consumes both.
fn sibling_outlives(sibling: ManagedVm, failed: ManagedVm, seed: u64) {
    assert!(sibling.vm().failure().is_none(), "only the other VM failed");
    assert_eq!(verify(&sibling, data(0), SIBLING_PAGES, seed), 0);
    drop(failed);
    sibling
        .vm()
        .run(
            0,
            Command::new(Op::Fill, data(SIBLING_PAGES), SIBLING_PAGES, 3),
        )
        .expect("the sibling fills new pages");
    assert_eq!(verify(&sibling, data(0), SIBLING_PAGES, seed), 0);
    assert_eq!(verify(&sibling, data(SIBLING_PAGES), SIBLING_PAGES, 3), 0);
}

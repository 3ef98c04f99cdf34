//! A KVM guest on guestmem-managed memory: every guest page is a pool frame the manager
//! chose, every fault goes through `AddressSpace::handle_fault`. Needs /dev/kvm (fails
//! saying so unless SKIP_KVM=1).

use std::sync::Arc;

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig, RegionSpec};
use vmm::guest::DATA_START;
use vmm::{Command, FaultResolver, Op, SpaceResolver, Vm, VmConfig};

mod common;
use common::hypervisor;

const MIB: u64 = 1 << 20;

#[test]
fn guest_fills_and_verifies_memory_managed_by_guestmem() {
    let Some(hv) = hypervisor() else { return };
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(64 * MIB, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    pool.prefault().expect("prefault");
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let free0 = pool.free_frames();
    let mem = 32 * MIB;
    let mut space = None;
    let vm = Vm::new(&hv, &VmConfig::new(mem, 2), |w| {
        let s = mm
            .create(
                &[RegionSpec {
                    start: Gfn(0),
                    pages: mem / 4096,
                }],
                w.clone(),
            )
            .map_err(vmm::FaultError::Space)?;
        space = Some(s.clone());
        Ok(Arc::new(SpaceResolver::new(s)) as Arc<dyn FaultResolver>)
    })
    .expect("VM on managed memory");
    let space = space.expect("space");
    let start = Gfn(DATA_START / 4096);
    let pages = 2048;
    vm.vcpus()[0]
        .submit(Command::new(Op::Fill, start, pages, 11))
        .expect("submit");
    vm.vcpus()[1]
        .submit(Command::new(Op::Fill, Gfn(start.0 + pages), pages, 12))
        .expect("submit");
    vm.vcpus()[0].wait().expect("fill 0");
    vm.vcpus()[1].wait().expect("fill 1");
    for (i, seed) in [(0, 11), (1, 12)] {
        let r = vm
            .run(
                1 - i,
                Command::new(Op::Verify, Gfn(start.0 + i as u64 * pages), pages, seed),
            )
            .expect("verify");
        assert_eq!(r.mismatches(), 0);
    }
    let c = space.counters();
    // Fault-around maps runs: far fewer faults than pages, every page zero-filled once.
    assert!(c.zero_fill_pages >= 2 * pages, "{c:?}");
    assert!(
        vm.fault_counts().total() < 2 * pages,
        "{:?}",
        vm.fault_counts()
    );
    assert!(space.memory().resident >= 2 * pages);
    // At most one mapping per mapped run plus the holes between them (runs of
    // file-contiguous frames merge into fewer).
    let maps = vm.window().host_mappings().expect("read /proc/self/maps");
    let runs = vm.fault_counts().total() + 12; // + the boot region's runs
    assert!(maps <= 2 * runs + 1, "{maps} host mappings for {runs} runs");
    drop(vm);
    space.exit();
    assert_eq!(
        pool.free_frames(),
        free0,
        "exiting the VM returns every frame"
    );
}

#[test]
fn paused_guest_forks_into_a_child_that_continues_the_same_command() {
    let Some(hv) = hypervisor() else { return };
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(128 * MIB, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    pool.prefault().expect("prefault");
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let mem = 96 * MIB;
    let regions = [RegionSpec {
        start: Gfn(0),
        pages: mem / 4096,
    }];
    let mut space = None;
    let parent = Vm::new(&hv, &VmConfig::new(mem, 1), |w| {
        let s = mm
            .create(&regions, w.clone())
            .map_err(vmm::FaultError::Space)?;
        space = Some(s.clone());
        Ok(Arc::new(SpaceResolver::new(s)) as Arc<dyn FaultResolver>)
    })
    .expect("parent VM");
    let space = space.expect("space");
    let pages = 2048;
    let v = &parent.vcpus()[0];
    // Catch a first-touch fill in flight (it faults, so it runs for tens of ms).
    let mut state = None;
    for attempt in 0..10 {
        // A fresh range each time: first-touch faults keep the fill running for a while.
        let start = Gfn(DATA_START / 4096 + attempt * pages);
        v.submit(Command::new(Op::Fill, start, pages, 20 + attempt))
            .expect("submit");
        std::thread::sleep(std::time::Duration::from_millis(3));
        parent.pause(); // vCPUs parked and queued faults resolved: a stable snapshot
        let st = v.save_state().expect("save");
        if st.in_flight.is_some() {
            state = Some((st, 20 + attempt, start));
            break;
        }
        parent.resume();
        v.wait().expect("fill");
    }
    let (st, seed, start) = state.expect("never caught the fill in flight");
    // Fork while paused; the child gets no boot code: its memory is the parent's.
    let mut child_space = None;
    let child = Vm::new(
        &hv,
        &VmConfig {
            load_guest: false,
            ..VmConfig::new(mem, 1)
        },
        |w| {
            let c = space.fork(w.clone()).map_err(vmm::FaultError::Space)?;
            child_space = Some(c.clone());
            Ok(Arc::new(SpaceResolver::new(c)) as Arc<dyn FaultResolver>)
        },
    )
    .expect("child VM");
    let child_space = child_space.expect("child space");
    child.vcpus()[0].restore_state(&st).expect("restore");
    parent.resume();
    v.wait().expect("parent finishes the fill");
    child.vcpus()[0]
        .wait()
        .expect("child finishes the same fill");
    for vm in [&parent, &child] {
        let r = vm
            .run(0, Command::new(Op::Verify, start, pages, seed))
            .expect("verify");
        assert_eq!(r.mismatches(), 0);
    }
    // From here they diverge: the child's writes never reach the parent.
    child
        .run(0, Command::new(Op::Fill, start, pages, 99))
        .expect("child fill");
    let p = parent
        .run(0, Command::new(Op::Verify, start, pages, seed))
        .expect("parent verify");
    assert_eq!(p.mismatches(), 0);
    let c = child
        .run(0, Command::new(Op::Verify, start, pages, 99))
        .expect("child verify");
    assert_eq!(c.mismatches(), 0);
    // Pages the parent had written before the fork were copied on the child's writes.
    if st.regs.r13 > start.gpa().0 + 4096 {
        assert!(child_space.counters().cow_copies > 0);
    }
    drop(child);
    drop(parent);
    child_space.exit();
    space.exit();
    assert_eq!(pool.free_frames(), pool.total_frames());
}

//! Fault containment: what goes wrong in one VM stays in that VM, and fails closed.
//!
//! - a panic in a VM's fault handler stops that VM (reported within a second, never a
//!   hang) while a sibling verifies every word;
//! - a guest in an endless loop is reported by `Vcpu::wait_deadline`, and the VM can
//!   still be dropped;
//! - pauses nest: a `resume` from another thread cannot unpark a vCPU that a fork holds
//!   paused, and forks of one VM run one at a time;
//! - a failed VM's faults are let through only inside its current window: a retired
//!   range is never mapped over;
//! - a window whose memory is scattered over the pool runs out of its own mapping
//!   budget, with a clear error, while a sibling window still maps.
//!
//! Needs /dev/kvm (fails saying so unless SKIP_KVM=1).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::{
    Command, FaultError, FaultKind, FaultResolver, ForkOptions, Hypervisor, ManagedVm, Op,
    ScaffoldResolver, VcpuError, Vm, VmConfig,
};

const MIB: u64 = 1 << 20;

fn hypervisor() -> Option<Hypervisor> {
    if !std::path::Path::new("/dev/kvm").exists() {
        if std::env::var("SKIP_KVM").as_deref() == Ok("1") {
            eprintln!("skipping: /dev/kvm is missing and SKIP_KVM=1");
            return None;
        }
        panic!("/dev/kvm is missing: these tests need KVM (set SKIP_KVM=1 to skip them)");
    }
    Some(Hypervisor::new().expect("open /dev/kvm"))
}

fn data(page: u64) -> Gfn {
    Gfn(DATA_START / 4096 + page)
}

/// A resolver that panics on its first fault at or above `from` once `armed`.
#[derive(Debug)]
struct PanicsAt {
    inner: ScaffoldResolver,
    from: Gfn,
    armed: AtomicBool,
}

impl FaultResolver for PanicsAt {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        if self.armed.load(Ordering::Relaxed) && gfn >= self.from {
            panic!("injected fault-handler panic at {gfn}");
        }
        self.inner.resolve(gfn, kind)
    }
}

fn scaffold_vm(hv: &Hypervisor, mem: u64, panics_from: Option<Gfn>) -> (Vm, Option<Arc<PanicsAt>>) {
    let mut hook = None;
    let vm = Vm::new(hv, &VmConfig::new(mem, 1), |w| {
        let inner = ScaffoldResolver::new(w.clone(), mem / 4096)?;
        Ok(match panics_from {
            Some(from) => {
                let r = Arc::new(PanicsAt {
                    inner,
                    from,
                    armed: AtomicBool::new(true),
                });
                hook = Some(r.clone());
                r as Arc<dyn FaultResolver>
            }
            None => Arc::new(inner) as Arc<dyn FaultResolver>,
        })
    })
    .expect("create VM");
    (vm, hook)
}

#[test]
fn a_panic_in_the_fault_handler_fails_only_its_vm_within_a_second() {
    let Some(hv) = hypervisor() else { return };
    let (sibling, _) = scaffold_vm(&hv, 8 * MIB, None);
    sibling
        .run(0, Command::new(Op::Fill, data(0), 256, 11))
        .expect("sibling fill");
    let (victim, hook) = scaffold_vm(&hv, 8 * MIB, Some(data(100)));
    assert!(hook.is_some());
    let v = victim.vcpu(0).expect("vCPU 0");
    v.submit(Command::new(Op::Fill, data(0), 256, 5))
        .expect("submit");
    let t = Instant::now();
    let r = v.wait_deadline(Some(Instant::now() + Duration::from_secs(5)));
    let took = t.elapsed();
    match r {
        Err(VcpuError::FaultFailed { reason, .. }) => {
            assert!(
                matches!(*reason, FaultError::Panicked(ref m) if m.contains("injected")),
                "{reason}"
            );
        }
        other => panic!("expected the VM to fail on the handler's panic, got {other:?}"),
    }
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
    assert!(matches!(
        victim.failure().as_deref(),
        Some(FaultError::Panicked(_))
    ));
    // The sibling runs on and holds every word it wrote.
    let r = sibling
        .run(0, Command::new(Op::Verify, data(0), 256, 11))
        .expect("sibling verify");
    assert_eq!(r.mismatches(), 0);
    sibling
        .run(0, Command::new(Op::Fill, data(256), 256, 12))
        .expect("sibling keeps faulting");
    drop(victim);
}

#[test]
fn a_guest_in_an_endless_loop_is_reported_at_the_deadline_and_the_vm_still_drops() {
    let Some(hv) = hypervisor() else { return };
    let (vm, _) = scaffold_vm(&hv, 8 * MIB, None);
    let v = vm.vcpu(0).expect("vCPU 0");
    v.submit(Command::random(data(0), 16, 1, u64::MAX))
        .expect("submit");
    let t = Instant::now();
    let r = v.wait_deadline(Some(Instant::now() + Duration::from_millis(300)));
    assert!(matches!(r, Err(VcpuError::Timeout(0))), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(300));
    // The command is still in flight: pausing parks it, and dropping the VM ends it.
    vm.pause();
    vm.resume();
    let t = Instant::now();
    drop(vm);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t.elapsed()
    );
}

#[test]
fn pauses_nest_so_a_resume_from_elsewhere_cannot_unpark_a_paused_vcpu() {
    let Some(hv) = hypervisor() else { return };
    let (vm, _) = scaffold_vm(&hv, 8 * MIB, None);
    let v = vm.vcpu(0).expect("vCPU 0");
    vm.pause();
    vm.pause();
    vm.resume();
    assert_eq!(v.pauses(), 1);
    assert!(
        matches!(
            v.submit(Command::new(Op::Fill, data(0), 1, 1)),
            Err(VcpuError::Paused(0))
        ),
        "still paused after one of two resumes"
    );
    vm.resume();
    assert_eq!(v.pauses(), 0);
    // A resume without a pause changes nothing.
    vm.resume();
    assert_eq!(v.pauses(), 0);
    vm.run(0, Command::new(Op::Fill, data(0), 1, 1))
        .expect("runs once every pause is undone");
    // A hold (what a fork takes) is not undone by anyone's resume.
    let hold = vm.hold();
    std::thread::scope(|s| {
        s.spawn(|| vm.resume());
    });
    assert!(v.is_stopped());
    assert!(matches!(
        v.submit(Command::new(Op::Fill, data(0), 1, 1)),
        Err(VcpuError::Paused(0))
    ));
    drop(hold);
    vm.run(0, Command::new(Op::Fill, data(0), 1, 1))
        .expect("runs once the hold is gone");
}

#[test]
fn forks_beside_a_thread_that_keeps_resuming_keep_every_byte() {
    let Some(hv) = hypervisor() else { return };
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(256 * MIB, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let cfg = VmConfig::new(16 * MIB, 1);
    let parent = ManagedVm::new(&hv, &cfg, &mm).expect("parent");
    parent
        .vm()
        .run(0, Command::new(Op::Fill, data(0), 512, 3))
        .expect("fill");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                parent.vm().resume();
                std::thread::yield_now();
            }
        });
        for round in 0..20u64 {
            // The parent writes while it is forked, from a command in flight.
            let v = parent.vm().vcpu(0).expect("vCPU 0");
            v.submit(Command::new(Op::Fill, data(512), 256, 100 + round))
                .expect("submit");
            let (clones, _) = parent
                .fork(&hv, &ForkOptions::new(1))
                .expect("fork beside resumes");
            v.wait().expect("parent's command");
            for c in &clones {
                let cv = c.vm().vcpu(0).expect("clone vCPU");
                match cv.wait() {
                    Ok(_) | Err(VcpuError::NothingInFlight(_)) => {}
                    Err(e) => panic!("clone's continued command: {e}"),
                }
                let r = c
                    .vm()
                    .run(0, Command::new(Op::Verify, data(0), 512, 3))
                    .expect("clone verify");
                assert_eq!(
                    r.mismatches(),
                    0,
                    "round {round}: clone lost snapshot bytes"
                );
            }
            let r = parent
                .vm()
                .run(0, Command::new(Op::Verify, data(512), 256, 100 + round))
                .expect("parent verify");
            assert_eq!(r.mismatches(), 0, "round {round}: parent lost its writes");
        }
        stop.store(true, Ordering::Relaxed);
    });
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_failed_vm_never_maps_over_a_retired_window_range() {
    let Some(hv) = hypervisor() else { return };
    let (vm, _) = scaffold_vm(&hv, 8 * MIB, None);
    let w = vm.window().clone();
    let old = w.host_base();
    let fresh = w.prepare_fresh().expect("fresh range");
    vm.pause();
    let (retired, len) = w.commit_fresh(fresh, &vm.vm_fd(), 0);
    assert_eq!(retired, old);
    let maps_before = mapping_of(retired);
    // A page of the retired range is not the window's: it is left alone.
    assert!(!w.release_page(retired + 4096));
    assert_eq!(
        mapping_of(retired),
        maps_before,
        "the retired range was mapped over"
    );
    // A page of the current window is released onto private memory.
    assert!(w.release_page(w.host_base() + 4096));
    vm::retire_now(retired, len);
}

/// The `/proc/self/maps` line that covers `addr`.
fn mapping_of(addr: u64) -> Option<String> {
    std::fs::read_to_string("/proc/self/maps")
        .ok()?
        .lines()
        .find(|l| {
            let Some((a, b)) = l.split_whitespace().next().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap_or(0),
                u64::from_str_radix(b, 16).unwrap_or(0),
            );
            (a..b).contains(&addr)
        })
        .map(str::to_string)
}

mod vm {
    /// Unmaps a retired range the test took out of a window.
    pub fn retire_now(addr: u64, len: u64) {
        vmm::window::retire(addr, len);
    }
}

fn scattered_maps(
    w: &vmm::Window,
    fd: std::os::fd::BorrowedFd<'_>,
    n: u64,
) -> Result<u64, guestmem::mmu::HostMmuError> {
    use guestmem::mmu::{HostMmu, MapRun};
    use guestmem::types::{NodeId, Pfn};
    // Every other page, each from a file offset no neighbour continues: no two merge.
    for i in 0..n {
        w.map_run(MapRun {
            gfn: Gfn(2 * i),
            pages: 1,
            node: NodeId(0),
            pfn: Pfn(0),
            fd,
            file_offset: (4 * i % 512) * 4096,
            writable: true,
        })?;
    }
    Ok(n)
}

#[test]
fn a_scattered_window_runs_out_of_its_own_mapping_budget_and_a_sibling_still_maps() {
    use guestmem::mmu::HostMmu;
    use std::os::fd::AsFd;
    let fd = vmm::sys::mman::memfd("budget", 512 * 4096).expect("memfd");
    let uffd = || Arc::new(vmm::sys::uffd::Uffd::new().expect("userfaultfd"));
    let a = vmm::Window::new(uffd(), 1024 * 4096).expect("window");
    let b = vmm::Window::new(uffd(), 1024 * 4096).expect("window");
    assert!(a.map_budget() >= 1024, "a sensible default budget");
    a.set_map_budget(100);
    let e = scattered_maps(&a, fd.as_fd(), 400).unwrap_err();
    let typed = e
        .source
        .get_ref()
        .and_then(|s| s.downcast_ref::<vmm::WindowError>());
    match typed {
        Some(vmm::WindowError::MapBudget { used, budget: 100 }) => {
            assert!(*used <= 100, "never past the budget: {used}");
        }
        other => panic!("expected MapBudget, got {other:?} ({e})"),
    }
    assert!(e.to_string().contains("budget"), "{e}");
    let used = a.host_mappings().expect("maps");
    assert!(used <= 100, "the window holds at most its budget: {used}");
    // The sibling, on the default budget, maps four times as much.
    assert_eq!(
        scattered_maps(&b, fd.as_fd(), 400).expect("sibling maps"),
        400
    );
    assert!(b.host_mappings().expect("maps") > 400);
    // A page number whose address would wrap into the window is refused, not mapped.
    let wrapped = a.map_run(guestmem::mmu::MapRun {
        gfn: Gfn((1 << 52) + 2),
        pages: 1,
        node: guestmem::types::NodeId(0),
        pfn: guestmem::types::Pfn(0),
        fd: fd.as_fd(),
        file_offset: 0,
        writable: true,
    });
    assert!(wrapped.is_err(), "a wrapping gfn must be out of range");
    // Dropping the whole range gives the window its budget back.
    a.unmap_run(Gfn(0), 1024).expect("unmap");
    assert_eq!(scattered_maps(&a, fd.as_fd(), 40).expect("maps again"), 40);
}

fn mm_with_pool(bytes: u64) -> (Arc<Pool>, Arc<Manager>) {
    let pool =
        Arc::new(Pool::new(&PoolConfig::uniform(bytes, 1, AllocatorKind::Magazine)).expect("pool"));
    (pool.clone(), Manager::new(pool, ManagerConfig::default()))
}

fn cmd(
    vm: &ManagedVm,
    op: Op,
    start: Gfn,
    pages: u64,
    seed: u64,
) -> Result<vmm::CmdResult, VcpuError> {
    vm.vm().run(0, Command::new(op, start, pages, seed))
}

/// A KVM clone forked with a reservation copies that many pages even after a greedy
/// sibling has taken every other frame; without one, the same clone runs out.
fn clone_against_a_greedy_sibling(reserve_pages: u64) -> Result<u64, VcpuError> {
    let hv = Hypervisor::new().expect("open /dev/kvm");
    let (pool, mm) = mm_with_pool(48 * MIB);
    let parent = ManagedVm::new(&hv, &VmConfig::new(16 * MIB, 1), &mm).expect("parent");
    cmd(&parent, Op::Fill, data(0), 1024, 1).expect("fill");
    let opts = ForkOptions {
        clones: 1,
        reserve_pages,
        parent: vmm::ParentMode::Rebirth,
    };
    let (mut clones, _) = parent.fork(&hv, &opts).expect("fork");
    let clone = clones.pop().expect("clone");
    assert_eq!(clone.space().charge().reserved, reserve_pages);
    // The greedy sibling fills until the pool (or what is not reserved) runs out: it
    // fails alone.
    let greedy = ManagedVm::new(&hv, &VmConfig::new(64 * MIB, 1), &mm).expect("greedy");
    let r = cmd(&greedy, Op::Fill, data(0), 15_000, 9);
    assert!(
        matches!(r, Err(VcpuError::FaultFailed { .. })),
        "the greedy VM must run out: {r:?}"
    );
    // The clone rewrites its first 1024 pages (1024 copies) and verifies them.
    let result = cmd(&clone, Op::Fill, data(0), 1024, 7)
        .and_then(|_| cmd(&clone, Op::Verify, data(0), 1024, 7))
        .map(|r| r.mismatches());
    // The parent, whatever happened, still has its own bytes.
    let bad = cmd(&parent, Op::Verify, data(0), 1024, 1).expect("parent verify");
    assert_eq!(bad.mismatches(), 0);
    drop((clone, greedy, parent));
    assert_eq!(pool.free_frames(), pool.total_frames());
    assert_eq!(mm.live_charges(), 0);
    result
}

#[test]
fn a_clones_reservation_holds_against_a_greedy_sibling() {
    if hypervisor().is_none() {
        return;
    }
    // fault-around may copy up to 64 pages per fault: 1024 pages need at most 1024+63.
    assert_eq!(
        clone_against_a_greedy_sibling(1100).expect("reserved copies"),
        0
    );
    // The check can fail: without the reservation the sibling took the frames.
    assert!(clone_against_a_greedy_sibling(0).is_err());
}

#[test]
fn a_vm_at_its_frame_limit_fails_alone_and_its_sibling_verifies() {
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = mm_with_pool(64 * MIB);
    let capped = ManagedVm::new(&hv, &VmConfig::new(16 * MIB, 1), &mm).expect("capped");
    let sibling = ManagedVm::new(&hv, &VmConfig::new(16 * MIB, 1), &mm).expect("sibling");
    capped.space().set_limit(Some(1000));
    match cmd(&capped, Op::Fill, data(0), 2000, 3) {
        Err(VcpuError::FaultFailed { reason, .. }) => {
            let msg = reason.to_string();
            assert!(msg.contains("memory limit"), "{msg}");
        }
        other => panic!("expected the limit to stop it, got {other:?}"),
    }
    assert!(capped.space().charge().usage <= 1000);
    cmd(&sibling, Op::Fill, data(0), 3000, 4).expect("sibling fills");
    let bad = cmd(&sibling, Op::Verify, data(0), 3000, 4).expect("sibling verifies");
    assert_eq!(bad.mismatches(), 0);
    drop((capped, sibling));
    assert_eq!(pool.free_frames(), pool.total_frames());
}

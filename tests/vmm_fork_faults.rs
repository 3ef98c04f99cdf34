//! Fault containment of snapshot-fork: a failure injected at every fallible step of a
//! fork (shell creation, state save, rebirth, address-space fork, state restore, plus
//! the reverse map's own allocation failpoint) leaves the parent running with every word
//! it wrote, the fork returns the typed error, and nothing leaks: open descriptors, free
//! pool frames and `/proc/self/maps` lines are back at their baseline after 100 failed
//! forks, and the VM still forks. A clone that fails midway for a reason of its own (a
//! shell that already has memory) rolls the fork back the same way. These tests count
//! the whole process's descriptors, so they live here, one at a time, in a test binary
//! of their own. Needs /dev/kvm (fails saying so unless SKIP_KVM=1) and
//! the `vmm/failpoints` feature (the root package's dev-dependency turns it on).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig, SpaceError};
use vmm::failpoint::{self, DEFAULT_ERRNO, ForkStep};
use vmm::guest::DATA_START;
use vmm::{
    Command, FaultError, ForkError, ForkOptions, Hypervisor, ManagedVm, Op, VcpuError, VmConfig,
    VmError, WindowError, open_fds,
};

mod common;
use common::hypervisor;

/// Failpoints and the counts are process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());
const MIB: u64 = 1 << 20;
const VCPUS: u32 = 2;
/// Pages each vCPU writes.
const SLICE: u64 = 256;
/// Clones per fork: the injected failure hits the second, so the first must be undone.
const CLONES: usize = 2;
/// Failed forks in all.
const FAILED_FORKS: usize = 100;

/// What must come back to baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    fds: u64,
    free_frames: u64,
    /// `/proc/self/maps` lines outside the VM's current window.
    maps: u64,
    /// KiB mapped outside the VM's window and the brk heap: a leaked range merged into a
    /// neighbouring mapping adds no line, but adds its size.
    mapped_kib: u64,
    /// Threads of the process (a leaked thread would hide in the maps count: its stack
    /// comes from glibc's cache, mapped either way).
    threads: u64,
    /// Reverse-map chain entries and anon_vmas alive (a failed clone's address space
    /// must be unlinked and freed, not just exited).
    avcs: u64,
    anon_vmas: u64,
}

/// Brings glibc's process-lifetime caches to their limits, so that they do not grow
/// under the test and read as leaks: malloc arenas (8 per core at most, one 64 MiB
/// mapping each, made for new threads and never returned) and cached thread stacks (up
/// to 40 MiB of them stay mapped after their threads end).
fn saturate_libc_caches() {
    let n = 8 * std::thread::available_parallelism().map_or(2, usize::from) + 24;
    let all = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let all = all.clone();
            std::thread::spawn(move || {
                let v = std::hint::black_box(vec![0u8; 4096]);
                all.wait();
                drop(v);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a warm-up thread");
    }
}

fn counts(pool: &Pool, vm: &ManagedVm) -> Counts {
    // The VM's own window is left out: how its runs merge into host mappings depends on
    // the order its pages faulted back in after a fork, not on anything leaking.
    let rmap = vm.space().manager().rmap().snapshot();
    let window = vm
        .vm()
        .window()
        .host_mappings()
        .expect("the window's mappings");
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    Counts {
        fds: open_fds().expect("count /proc/self/fd"),
        free_frames: pool.free_frames(),
        maps: maps.lines().count() as u64 - window,
        mapped_kib: mapped_outside(&maps, vm) / 1024,
        avcs: rmap.avcs_allocated - rmap.avcs_freed,
        anon_vmas: rmap.anon_vmas_allocated - rmap.anon_vmas_freed,
        threads: std::fs::read_dir("/proc/self/task")
            .expect("read /proc/self/task")
            .count() as u64,
    }
}

/// Bytes of the mappings in `maps` outside `vm`'s window and the brk heap (which grows
/// and shrinks with malloc).
fn mapped_outside(maps: &str, vm: &ManagedVm) -> u64 {
    let lo = vm.vm().window().host_base();
    let hi = lo + vm.vm().window().size();
    maps.lines()
        .filter(|l| !l.ends_with("[heap]"))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .map(|(a, b)| b.saturating_sub(a) - b.min(hi).saturating_sub(a.max(lo)))
        .sum()
}

/// The counts once background teardown (window-retire threads, exiting vCPU threads) is
/// done: polls until they equal `want`, or stop changing for half a second, at most 10 s.
fn settled(pool: &Pool, vm: &ManagedVm, want: Counts) -> Counts {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = counts(pool, vm);
    let mut stable_since = Instant::now();
    loop {
        if last == want
            || Instant::now() >= deadline
            || stable_since.elapsed() >= Duration::from_millis(500)
        {
            return last;
        }
        std::thread::sleep(Duration::from_millis(10));
        let now = counts(pool, vm);
        if now != last {
            stable_since = Instant::now();
        }
        last = now;
    }
}

/// Pages the in-flight command writes (one word each), past the slices.
const TOUCHED: u64 = 512;

fn dirty() -> Command {
    Command::new(Op::Dirty, slice(VCPUS), TOUCHED, 0)
}

fn slice(vcpu: u32) -> Gfn {
    Gfn(DATA_START / 4096 + u64::from(vcpu) * SLICE)
}

/// A command that has not finished after this long is stuck: a parent left held by a
/// failed fork would never finish one.
fn deadline() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

/// Every vCPU fills its slice with `seed + vcpu`, all at once.
fn write(vm: &ManagedVm, seed: u64) {
    for (i, v) in vm.vm().vcpus().iter().enumerate() {
        v.submit(Command::new(
            Op::Fill,
            slice(i as u32),
            SLICE,
            seed + i as u64,
        ))
        .unwrap_or_else(|e| panic!("fill on vCPU {i}: {e}"));
    }
    for (i, v) in vm.vm().vcpus().iter().enumerate() {
        v.wait_deadline(deadline())
            .unwrap_or_else(|e| panic!("fill on vCPU {i}: {e}"));
    }
}

/// Every vCPU verifies its slice holds `seed + vcpu`, word for word.
fn verify(vm: &ManagedVm, seed: u64, who: &str) {
    for (i, v) in vm.vm().vcpus().iter().enumerate() {
        v.submit(Command::new(
            Op::Verify,
            slice(i as u32),
            SLICE,
            seed + i as u64,
        ))
        .unwrap_or_else(|e| panic!("{who}: verify on vCPU {i}: {e}"));
        let r = v
            .wait_deadline(deadline())
            .unwrap_or_else(|e| panic!("{who}: verify on vCPU {i}: {e}"));
        assert_eq!(r.mismatches(), 0, "{who}: vCPU {i}'s slice lost words");
    }
}

/// One injection: which step, how many of its calls pass first, and the error the fork
/// must return (`None`: the fork absorbs the failure and succeeds).
#[derive(Debug, Clone, Copy)]
struct Case {
    step: Injection,
    skip: u32,
    expect: Option<fn(&ForkError) -> bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injection {
    /// A `vmm::failpoint` step.
    Step(ForkStep),
    /// The reverse map's allocation failpoint (inside `AddressSpace::fork`).
    RmapAlloc,
}

fn kvm_op(e: &VmError, want: &str) -> bool {
    matches!(e, VmError::Kvm { op, source } if *op == want
        && source.raw_os_error() == Some(DEFAULT_ERRNO))
}

fn second_clone(e: &ForkError, f: impl Fn(&VmError) -> bool) -> bool {
    matches!(e, ForkError::Clone { index: 1, source } if f(source))
}

/// Every step, with the call that fails chosen so that something before it in the same
/// fork was already made: the second vCPU, the second clone.
fn cases() -> Vec<Case> {
    let per_clone = VCPUS;
    let case = |step, skip, expect| Case {
        step: Injection::Step(step),
        skip,
        expect,
    };
    vec![
        case(
            ForkStep::ShellUffd,
            1,
            Some(|e| {
                second_clone(e, |v| {
                    matches!(v, VmError::Uffd(vmm::sys::uffd::UffdError::Open(_)))
                })
            }),
        ),
        case(
            ForkStep::ShellVm,
            1,
            Some(|e| second_clone(e, |v| kvm_op(v, "KVM_CREATE_VM"))),
        ),
        case(
            ForkStep::ShellMemslot,
            1,
            Some(|e| {
                second_clone(e, |v| {
                    matches!(v, VmError::Window(WindowError::Memslot(s))
                        if s.raw_os_error() == Some(DEFAULT_ERRNO))
                })
            }),
        ),
        case(
            // One handler thread per vCPU (up to the most): skip the first shell's.
            ForkStep::ShellHandler,
            per_clone.min(vmm::Vm::MAX_FAULT_HANDLERS),
            Some(|e| second_clone(e, |v| kvm_op(v, "spawn the fault handler thread"))),
        ),
        case(
            ForkStep::ShellVcpu,
            per_clone + 1,
            Some(|e| second_clone(e, |v| kvm_op(v, "KVM_CREATE_VCPU"))),
        ),
        case(
            ForkStep::SaveState,
            1,
            Some(|e| {
                matches!(e, ForkError::Save(VcpuError::Kvm { op: "KVM_GET_REGS", source })
                    if source.raw_os_error() == Some(DEFAULT_ERRNO))
            }),
        ),
        case(ForkStep::RebirthFresh, 0, None),
        case(ForkStep::RebirthVm, 0, None),
        case(ForkStep::RebirthMemslot, 0, None),
        case(ForkStep::RebirthVcpu, 1, None),
        case(ForkStep::RebirthLoad, 1, None),
        case(
            ForkStep::SpaceFork,
            1,
            Some(|e| {
                second_clone(e, |v| {
                    matches!(
                        v,
                        VmError::Fault(FaultError::Space(SpaceError::Rmap { .. }))
                    )
                })
            }),
        ),
        case(
            ForkStep::ProtectForFork,
            1,
            Some(|e| {
                second_clone(e, |v| {
                    matches!(
                        v,
                        VmError::Fault(FaultError::Space(SpaceError::Host { .. }))
                    )
                })
            }),
        ),
        case(
            ForkStep::RestoreState,
            per_clone + 1,
            Some(|e| {
                matches!(
                    e,
                    ForkError::Restore {
                        index: 1,
                        source: VcpuError::Kvm {
                            op: "KVM_SET_SREGS",
                            ..
                        }
                    }
                )
            }),
        ),
        Case {
            step: Injection::RmapAlloc,
            skip: 0,
            expect: Some(|e| {
                matches!(
                    e,
                    ForkError::Clone {
                        index: 0,
                        source: VmError::Fault(FaultError::Space(SpaceError::Rmap {
                            source: rmap::RmapError::AllocFailed { .. },
                            ..
                        }))
                    }
                )
            }),
        },
    ]
}

fn arm(mm: &Manager, inj: Injection, skip: u32) {
    match inj {
        Injection::Step(s) => failpoint::arm(s, skip, DEFAULT_ERRNO),
        Injection::RmapAlloc => mm.rmap().fail_allocations_after(u64::from(skip)),
    }
}

fn disarm(mm: &Manager) {
    failpoint::disarm_all();
    mm.rmap().clear_failpoint();
}

/// Forks `parent` into [`CLONES`] clones, by turns through a shell pool filled before
/// the pause ([`ManagedVm::fork`]) and with the clones made inside it (`fork_with`).
fn fork(hv: &Hypervisor, parent: &ManagedVm, round: usize) -> Result<Vec<ManagedVm>, ForkError> {
    let opts = ForkOptions::new(CLONES);
    let r = if round % 2 == 0 {
        parent.fork(hv, &opts)
    } else {
        parent.fork_with(hv, &opts, None)
    };
    r.map(|(clones, _)| clones)
}

/// One failing (or absorbed) fork of `parent`, which has `seed` written: the fork returns
/// what `case` expects, and the parent, with a command in flight across the fork, goes
/// on and verifies.
fn inject_once(
    hv: &Hypervisor,
    mm: &Manager,
    parent: &ManagedVm,
    case: Case,
    round: usize,
    seed: u64,
) {
    // The last vCPU writes across the fork (its pages fault in from the manager once a
    // fork has reborn the parent, so the command is often in flight at the pause): its
    // state is saved mid-command, a clone may continue it and copy pages before the
    // rollback, and the parent must go on with it.
    let last = parent.vm().vcpus().last().expect("a vCPU");
    last.submit(dirty()).expect("submit the in-flight write");
    let vm_fd = parent.vm().vm_fd();
    arm(mm, case.step, case.skip);
    let r = fork(hv, parent, round);
    disarm(mm);
    last.wait_deadline(deadline())
        .unwrap_or_else(|e| panic!("{case:?}: the in-flight write: {e}"));
    match (r, case.expect) {
        (Err(e), Some(expect)) => assert!(expect(&e), "{case:?}: unexpected error {e:?}"),
        (Ok(clones), None) => {
            // Absorbed: the parent stayed in its VM, write-protected instead of reborn,
            // and every clone holds the parent's words.
            assert!(
                Arc::ptr_eq(&vm_fd, &parent.vm().vm_fd()),
                "{case:?}: the parent was reborn although rebirth failed"
            );
            for (i, c) in clones.iter().enumerate() {
                verify(c, seed, &format!("{case:?}: clone {i}"));
            }
        }
        (Ok(_), Some(_)) => panic!("{case:?}: the fork succeeded"),
        (Err(e), None) => panic!("{case:?}: the fork should have absorbed it, got {e:?}"),
    }
    verify(parent, seed, &format!("{case:?}: parent after the fork"));
}

#[test]
fn a_failure_at_every_fork_step_leaves_the_parent_running_and_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(hv) = hypervisor() else { return };
    saturate_libc_caches();
    let cases = cases();
    let per_case = FAILED_FORKS.div_ceil(cases.len());
    let mut failed = 0;
    for (n, &case) in cases.iter().enumerate() {
        let pool = Arc::new(
            Pool::new(&PoolConfig::uniform(64 * MIB, 1, AllocatorKind::Magazine)).expect("pool"),
        );
        let mm = Manager::new(pool.clone(), ManagerConfig::default());
        let parent = ManagedVm::new(&hv, &VmConfig::new(32 * MIB, VCPUS), &mm).expect("parent");
        let mut seed = 1000 * n as u64;
        write(&parent, seed);
        verify(&parent, seed, "parent before any fork");
        // The in-flight writes' pages get their frames now, before the baseline.
        parent.vm().run(0, dirty()).expect("dirty");
        let base = settled(&pool, &parent, counts(&pool, &parent));

        // The first fork, checked on its own.
        inject_once(&hv, &mm, &parent, case, 0, seed);
        failed += usize::from(case.expect.is_some());
        assert_eq!(
            settled(&pool, &parent, base),
            base,
            "{case:?}: after one fork"
        );

        // Then again and again, with new words each time (the window is dirty again, so
        // every fork reborns the parent). An absorbed failure is paired with a failing
        // restore, so that each of these forks fails.
        for round in 1..per_case {
            seed += 10;
            write(&parent, seed);
            if case.expect.is_some() {
                inject_once(&hv, &mm, &parent, case, round, seed);
            } else {
                failpoint::arm(ForkStep::RestoreState, VCPUS + 1, DEFAULT_ERRNO);
                inject_once(
                    &hv,
                    &mm,
                    &parent,
                    Case {
                        expect: cases
                            .iter()
                            .find(|c| c.step == Injection::Step(ForkStep::RestoreState))
                            .and_then(|c| c.expect),
                        ..case
                    },
                    round,
                    seed,
                );
            }
            failed += 1;
        }
        assert_eq!(
            settled(&pool, &parent, base),
            base,
            "{case:?}: after {per_case} forks (fds, free frames, maps lines)"
        );

        // Still forkable, and the clones hold the parent's words.
        let clones = fork(&hv, &parent, 0).expect("a fork with nothing armed");
        for (i, c) in clones.iter().enumerate() {
            verify(c, seed, &format!("{case:?}: clone {i} of the good fork"));
        }
        verify(
            &parent,
            seed,
            &format!("{case:?}: parent after the good fork"),
        );
        drop(clones);
        assert_eq!(
            settled(&pool, &parent, base),
            base,
            "{case:?}: after the good fork"
        );
        drop(parent);
        assert_eq!(pool.free_frames(), pool.total_frames(), "{case:?}: at exit");
    }
    assert!(failed >= FAILED_FORKS, "only {failed} forks failed");
}

/// Polls `f` until it holds or two seconds pass (the old VM's fds close on a
/// background thread).
fn eventually(f: impl Fn() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    f()
}

#[test]
fn a_clone_that_cannot_be_made_midway_rolls_the_fork_back() {
    let Some(hv) = hypervisor() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pool, _mm, parent) = common::filled_parent(&hv);
    let cfg = parent.vm().config().clone();
    let fds = open_fds().expect("count fds");
    let free = pool.free_frames();
    // Clone 0 gets a good shell; clone 1 one that already has memory: it fails.
    let shells = vmm::ShellPool::new(&cfg);
    let broken = vmm::Vm::shell(
        &hv,
        &VmConfig {
            load_guest: false,
            ..cfg.clone()
        },
    )
    .expect("shell");
    broken.attach(Arc::new(vmm::HostBacked)).expect("attach");
    shells.push(broken);
    shells.fill(&hv, 2).expect("a good shell");
    match parent.fork_with(&hv, &ForkOptions::new(3), Some(&shells)) {
        Err(ForkError::Clone { index: 1, .. }) => {}
        other => panic!("expected clone 1 to fail, got {other:?}"),
    }
    assert!(shells.is_empty());
    drop(shells);
    assert_eq!(pool.free_frames(), free, "clone 0's frames went back");
    assert!(
        eventually(|| open_fds() == Some(fds)),
        "every clone's and shell's fds closed: {:?} vs {fds}",
        open_fds()
    );
    // The parent runs on with its memory intact.
    let (gfn, pages, seed) = common::FILLED;
    let r = parent
        .vm()
        .run(0, Command::new(Op::Verify, gfn, pages, seed))
        .expect("verify");
    assert_eq!(r.mismatches(), 0);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

//! `guest_faults`: first-touch and copy-on-write pages per second inside a KVM guest on
//! the managed path, against the standard VMM design measured in the same run.
//!
//! Variants (all: one VM, one vCPU running the built-in guest's `fill` over `pages` pages,
//! 4 KiB each fully written; handler and vCPU pinned to CPU 0 unless the name says
//! `unpinned`):
//! Both sides start cold (no host memory allocated for guest RAM) unless the name says
//! `prefaulted` (host memory allocated and zeroed before the run: `fallocate` of the
//! standard design's memfd, `Pool::prefault` of the manager's pool); compare cold with
//! cold and prefaulted with prefaulted.
//!
//! - `standard`: guest RAM is one `MAP_SHARED` memfd mapping the host kernel populates on
//!   first touch (no userfaultfd); its clone is a `MAP_PRIVATE` mapping of the parent's
//!   memfd, as Firecracker and Cloud Hypervisor restore clones (COW by the host kernel).
//! - `managed`: guestmem (`AddressSpace::handle_fault`) behind userfaultfd with the
//!   manager's defaults (fault-around 64 pages; adaptive copy-on-write runs of up to 64:
//!   one page for an isolated write, doubling behind a rewrite); COW after
//!   `AddressSpace::fork` write-protects the parent.
//! - `managed-fixed`: as `managed` with the older fixed runs (every COW fault copies the
//!   aligned 64 pages around it).
//! - `managed-run16`, `managed-run512`: as `managed` with copy-on-write runs of at most 16
//!   and 512 pages (2 MiB).
//! - `managed-single`: fault-around and copy-on-write runs off (one fault per page).
//! - `managed-unpinned`: as `managed`, threads left to the scheduler.
//! - `host-fork`: the host kernel's own COW fault cost (fork, then the parent writes one
//!   byte per page), for the "COW per page no more than the host kernel's" target.
//!
//! First touch fills every byte of each page; the copy-on-write phase writes one word per
//! page (as the host reference writes one byte per page): the dense case. Then a second
//! fork and a sparse phase: `random` writes to about one page in 100; `cow_amp_sparse` is
//! the pages that phase copied over the distinct pages it wrote (1.0: only what is
//! written), `cow_amp_dense` the same for the dense phase.
//!
//! Metrics: `first_touch_ns` and `cow_ns` per page (best of the samples), faults per page
//! in each phase, `handler_ns` (resolve + wake) and `resolve_ns` (guestmem) per fault. Run: `cargo bench --bench guest_faults -- --quick`.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::mmu::NoopMmu;
use guestmem::types::{Gfn, Gpa};
use guestmem::{
    AllocatorKind, CowRun, Manager, ManagerConfig, Order, Pool, PoolConfig, RegionSpec,
};
use kvmm::{Experiment, Mode, Row};
use vmm::guest::DATA_START;
use vmm::sys::mman;
use vmm::{Command, FaultResolver, HostBacked, Hypervisor, Op, SpaceResolver, Vm, VmConfig};

const MIB: u64 = 1 << 20;

struct Sample {
    first_touch: Duration,
    cow: Duration,
    faults: u64,
    first_touch_faults: u64,
    handler_ns: u64,
    resolve_ns: u64,
    /// Pages copied / distinct pages written, dense and sparse phases (managed only).
    amp: Option<(f64, f64)>,
}

fn fill(vm: &Vm, pages: u64, seed: u64) -> Duration {
    let t = Instant::now();
    vm.run(
        0,
        Command::new(Op::Fill, Gfn(DATA_START / 4096), pages, seed),
    )
    .unwrap_or_else(|e| panic!("guest fill failed: {e}"));
    t.elapsed()
}

/// The copy-on-write phase: the guest writes one word in every page (`dirty`), so that a
/// page costs what the host kernel's COW reference costs: one fault and one copy.
fn dirty(vm: &Vm, pages: u64, seed: u64) -> Duration {
    let t = Instant::now();
    vm.run(
        0,
        Command::new(Op::Dirty, Gfn(DATA_START / 4096), pages, seed),
    )
    .unwrap_or_else(|e| panic!("guest dirty failed: {e}"));
    t.elapsed()
}

/// After `dirty` with `seed` over a page filled with `old`: the first word is new, the
/// rest of the page was copied from the shared frame.
fn check_dirty(vm: &Vm, pages: u64, seed: u64, old: u64) {
    for p in (0..pages).step_by(97) {
        let gpa = DATA_START + p * 4096;
        let first = vm.read_u64(Gpa(gpa)).expect("read");
        let second = vm.read_u64(Gpa(gpa + 8)).expect("read");
        assert_eq!(
            first,
            vmm::guest::pattern(seed, gpa),
            "page {p} not written"
        );
        assert_eq!(
            second,
            vmm::guest::pattern(old, gpa + 8),
            "page {p} not copied"
        );
    }
}

fn verify(vm: &Vm, pages: u64, seed: u64) {
    let r = vm
        .run(
            0,
            Command::new(Op::Verify, Gfn(DATA_START / 4096), pages, seed),
        )
        .unwrap_or_else(|e| panic!("guest verify failed: {e}"));
    assert_eq!(r.mismatches(), 0, "guest memory corrupted");
}

fn mem_for(pages: u64) -> u64 {
    (DATA_START + pages * 4096).next_multiple_of(2 * MIB)
}

fn standard(hv: &Hypervisor, pages: u64, prefault: bool) -> Sample {
    let mem = mem_for(pages);
    let fd = mman::memfd("standard-ram", mem).expect("memfd");
    if prefault {
        // SAFETY: fallocate on a memfd this function owns; no memory is touched.
        let r = unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, mem as libc::off_t) };
        assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    }
    let cfg = VmConfig {
        cpu: Some(0),
        ..VmConfig::new(mem, 1)
    };
    let parent = Vm::new(hv, &cfg, |w| {
        w.map_host_backed(fd.as_fd(), false)?;
        Ok(Arc::new(HostBacked) as Arc<dyn FaultResolver>)
    })
    .expect("standard VM");
    let first_touch = fill(&parent, pages, 1);
    verify(&parent, pages, 1);
    let clone = Vm::new(hv, &cfg, |w| {
        w.map_host_backed(fd.as_fd(), true)?;
        Ok(Arc::new(HostBacked) as Arc<dyn FaultResolver>)
    })
    .expect("standard clone");
    // Boot pages were rewritten identically by the clone's constructor: same bytes.
    verify(&clone, pages, 1);
    let cow = dirty(&clone, pages, 2);
    check_dirty(&clone, pages, 2, 1);
    verify(&parent, pages, 1);
    Sample {
        first_touch,
        cow,
        faults: 0,
        first_touch_faults: 0,
        handler_ns: 0,
        resolve_ns: 0,
        amp: None,
    }
}

/// A managed VM: `fault_around` and `cow_around` are orders (0: off).
fn managed(
    hv: &Hypervisor,
    pages: u64,
    around: (u32, u32),
    cow_run: CowRun,
    cpu: Option<usize>,
    prefault: bool,
) -> Sample {
    let (fault_around, cow_around) = around;
    let mem = mem_for(pages);
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(3 * mem, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    if prefault {
        pool.prefault().expect("prefault the pool");
    }
    let mm = Manager::new(
        pool,
        ManagerConfig {
            fault_around: Order::new(fault_around).unwrap_or(Order::ZERO),
            cow_around: Order::new(cow_around).unwrap_or(Order::ZERO),
            cow_run,
            ..ManagerConfig::default()
        },
    );
    let mut space = None;
    let vm = Vm::new(
        hv,
        &VmConfig {
            cpu,
            ..VmConfig::new(mem, 1)
        },
        |w| {
            // `managed-single` maps every page on its own: more host mappings than the
            // default per-window budget (a quarter of vm.max_map_count).
            w.set_map_budget(u64::MAX);
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
        },
    )
    .expect("managed VM");
    let space = space.expect("space");
    let f0 = vm.fault_counts();
    let first_touch = fill(&vm, pages, 1);
    let f1 = vm.fault_counts();
    verify(&vm, pages, 1);
    let child = space
        .fork(Arc::new(NoopMmu))
        .expect("fork the address space");
    let c0 = vm.fault_counts();
    let copies0 = space.counters().cow_copies;
    let cow = dirty(&vm, pages, 2);
    let c1 = vm.fault_counts();
    check_dirty(&vm, pages, 2, 1);
    assert!(
        space.counters().cow_copies - copies0 >= pages,
        "every page must be copied (alone or in a copy-on-write run)"
    );
    assert!(c1.total() > c0.total(), "writes must fault");
    let faults = (f1.total() - f0.total()) + (c1.total() - c0.total());
    let handler_ns = (f1.handler_ns - f0.handler_ns) + (c1.handler_ns - c0.handler_ns);
    let resolve_ns = (f1.resolve_ns - f0.resolve_ns) + (c1.resolve_ns - c0.resolve_ns);
    let dense = (space.counters().cow_copies - copies0) as f64 / pages as f64;
    // Sparse: a second fork, then random writes to about 1 page in 100.
    let child2 = space
        .fork(Arc::new(NoopMmu))
        .expect("fork the address space");
    let cmd = Command::random(Gfn(DATA_START / 4096), pages, 9, (pages / 50).max(8));
    let written: HashSet<u64> = vmm::guest::random_accesses(&cmd)
        .filter(|a| a.write)
        .map(|a| a.gpa / 4096)
        .collect();
    let copies1 = space.counters().cow_copies;
    vm.run(0, cmd)
        .unwrap_or_else(|e| panic!("guest random failed: {e}"));
    let sparse = (space.counters().cow_copies - copies1) as f64 / written.len() as f64;
    drop(vm);
    child.exit();
    child2.exit();
    space.exit();
    Sample {
        first_touch,
        cow,
        faults,
        first_touch_faults: f1.total() - f0.total(),
        handler_ns,
        resolve_ns,
        amp: Some((dense, sparse)),
    }
}

fn host_fork(pages: u64) -> Sample {
    let mem = kvmm::hostref::AnonMemory::populated((pages * 4096) as usize).expect("anon memory");
    let cow = kvmm::hostref::host_cow(&mem, 1).expect("fork");
    Sample {
        first_touch: Duration::ZERO,
        cow,
        faults: 0,
        first_touch_faults: 0,
        handler_ns: 0,
        resolve_ns: 0,
        amp: None,
    }
}

/// `metric` of variant `a` over variant `b` (NaN when either is missing).
fn ratio(exp: &Experiment, metric: &str, a: &str, b: &str) -> f64 {
    let get = |v: &str| {
        exp.rows
            .iter()
            .find(|r| r.variant == v)
            .and_then(|r| r.metrics.get(metric).copied())
            .unwrap_or(f64::NAN)
    };
    get(a) / get(b)
}

fn main() {
    let mode = Mode::from_args();
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) if std::env::var("SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("guest_faults: skipped ({e})");
            return;
        }
        Err(e) => panic!("guest_faults needs KVM: {e} (set SKIP_KVM=1 to skip)"),
    };
    let pages = mode.pick(512, 16384, 65536);
    let samples = mode.pick(1, 3, 5);
    let mut exp = Experiment::new("guest_faults", mode);
    type Run<'a> = Box<dyn Fn() -> Sample + 'a>;
    let variants: Vec<(&str, Run)> = vec![
        ("standard", Box::new(|| standard(&hv, pages, false))),
        (
            "standard-prefaulted",
            Box::new(|| standard(&hv, pages, true)),
        ),
        // The manager's defaults: fault-around 64 pages, adaptive COW runs of up to 64.
        (
            "managed",
            Box::new(|| managed(&hv, pages, (6, 6), CowRun::Adaptive, Some(0), false)),
        ),
        (
            "managed-prefaulted",
            Box::new(|| managed(&hv, pages, (6, 6), CowRun::Adaptive, Some(0), true)),
        ),
        (
            "managed-fixed",
            Box::new(|| managed(&hv, pages, (6, 6), CowRun::Fixed, Some(0), false)),
        ),
        (
            "managed-run16",
            Box::new(|| managed(&hv, pages, (6, 4), CowRun::Adaptive, Some(0), false)),
        ),
        (
            "managed-run512",
            Box::new(|| managed(&hv, pages, (6, 9), CowRun::Adaptive, Some(0), false)),
        ),
        (
            "managed-single",
            Box::new(|| managed(&hv, pages, (0, 0), CowRun::Adaptive, Some(0), false)),
        ),
        (
            "managed-unpinned",
            Box::new(|| managed(&hv, pages, (6, 6), CowRun::Adaptive, None, false)),
        ),
        ("host-fork", Box::new(|| host_fork(pages))),
    ];
    let mut best: Vec<Option<Sample>> = variants.iter().map(|_| None).collect();
    for _ in 0..samples {
        for (i, (_, run)) in variants.iter().enumerate() {
            let s = run();
            let keep = match &best[i] {
                Some(b) => s.first_touch + s.cow < b.first_touch + b.cow,
                None => true,
            };
            if keep {
                best[i] = Some(s);
            }
        }
    }
    for ((name, _), s) in variants.iter().zip(best) {
        let Some(s) = s else { continue };
        let per = |d: Duration| d.as_nanos() as f64 / pages as f64;
        let mut row = Row::new(*name)
            .param("pages", pages)
            .metric("cow_ns", per(s.cow))
            .metric(
                "first_touch_faults_per_page",
                s.first_touch_faults as f64 / pages as f64,
            )
            .metric(
                "cow_faults_per_page",
                (s.faults - s.first_touch_faults) as f64 / pages as f64,
            );
        if *name != "host-fork" {
            row = row.metric("first_touch_ns", per(s.first_touch));
        }
        if let Some((dense, sparse)) = s.amp {
            row = row
                .metric("cow_amp_dense", dense)
                .metric("cow_amp_sparse", sparse);
        }
        if s.faults > 0 {
            row = row
                .metric("handler_ns", s.handler_ns as f64 / s.faults as f64)
                .metric("resolve_ns", s.resolve_ns as f64 / s.faults as f64);
        }
        exp.push(row);
    }
    println!("{}", exp.table("first_touch_ns", "standard"));
    println!(
        "(prefaulted against prefaulted: managed-prefaulted / standard-prefaulted = {:.2})\n",
        ratio(
            &exp,
            "first_touch_ns",
            "managed-prefaulted",
            "standard-prefaulted"
        )
    );
    println!("{}", exp.table("cow_ns", "standard"));
    exp.bars(&kvmm::Bars {
        stem: "first-touch",
        title: "guest first touch, ns per page",
        y: "first_touch_ns",
        only: &[],
    });
    exp.bars(&kvmm::Bars {
        stem: "cow",
        title: "guest copy-on-write, ns per page (dense)",
        y: "cow_ns",
        only: &[],
    });
    exp.finish();
}

//! `fault_scaling`: guest first-touch faults with 1, 2, 4 and 8 KVM VMs faulting at once
//! on one manager (issue 12: every fault of every VM is a host `mmap(MAP_FIXED)` under the
//! one process mmap lock; how far does that serialise?).
//!
//! Each VM has one vCPU running the built-in guest's `fill` over its own `pages` pages
//! (every byte of each page written), on guestmem-managed memory with the manager's
//! defaults (fault-around 64 pages), one prefaulted pool for all, threads left to the
//! scheduler. All VMs start their fill together; the wall time until the last finishes is
//! measured, best of the samples; the samples of every VM count are taken in
//! interleaved rounds (1, 2, 4, 8, 1, 2, ...).
//!
//! Three ways, in the same rounds:
//! - `managed`: N fresh VMs in this process;
//! - `clones-here`: N clones of one idle parent (`ManagedVm::fork`), in this process;
//! - `clones-workers`: N clones of the same parent, each in its own worker process
//!   (`ManagedVm::fork_remote` into a `WorkerPool` of 8): every VM's host mappings are in
//!   its worker's `mm`, so no two VMs share an mmap lock; their faults are resolved by
//!   this process's fault server threads (one per CPU) over sockets.
//!
//! The parent never touches the filled range, so a clone's fill is first touch exactly as
//! a fresh VM's is; the forks and the worker shells are made outside the timed part.
//!
//! Metrics: `pages_per_sec` over all VMs, and `fault_cost_ns`: wall time x the CPUs the
//! VMs can use at once (min(VMs, CPUs)) over the pages written, the cost of one page's
//! fault work on a CPU; compared with one VM's of the same variant it shows what
//! contention adds (the target: within 1.5x). `cargo bench --bench fault_scaling --
//! --quick`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use guestmem::types::Gfn;
use guestmem::{Manager, ManagerConfig};
use kvmm::{Experiment, Mode, Row, setup};
use vmm::guest::DATA_START;
use vmm::worker::WorkerPool;
use vmm::{Command, ForkOptions, Hypervisor, ManagedVm, Op, VmConfig};

const MIB: u64 = 1 << 20;

/// One sample: `n` VMs fill `pages` pages each at once; returns the wall time.
fn sample(hv: &Hypervisor, n: usize, pages: u64) -> Duration {
    let mem = mem_for(pages);
    let mm = setup::manager(n as u64 * mem + 16 * MIB, ManagerConfig::default());
    let vms: Vec<ManagedVm> = (0..n)
        .map(|_| ManagedVm::new(hv, &VmConfig::new(mem, 1), &mm).expect("a managed VM"))
        .collect();
    let cmd = Command::new(Op::Fill, Gfn(DATA_START / 4096), pages, 1);
    let wall = at_once(&vms, |vm| {
        vm.vm()
            .run(0, cmd)
            .unwrap_or_else(|e| panic!("guest fill failed: {e}"));
    });
    for vm in &vms {
        let r = vm
            .vm()
            .run(0, Command::new(Op::Verify, cmd.start, pages, 1))
            .expect("guest verify");
        assert_eq!(r.mismatches(), 0, "guest memory corrupted");
    }
    wall
}

/// Worker processes of the `clones-workers` rows (one per VM at the largest count).
const WORKERS: usize = 8;

/// The guest memory of a VM that fills `pages` pages.
fn mem_for(pages: u64) -> u64 {
    (DATA_START + pages * 4096).next_multiple_of(2 * MIB)
}

/// The clones' variants: one idle parent, and the workers its remote clones live in.
struct Clones {
    mm: Arc<Manager>,
    parent: ManagedVm,
    workers: WorkerPool,
}

impl Clones {
    fn new(hv: &Hypervisor, pages: u64, max_vms: usize, cpus: usize) -> Clones {
        let mem = mem_for(pages);
        let mm = setup::manager(
            (max_vms as u64 + 1) * mem + 16 * MIB,
            ManagerConfig::default(),
        );
        let parent = ManagedVm::new(hv, &VmConfig::new(mem, 1), &mm).expect("the parent VM");
        // A first fork moves the parent to a fresh window; it stays idle afterwards.
        drop(parent.fork(hv, &ForkOptions::new(1)).expect("warm-up fork"));
        let exe = std::env::current_exe().expect("this program's path");
        let workers = WorkerPool::spawn(&exe, WORKERS, &mm, cpus)
            .unwrap_or_else(|e| panic!("start {WORKERS} workers: {e}"));
        Clones {
            mm,
            parent,
            workers,
        }
    }

    /// `n` clones (here or in the workers) fill `pages` pages each at once; the wall
    /// time.
    fn sample(&self, hv: &Hypervisor, remote: bool, n: usize, pages: u64) -> Duration {
        let cmd = Command::new(Op::Fill, Gfn(DATA_START / 4096), pages, 1);
        let check = Command::new(Op::Verify, cmd.start, pages, 1);
        let free0 = self.mm.pool().free_frames();
        let wall = if remote {
            let shells = self
                .workers
                .shells(self.parent.vm().config(), n)
                .unwrap_or_else(|e| panic!("{n} shells in workers: {e}"));
            let (clones, _) = self
                .parent
                .fork_remote(hv, &ForkOptions::new(n), &shells)
                .unwrap_or_else(|e| panic!("fork into {n} workers: {e}"));
            let wall = at_once(&clones, |c| {
                c.run(0, cmd)
                    .unwrap_or_else(|e| panic!("guest fill in a worker failed: {e}"));
            });
            for c in &clones {
                let r = c.run(0, check).expect("guest verify in a worker");
                assert_eq!(r.mismatches(), 0, "guest memory corrupted");
            }
            wall
        } else {
            let (clones, _) = self
                .parent
                .fork(hv, &ForkOptions::new(n))
                .unwrap_or_else(|e| panic!("fork into {n} clones: {e}"));
            let wall = at_once(&clones, |c| {
                c.vm()
                    .run(0, cmd)
                    .unwrap_or_else(|e| panic!("guest fill failed: {e}"));
            });
            for c in &clones {
                let r = c.vm().run(0, check).expect("guest verify");
                assert_eq!(r.mismatches(), 0, "guest memory corrupted");
            }
            wall
        };
        assert_eq!(
            self.mm.pool().free_frames(),
            free0,
            "every frame of the clones returned"
        );
        wall
    }
}

/// Runs `f` on every item on its own thread, all started together; the wall time until
/// the last is done.
fn at_once<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) -> Duration {
    let start = Barrier::new(items.len() + 1);
    std::thread::scope(|s| {
        let hs: Vec<_> = items
            .iter()
            .map(|it| {
                let (start, f) = (&start, &f);
                s.spawn(move || {
                    start.wait();
                    f(it);
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for h in hs {
            h.join().expect("a VM thread panicked");
        }
        t.elapsed()
    })
}

fn main() {
    // A worker of the `clones-workers` rows serves here.
    vmm::worker::serve_if_worker();
    let mode = Mode::from_args();
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) if std::env::var("SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("fault_scaling: skipped ({e})");
            return;
        }
        Err(e) => panic!("fault_scaling needs KVM: {e} (set SKIP_KVM=1 to skip)"),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let pages = mode.pick(256, 8192, 32768);
    let samples = mode.pick(1, 5, 9);
    let counts: &[usize] = mode.pick(&[1, 2], &[1, 2, 4, 8], &[1, 2, 4, 8]);
    let mut exp = Experiment::new("fault_scaling", mode);
    // Rounds interleave the VM counts, so a slow stretch of the host (its own DAMON
    // thread, other work on the 2 CPUs) hits every count alike instead of one.
    let max_vms = counts.iter().copied().max().unwrap_or(1);
    let clones = Clones::new(&hv, pages, max_vms, cpus);
    const VARIANTS: [&str; 3] = ["managed", "clones-here", "clones-workers"];
    let mut best = vec![[Duration::MAX; 3]; counts.len()];
    for _ in 0..samples {
        for (b, &n) in best.iter_mut().zip(counts) {
            b[0] = b[0].min(sample(&hv, n, pages));
            b[1] = b[1].min(clones.sample(&hv, false, n, pages));
            b[2] = b[2].min(clones.sample(&hv, true, n, pages));
        }
    }
    for (v, variant) in VARIANTS.iter().enumerate() {
        let mut one_vm_cost = None;
        for (&n, walls) in counts.iter().zip(&best) {
            let wall = walls[v];
            let total = (n as u64 * pages) as f64;
            let cost = wall.as_nanos() as f64 * n.min(cpus) as f64 / total;
            let base = *one_vm_cost.get_or_insert(cost);
            exp.push(
                Row::new(*variant)
                    .param("vms", n as u64)
                    .param("pages_per_vm", pages)
                    .metric("wall_ms", wall.as_secs_f64() * 1e3)
                    .metric("pages_per_sec", total / wall.as_secs_f64())
                    .metric("fault_cost_ns", cost)
                    .metric("cost_vs_one_vm", cost / base),
            );
        }
    }
    drop(clones);
    for r in &exp.rows {
        println!(
            "{:<14} {} VM(s): {:.0} pages/s in all, {:.0} ns per page of CPU, {:.2}x one VM's",
            r.variant,
            r.params["vms"],
            r.metrics["pages_per_sec"],
            r.metrics["fault_cost_ns"],
            r.metrics["cost_vs_one_vm"]
        );
    }
    exp.chart(&kvmm::Chart {
        stem: "cost",
        title: "CPU per page written vs VMs faulting at once",
        x: "vms",
        y: "fault_cost_ns",
        log_x: true,
        log_y: false,
        only: &[],
    });
    exp.finish();
}

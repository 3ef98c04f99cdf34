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
//! Metrics: `pages_per_sec` over all VMs, and `fault_cost_ns`: wall time x the CPUs the
//! VMs can use at once (min(VMs, CPUs)) over the pages written, the cost of one page's
//! fault work on a CPU; compared with one VM's it shows what contention adds (the target:
//! within 1.5x). `cargo bench --bench fault_scaling -- --quick`.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use guestmem::ManagerConfig;
use guestmem::types::Gfn;
use kvmm::{Experiment, Mode, Row, setup};
use vmm::guest::DATA_START;
use vmm::{Command, Hypervisor, ManagedVm, Op, VmConfig};

const MIB: u64 = 1 << 20;

/// One sample: `n` VMs fill `pages` pages each at once; returns the wall time.
fn sample(hv: &Hypervisor, n: usize, pages: u64) -> Duration {
    let mem = (DATA_START + pages * 4096).next_multiple_of(2 * MIB);
    let mm = setup::manager(n as u64 * mem + 16 * MIB, ManagerConfig::default());
    let vms: Vec<ManagedVm> = (0..n)
        .map(|_| ManagedVm::new(hv, &VmConfig::new(mem, 1), &mm).expect("a managed VM"))
        .collect();
    let start = Barrier::new(n + 1);
    let cmd = Command::new(Op::Fill, Gfn(DATA_START / 4096), pages, 1);
    let wall = std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .map(|vm| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    vm.vm()
                        .run(0, cmd)
                        .unwrap_or_else(|e| panic!("guest fill failed: {e}"));
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for h in hs {
            h.join().expect("a VM thread panicked");
        }
        t.elapsed()
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

fn main() {
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
    let mut best = vec![Duration::MAX; counts.len()];
    for _ in 0..samples {
        for (b, &n) in best.iter_mut().zip(counts) {
            *b = (*b).min(sample(&hv, n, pages));
        }
    }
    let mut one_vm_cost = None;
    for (&n, &wall) in counts.iter().zip(&best) {
        let total = (n as u64 * pages) as f64;
        let cost = wall.as_nanos() as f64 * n.min(cpus) as f64 / total;
        let base = *one_vm_cost.get_or_insert(cost);
        exp.push(
            Row::new("managed")
                .param("vms", n as u64)
                .param("pages_per_vm", pages)
                .metric("wall_ms", wall.as_secs_f64() * 1e3)
                .metric("pages_per_sec", total / wall.as_secs_f64())
                .metric("fault_cost_ns", cost)
                .metric("cost_vs_one_vm", cost / base),
        );
    }
    for r in &exp.rows {
        println!(
            "{} VM(s): {:.0} pages/s in all, {:.0} ns per page of CPU, {:.2}x one VM's",
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

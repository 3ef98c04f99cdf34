//! `fork_latency`: snapshot-fork of an address space with 64 MiB .. 4 GiB touched,
//! against the host kernel's `fork()` of a process with the same touched anonymous
//! memory, in the same run.
//!
//! `cargo bench --bench fork_latency -- --quick` (every size, 3 repetitions);
//! `cargo bench --bench fork_latency` (10 repetitions). Before each fork the parent
//! writes every page again, so each fork write-protects the whole space, as a first fork
//! does. Reported: median fork time, child exit time, and the host's fork time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::mmu::NoopMmu;
use guestmem::{Gpa, ManagerConfig, Order};
use kvmm::hostref::{AnonMemory, SleepingChild};
use kvmm::{Experiment, Mode, Row, setup};

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let mode = Mode::from_args();
    let sizes: &[u64] = mode.pick(&[16], &[64, 256, 1024, 4096], &[64, 256, 1024, 4096]);
    let reps = mode.pick(1, 3, 10);
    let mut exp = Experiment::new("fork_latency", mode);
    for &mib in sizes {
        let pages = mib << 8;
        let mm = setup::manager(
            (mib + 8) << 20,
            ManagerConfig {
                fault_around: Order::new(9).expect("order 9 is valid"),
                ..Default::default()
            },
        );
        let vm = setup::written_vm(&mm, pages, 1);
        let (mut forks, mut exits) = (Vec::new(), Vec::new());
        for r in 0..reps {
            setup::write_pages(&vm, 0, pages, r as u8 + 2);
            let t = Instant::now();
            let child = vm.fork(Arc::new(NoopMmu)).expect("fork");
            forks.push(t.elapsed());
            let mut b = [0u8];
            child.read(Gpa(0), &mut b).expect("child reads");
            assert_eq!(b[0], r as u8 + 2, "child sees the parent's bytes");
            let t = Instant::now();
            child.exit();
            exits.push(t.elapsed());
        }
        drop(vm);
        drop(mm);
        let fork_ms = median(forks);
        let exit_ms = median(exits);
        let mem = AnonMemory::populated((mib << 20) as usize).expect("host memory");
        let mut host = Vec::new();
        for _ in 0..reps {
            let child = SleepingChild::fork().expect("fork");
            host.push(child.fork_time);
            drop(child);
        }
        drop(mem);
        let host_ms = median(host);
        exp.push(
            Row::new("guestmem")
                .param("mib", mib)
                .metric("fork_ms", fork_ms)
                .metric("exit_ms", exit_ms)
                .metric("ns_per_page", fork_ms * 1e6 / pages as f64)
                .metric("speedup_vs_host", host_ms / fork_ms),
        );
        exp.push(
            Row::new("host-fork")
                .param("mib", mib)
                .metric("fork_ms", host_ms)
                .metric("ns_per_page", host_ms * 1e6 / pages as f64),
        );
        eprintln!("{mib} MiB: guestmem fork {fork_ms:.2} ms, host fork {host_ms:.2} ms");
    }
    println!("{}", exp.table("fork_ms", "host-fork"));
    exp.chart(&kvmm::Chart {
        stem: "fork",
        title: "fork latency vs memory written (ours vs the host's)",
        x: "mib",
        y: "fork_ms",
        log_x: true,
        log_y: true,
        only: &[],
    });
    exp.finish();
}

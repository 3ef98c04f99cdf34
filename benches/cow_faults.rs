//! `cow_faults`: a fork child writes every page of a shared 256 MiB guest (one copy-on-
//! write fault per page), with 1 and 2 threads, against the host kernel's copy-on-write
//! of the same memory shared with a forked process, in the same run.
//!
//! Then COW amplification by write density: a fork child of a 16 MiB space writes a
//! seeded random share of its pages (1% to 100%), with adaptive and with fixed
//! copy-on-write runs (`CowRun`); amplification is pages copied over pages written.
//! Chart: `target/experiments/cow_faults-amplification.svg`.
//!
//! `cargo bench --bench cow_faults -- --quick`. Reported: ns per page and pages per
//! second; the ratio column is against `host-cow` (below 1 is faster than the kernel).

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::mmu::NoopMmu;
use guestmem::{CowRun, ManagerConfig, Order};
use kvmm::hostref::{AnonMemory, host_cow};
use kvmm::{Chart, Experiment, Mode, Row, setup};
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::SmallRng};

/// Pages copied per page written when a fork child writes `share` of `pages` pages,
/// chosen at random (seeded), under `cow_run`.
fn amplification(pages: u64, share: f64, cow_run: CowRun) -> f64 {
    let mm = setup::manager(
        (2 * pages + 1024) * 4096,
        ManagerConfig {
            cow_run,
            ..Default::default()
        },
    );
    let parent = setup::written_vm(&mm, pages, 1);
    let child = parent.fork(Arc::new(NoopMmu)).expect("fork");
    let mut order: Vec<u64> = (0..pages).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(7));
    let n = ((pages as f64 * share).round() as u64).max(1);
    for &p in &order[..n as usize] {
        setup::write_pages(&child, p, 1, 2);
    }
    let copies = child.counters().cow_copies;
    child.exit();
    parent.exit();
    copies as f64 / n as f64
}

fn best(v: &[Duration]) -> f64 {
    v.iter().min().map_or(0.0, Duration::as_secs_f64)
}

fn main() {
    let mode = Mode::from_args();
    let mib: u64 = mode.pick(8, 256, 256);
    let reps = mode.pick(1, 3, 7);
    let pages = mib << 8;
    let mut exp = Experiment::new("cow_faults", mode);

    let mm = setup::manager(
        (2 * mib + 16) << 20,
        ManagerConfig {
            fault_around: Order::new(9).expect("valid order"),
            ..Default::default()
        },
    );
    let parent = setup::written_vm(&mm, pages, 1);

    for threads in [1u64, 2] {
        let mut ours = Vec::new();
        for _ in 0..reps {
            let child = parent.fork(Arc::new(NoopMmu)).expect("fork");
            let before = child.counters().cow_copies;
            let per = pages / threads;
            let t = Instant::now();
            std::thread::scope(|s| {
                for k in 0..threads {
                    let child = &child;
                    s.spawn(move || setup::write_pages(child, k * per, per, 2));
                }
            });
            ours.push(t.elapsed());
            assert_eq!(child.counters().cow_copies - before, per * threads);
            child.exit();
        }
        let mut host = Vec::new();
        let mem = AnonMemory::populated((mib << 20) as usize).expect("host memory");
        for _ in 0..reps {
            host.push(host_cow(&mem, threads as usize).expect("fork"));
        }
        drop(mem);
        for (variant, secs) in [("guestmem", best(&ours)), ("host-cow", best(&host))] {
            let ns = secs * 1e9 / pages as f64;
            exp.push(
                Row::new(variant)
                    .param("mib", mib)
                    .param("threads", threads)
                    .metric("ns_per_page", ns)
                    .metric("pages_per_sec", pages as f64 / secs),
            );
            eprintln!("{variant} threads={threads}: {ns:.0} ns/page");
        }
    }
    println!("{}", exp.table("ns_per_page", "host-cow"));

    let space = mode.pick(1024, 4096, 4096);
    for share in [0.01, 0.05, 0.2, 0.5, 1.0] {
        for (variant, run) in [("adaptive", CowRun::Adaptive), ("fixed", CowRun::Fixed)] {
            let amp = amplification(space, share, run);
            exp.push(
                Row::new(variant)
                    .param("written_pct", share * 100.0)
                    .metric("cow_amplification", amp),
            );
            eprintln!(
                "{variant}: {:.0}% of pages written: {amp:.2} pages copied per page written",
                share * 100.0
            );
        }
    }
    exp.chart(&Chart {
        stem: "amplification",
        title: "copy-on-write amplification by write density",
        x: "written_pct",
        y: "cow_amplification",
        log_x: true,
        log_y: true,
        only: &[],
    });
    exp.finish();
}

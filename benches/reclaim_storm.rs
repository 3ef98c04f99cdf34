//! `reclaim_storm`: seed 2's AIM7 shape under reclaim (issue 10). A parent VM of 256
//! written pages forks N children one after another; each child copies (writes) 16 of
//! its pages and stays alive. The pool holds about half of what parent and children
//! touch, and a reclaimer thread shrinks the LRU all the time, walking the reverse map of
//! every frame it looks at. Both sides do the same work; the switches are the rmap design
//! (seed 2: `chain` files a child's copies under its own anon_vma, `flat` under one
//! anon_vma for the whole tree) and the referenced check's locking (seed 1: `trylock`
//! counts a contended lock as referenced, `blocking` waits).
//!
//! Reported per (design, locking, N): children per second (fork + 16 copy-on-write
//! faults, the "jobs"), frames reclaimed per second, mappings examined per referenced
//! check, and for each design/locking the largest N (from the peak on) whose throughput
//! is still at least half of its peak; a figure equal to the largest N run is a lower
//! bound. `cargo bench --bench reclaim_storm -- --quick`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use guestmem::mmu::NoopMmu;
use guestmem::reclaim::ReclaimConfig;
use guestmem::reclaim::swap::{SwapConfig, SwapDevice};
use guestmem::{Gpa, ManagerConfig, PAGE_SIZE, ReferencedLocking};
use kvmm::{Chart, Experiment, Mode, Row, setup};

const PARENT: u64 = 256;
const COPIES: u64 = 16;

struct Run {
    jobs_per_sec: f64,
    reclaimed_per_sec: f64,
    examined_per_check: f64,
}

fn storm(design: rmap::Design, locking: ReferencedLocking, n: u64) -> Run {
    let demand = PARENT + n * COPIES;
    let frames = (demand / 2).max(PARENT);
    let mm = setup::manager(
        frames * PAGE_SIZE as u64,
        ManagerConfig {
            rmap: rmap::RmapConfig {
                design,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let dev = SwapDevice::create(&SwapConfig {
        slots: demand + 1024,
        ..Default::default()
    })
    .expect("a swap file in the temp dir");
    let mut cfg = ReclaimConfig::for_pool(frames);
    cfg.referenced = locking;
    mm.attach_swap(dev, cfg).expect("attach");
    let parent = setup::written_vm(&mm, PARENT, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let walks0 = mm.rmap().snapshot();
    let reclaimer = {
        let mm = Arc::clone(&mm);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                mm.shrink_node(0, 32, None);
            }
        })
    };
    let t = Instant::now();
    let mut children = Vec::with_capacity(n as usize);
    for i in 0..n {
        let child = parent.fork(Arc::new(NoopMmu)).expect("fork");
        for k in 0..COPIES {
            let p = (i * 7 + k * 13) % PARENT;
            child
                .write(Gpa(p * PAGE_SIZE as u64), &[2])
                .expect("the pool plus swap holds every copy");
        }
        children.push(child);
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    reclaimer.join().expect("reclaimer");
    let st = mm.reclaim_stats();
    let walks = mm.rmap().snapshot();
    let checks = (walks.walks - walks0.walks).max(1);
    let examined = walks.mappings_examined - walks0.mappings_examined;
    drop(children);
    drop(parent);
    Run {
        jobs_per_sec: n as f64 / secs,
        reclaimed_per_sec: st.reclaimed as f64 / secs,
        examined_per_check: examined as f64 / checks as f64,
    }
}

fn main() {
    let mode = Mode::from_args();
    let ns: &[u64] = mode.pick(
        &[10, 40],
        &[10, 30, 100, 300, 1000, 3000],
        &[10, 30, 100, 300, 1000, 3000, 10000],
    );
    let mut exp = Experiment::new("reclaim_storm", mode);
    for design in [rmap::Design::Chain, rmap::Design::Flat] {
        for locking in [ReferencedLocking::Trylock, ReferencedLocking::Blocking] {
            let variant = format!(
                "{}+{}",
                match design {
                    rmap::Design::Chain => "chain",
                    rmap::Design::Flat => "flat",
                },
                match locking {
                    ReferencedLocking::Trylock => "trylock",
                    ReferencedLocking::Blocking => "blocking",
                }
            );
            let mut runs = Vec::new();
            for &n in ns {
                let r = storm(design, locking, n);
                eprintln!(
                    "{variant} N={n}: {:.0} jobs/s, {:.0} frames reclaimed/s, {:.1} mappings examined per walk",
                    r.jobs_per_sec, r.reclaimed_per_sec, r.examined_per_check
                );
                exp.push(
                    Row::new(variant.as_str())
                        .param("children", n)
                        .metric("jobs_per_sec", r.jobs_per_sec)
                        .metric("reclaimed_per_sec", r.reclaimed_per_sec)
                        .metric("examined_per_walk", r.examined_per_check),
                );
                runs.push((n, r.jobs_per_sec));
            }
            // From the peak on (small N are dominated by a pool too small to hold even
            // the parent), the largest N still at half the peak or more.
            let top = (0..runs.len())
                .max_by(|&a, &b| runs[a].1.total_cmp(&runs[b].1))
                .unwrap_or(0);
            let peak = runs.get(top).map_or(0.0, |r| r.1);
            let sustained = runs[top..]
                .iter()
                .take_while(|r| r.1 >= peak / 2.0)
                .last()
                .map_or(0, |r| r.0);
            eprintln!("{variant}: throughput stays above half its peak up to N={sustained}");
            exp.push(
                Row::new(variant.as_str())
                    .param("summary", "half-peak")
                    .metric("largest_n_above_half_peak", sustained as f64),
            );
        }
    }
    exp.chart(&Chart {
        stem: "jobs",
        title: "fork+COW jobs per second under constant reclaim",
        x: "children",
        y: "jobs_per_sec",
        log_x: true,
        log_y: true,
        only: &[],
    });
    exp.finish();
}

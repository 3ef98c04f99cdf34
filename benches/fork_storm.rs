//! `fork_storm`: seed 2's AIM7 shape on address spaces. One parent with P pages forks N
//! children (N = 10, 100, 1000); each child copies all P pages on write and stays alive;
//! then reclaim's referenced check walks every frame (as `shrink_active_list` would);
//! then every child exits. Chain and Flat reverse maps in the same run.
//!
//! `cargo bench --bench fork_storm -- --quick`. Reported per design and N: jobs per
//! second (fork + P copy-on-write faults), mean mappings examined per referenced check,
//! checks per second, and exit time. Ratios are against `flat`.

use std::sync::Arc;
use std::time::Instant;

use guestmem::mmu::NoopMmu;
use guestmem::{
    AddressSpace, AllocatorKind, Gfn, Gpa, Manager, ManagerConfig, Order, PAGE_SIZE, Pool,
    PoolConfig, ReferencedLocking, RegionSpec,
};
use kvmm::{Experiment, Mode, Row};

fn main() {
    let mode = Mode::from_args();
    let ns: &[u64] = mode.pick(&[4], &[10, 100, 1000], &[10, 100, 1000]);
    let pages: u64 = mode.pick(16, 256, 1000);
    let mut exp = Experiment::new("fork_storm", mode);
    for &n in ns {
        for (name, design) in [("chain", rmap::Design::Chain), ("flat", rmap::Design::Flat)] {
            let frames = pages * (n + 2) + 1024;
            let pool = Arc::new(
                Pool::new(&PoolConfig::uniform(
                    frames * PAGE_SIZE as u64,
                    1,
                    AllocatorKind::Magazine,
                ))
                .expect("pool"),
            );
            pool.prefault().expect("prefault");
            let mm = Manager::new(
                Arc::clone(&pool),
                ManagerConfig {
                    fault_around: Order::new(4).expect("valid order"),
                    rmap: rmap::RmapConfig {
                        design,
                        ..Default::default()
                    },
                },
            );
            let parent = mm
                .create(
                    &[RegionSpec {
                        start: Gfn(0),
                        pages,
                    }],
                    Arc::new(NoopMmu),
                )
                .expect("vm");
            for p in 0..pages {
                parent
                    .write(Gpa(p * PAGE_SIZE as u64), &[1])
                    .expect("write");
            }
            // Jobs: fork, then the child copies every page, on two worker threads.
            let t = Instant::now();
            let children: Vec<Arc<AddressSpace>> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..2)
                    .map(|w| {
                        let parent = &parent;
                        s.spawn(move || {
                            (0..n / 2 + (n % 2) * (1 - w))
                                .map(|_| {
                                    let c = parent.fork(Arc::new(NoopMmu)).expect("fork");
                                    for p in 0..pages {
                                        c.write(Gpa(p * PAGE_SIZE as u64), &[2]).expect("cow");
                                    }
                                    c
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().expect("worker"))
                    .collect()
            });
            let jobs_secs = t.elapsed().as_secs_f64();
            assert_eq!(children.len() as u64, n);

            // Reclaim's referenced check over every allocated frame.
            let before = mm.rmap().snapshot();
            let t = Instant::now();
            let mut checks = 0u64;
            for pfn in 0..pool.total_frames() as u32 {
                let pfn = guestmem::Pfn(pfn);
                if pool.frame(pfn).mapcount() > 0 {
                    mm.frame_referenced(pfn, ReferencedLocking::Trylock);
                    checks += 1;
                }
            }
            let walk_secs = t.elapsed().as_secs_f64();
            let after = mm.rmap().snapshot();
            let examined = after.since(&before).mappings_examined;

            let t = Instant::now();
            drop(children);
            drop(parent);
            let exit_secs = t.elapsed().as_secs_f64();
            assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");

            let row = Row::new(name)
                .param("children", n)
                .param("pages", pages)
                .metric("jobs_per_sec", n as f64 / jobs_secs)
                .metric("examined_per_walk", examined as f64 / checks.max(1) as f64)
                .metric("walks_per_sec", checks as f64 / walk_secs)
                .metric("exit_ms", exit_secs * 1e3);
            eprintln!("{name} N={n}: {row:?}");
            exp.push(row);
        }
    }
    for m in [
        "jobs_per_sec",
        "examined_per_walk",
        "walks_per_sec",
        "exit_ms",
    ] {
        println!("{}", exp.table(m, "flat"));
    }
    match exp.write_json() {
        Ok(p) => println!("wrote {}", p.display()),
        Err(e) => eprintln!("could not write the JSON: {e}"),
    }
}

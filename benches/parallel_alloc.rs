//! Parallel allocation, after the LLFree paper's tests: 1..N threads allocate and free
//! order-0 frames at once, for every allocator design in the same run.
//!
//! - `bulk`: each thread allocates a batch of [`BATCH`] frames one by one, then frees the
//!   batch one by one (`alloc_ns`, `free_ns` per frame).
//! - `repeat`: each thread allocates a frame and frees it at once, over and over
//!   (`pair_ns` per alloc+free).
//! - `random`: each thread allocates a batch; the batches of all threads are shuffled
//!   together and dealt out again, so each thread frees frames other threads allocated
//!   (`alloc_ns`, `free_ns` per frame).
//!
//! Times are per thread (each thread times its own loop; a sample is the mean over
//! threads). A sample runs long enough (tens of milliseconds per thread) that the threads
//! really overlap; rows report the median sample (`*_ns`) and the best (`pair_best_ns`),
//! with ratios against `percpu`. Thread counts above the
//! CPU count (4 threads on 2 vCPUs) show oversubscription: a lock holder can be
//! preempted. Frames use [`FrameInit::Overwritten`] (no zeroing).
//!
//! Run: `cargo bench --bench parallel_alloc -- --quick` (under a minute), `cargo bench
//! --bench parallel_alloc`, `cargo test --benches` (smoke).

use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use guestmem::{AllocatorKind, FrameInit, NodeConfig, NodeId, Order, Pfn, Pool, PoolConfig};
use kvmm::{Experiment, Mode, Row};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

/// Frames each thread holds at once in `bulk` and `random`.
const BATCH: usize = 2048;
/// The most threads measured.
const MAX_THREADS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Bulk,
    Repeat,
    Random,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Bulk => "bulk",
            Test::Repeat => "repeat",
            Test::Random => "random",
        }
    }
}

/// One thread's result: `(alloc, free)` times and the frames each covered.
#[derive(Debug, Default, Clone, Copy)]
struct Timing {
    alloc: Duration,
    free: Duration,
    frames: usize,
}

fn pool(kind: AllocatorKind) -> Pool {
    Pool::new(&PoolConfig {
        nodes: vec![NodeConfig {
            frames: (2 * MAX_THREADS * BATCH) as u64,
            host_node: None,
        }],
        allocator: kind,
    })
    .unwrap_or_else(|e| panic!("cannot build a pool for the benchmark: {e}"))
}

fn alloc_one(pool: &Pool) -> Pfn {
    match pool.alloc(NodeId(0), Order::ZERO, FrameInit::Overwritten) {
        Ok(p) => p,
        Err(e) => panic!("the benchmark pool ran out of frames: {e}"),
    }
}

/// Runs `test` on `threads` threads for `rounds` rounds; one [`Timing`] per thread.
fn run(pool: &Pool, test: Test, threads: usize, rounds: usize, seed: u64) -> Vec<Timing> {
    let start = Barrier::new(threads);
    let dealt = Barrier::new(threads);
    let shuffled = Barrier::new(threads);
    let shared: Mutex<Vec<Pfn>> = Mutex::new(Vec::with_capacity(threads * BATCH));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|me| {
                let (start, dealt, shuffled, shared) = (&start, &dealt, &shuffled, &shared);
                s.spawn(move || {
                    let mut t = Timing::default();
                    let mut mine: Vec<Pfn> = Vec::with_capacity(BATCH);
                    let mut rng = SmallRng::seed_from_u64(seed + me as u64);
                    start.wait();
                    for _ in 0..rounds {
                        match test {
                            Test::Bulk => {
                                let t0 = Instant::now();
                                for _ in 0..BATCH {
                                    mine.push(alloc_one(pool));
                                }
                                let t1 = Instant::now();
                                for p in mine.drain(..) {
                                    pool.free(p, Order::ZERO);
                                }
                                t.alloc += t1 - t0;
                                t.free += t1.elapsed();
                                t.frames += BATCH;
                            }
                            Test::Repeat => {
                                let t0 = Instant::now();
                                for _ in 0..BATCH {
                                    let p = alloc_one(pool);
                                    pool.free(std::hint::black_box(p), Order::ZERO);
                                }
                                t.alloc += t0.elapsed();
                                t.frames += BATCH;
                            }
                            Test::Random => {
                                let t0 = Instant::now();
                                for _ in 0..BATCH {
                                    mine.push(alloc_one(pool));
                                }
                                t.alloc += t0.elapsed();
                                shared
                                    .lock()
                                    .expect("no thread panics holding the deck")
                                    .append(&mut mine);
                                if dealt.wait().is_leader() {
                                    let mut deck =
                                        shared.lock().expect("no thread panics holding the deck");
                                    deck.shuffle(&mut rng);
                                }
                                shuffled.wait();
                                {
                                    let mut deck =
                                        shared.lock().expect("no thread panics holding the deck");
                                    let at = deck.len() - BATCH;
                                    mine.extend(deck.drain(at..));
                                }
                                // Barely any of these are ours: with n threads, (n-1)/n
                                // were allocated by another thread.
                                mine.shuffle(&mut rng);
                                let t1 = Instant::now();
                                for p in mine.drain(..) {
                                    pool.free(p, Order::ZERO);
                                }
                                t.free += t1.elapsed();
                                t.frames += BATCH;
                                // Nobody starts the next round's deck before all dealt.
                                dealt.wait();
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread panicked"))
            .collect()
    })
}

fn main() {
    let mode = Mode::from_args();
    let samples = mode.pick(1, 5, 15);
    let rounds = mode.pick(4, 48, 96);
    let thread_counts: Vec<usize> = mode.pick(vec![1, 2], vec![1, 2, 4], vec![1, 2, 3, 4]);
    let started = Instant::now();
    let pools: Vec<(AllocatorKind, Pool)> = AllocatorKind::ALL
        .into_iter()
        .map(|k| (k, pool(k)))
        .collect();
    let mut exp = Experiment::new("parallel_alloc", mode);
    for test in [Test::Bulk, Test::Repeat, Test::Random] {
        for &threads in &thread_counts {
            // Per design, per sample: (alloc ns, free ns) per frame, mean over threads.
            let mut got: Vec<Vec<(f64, f64)>> = vec![Vec::new(); pools.len()];
            for s in 0..samples {
                for (i, (_, p)) in pools.iter().enumerate() {
                    let timings = run(p, test, threads, rounds, s as u64 * 131);
                    let per = |d: fn(&Timing) -> Duration| {
                        timings
                            .iter()
                            .map(|t| d(t).as_nanos() as f64 / t.frames as f64)
                            .sum::<f64>()
                            / timings.len() as f64
                    };
                    got[i].push((per(|t| t.alloc), per(|t| t.free)));
                }
            }
            for (i, (kind, p)) in pools.iter().enumerate() {
                assert_eq!(
                    p.free_frames(),
                    p.total_frames(),
                    "{kind:?} lost frames in the benchmark"
                );
                let v = &mut got[i];
                v.sort_by(|x, y| (x.0 + x.1).total_cmp(&(y.0 + y.1)));
                let (best, median) = (v[0], v[v.len() / 2]);
                let row = Row::new(kind.name())
                    .param("test", test.name())
                    .param("threads", threads)
                    .metric("pair_ns", median.0 + median.1)
                    .metric("pair_best_ns", best.0 + best.1);
                exp.push(match test {
                    Test::Repeat => row,
                    Test::Bulk | Test::Random => {
                        row.metric("alloc_ns", median.0).metric("free_ns", median.1)
                    }
                });
            }
        }
    }
    for metric in ["pair_ns", "pair_best_ns", "alloc_ns", "free_ns"] {
        println!(
            "parallel_alloc: {metric} per frame per thread (mean over threads; median of {samples} samples unless `best`)"
        );
        println!("{}", exp.table(metric, AllocatorKind::PerCpuLists.name()));
    }
    for test in [Test::Bulk, Test::Repeat, Test::Random] {
        // One chart per test: a line per allocator.
        let mut one = exp.clone();
        one.rows
            .retain(|r| r.params.get("test").and_then(|t| t.as_str()) == Some(test.name()));
        let (stem, title) = (
            format!("pair-{}", test.name()),
            format!("{}: alloc + free ns per frame vs threads", test.name()),
        );
        one.chart(&kvmm::Chart {
            stem: &stem,
            title: &title,
            x: "threads",
            y: "pair_ns",
            log_x: false,
            log_y: true,
            only: &[],
        });
    }
    exp.finish();
    println!(
        "took {:.1} s in {mode:?} mode",
        started.elapsed().as_secs_f64()
    );
}

//! The mmtests `pagealloc` experiment of seed 5: allocate a batch of `B` order-0 frames
//! one by one, then free the batch one by one, for `B = 1, 2, 4 ... 16384`; report
//! nanoseconds per page for the allocation, the free and both (`total`), for every
//! allocator design in the same run, with ratios against `percpu`.
//!
//! Frames are taken with [`FrameInit::Overwritten`] so that no page is zeroed: the run
//! measures the allocator and the frame descriptors' bookkeeping, not `memset`.
//!
//! Each point is measured in several samples; the designs are interleaved sample by
//! sample (so that noise from other processes hits all of them alike) and the best sample
//! is reported (`*_ns`), with the median beside it (`*_median_ns`). A sample repeats the
//! batch until it has handled at least [`pages_per_sample`] pages; the two `Instant::now`
//! calls around each phase are calibrated once and subtracted.
//!
//! Run: `cargo bench --bench pagealloc -- --quick` (under a minute), `cargo bench --bench
//! pagealloc` (more samples), `cargo test --benches` (smoke: a second, checks only).

use std::hint::black_box;
use std::time::{Duration, Instant};

use guestmem::{AllocatorKind, FrameInit, NodeConfig, NodeId, Order, Pfn, Pool, PoolConfig};
use kvmm::{Experiment, Mode, Row};

/// The largest batch; the pool holds twice as many frames.
const MAX_BATCH: usize = 16384;

fn pool(kind: AllocatorKind) -> Pool {
    Pool::new(&PoolConfig {
        nodes: vec![NodeConfig {
            frames: 2 * MAX_BATCH as u64,
            host_node: None,
        }],
        allocator: kind,
    })
    .unwrap_or_else(|e| panic!("cannot build a pool for the benchmark: {e}"))
}

/// What an empty phase measures: `Instant::now()` then `elapsed()` with nothing between,
/// in ns (the best mean of a few runs).
fn timer_overhead_ns() -> f64 {
    let n = 100_000u32;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut sum = Duration::ZERO;
        for _ in 0..n {
            let t = Instant::now();
            sum += black_box(t).elapsed();
        }
        best = best.min(sum.as_nanos() as f64 / f64::from(n));
    }
    best
}

/// Pages one sample handles at least.
fn pages_per_sample(mode: Mode) -> usize {
    mode.pick(2048, 65536, 262144)
}

/// One sample: `(alloc ns/page, free ns/page)`.
fn sample(
    pool: &Pool,
    batch: usize,
    pages: usize,
    overhead: f64,
    buf: &mut Vec<Pfn>,
) -> (f64, f64) {
    let rounds = pages.div_ceil(batch);
    let (mut alloc, mut free) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        buf.clear();
        let t = Instant::now();
        for _ in 0..batch {
            match pool.alloc(NodeId(0), Order::ZERO, FrameInit::Overwritten) {
                Ok(p) => buf.push(p),
                Err(e) => panic!("the benchmark pool ran out of frames: {e}"),
            }
        }
        alloc += t.elapsed();
        let t = Instant::now();
        for &p in buf.iter() {
            pool.free(p, Order::ZERO);
        }
        free += t.elapsed();
    }
    let per_page = |d: Duration| {
        let ns = d.as_nanos() as f64 - overhead * rounds as f64;
        (ns / (rounds * batch) as f64).max(0.0)
    };
    (per_page(alloc), per_page(free))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mode = Mode::from_args();
    let samples = mode.pick(1, 15, 31);
    let pages = pages_per_sample(mode);
    let overhead = timer_overhead_ns();
    let pools: Vec<(AllocatorKind, Pool)> = AllocatorKind::ALL
        .into_iter()
        .map(|k| (k, pool(k)))
        .collect();
    let mut buf = Vec::with_capacity(MAX_BATCH);
    let mut exp = Experiment::new("pagealloc", mode);
    exp.machine
        .insert("timer_overhead_ns".to_owned(), overhead.into());
    let started = Instant::now();

    let batches: Vec<usize> = (0..)
        .map(|s| 1usize << s)
        .take_while(|&b| b <= MAX_BATCH)
        .collect();
    for &batch in &batches {
        // Per design: the samples of alloc and free ns/page.
        let mut alloc: Vec<Vec<f64>> = vec![Vec::new(); pools.len()];
        let mut free: Vec<Vec<f64>> = vec![Vec::new(); pools.len()];
        let mut total: Vec<Vec<f64>> = vec![Vec::new(); pools.len()];
        for (_, p) in &pools {
            // Warm up: caches filled to this batch's steady state.
            sample(p, batch, batch, overhead, &mut buf);
        }
        for _ in 0..samples {
            for (i, (_, p)) in pools.iter().enumerate() {
                let (a, f) = sample(p, batch, pages, overhead, &mut buf);
                alloc[i].push(a);
                free[i].push(f);
                total[i].push(a + f);
            }
        }
        for (i, (kind, p)) in pools.iter().enumerate() {
            assert_eq!(
                p.free_frames(),
                p.total_frames(),
                "{kind:?} lost frames in the benchmark"
            );
            let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
            exp.push(
                Row::new(kind.name())
                    .param("order", 0)
                    .param("batch", batch)
                    .metric("alloc_ns", best(&alloc[i]))
                    .metric("free_ns", best(&free[i]))
                    .metric("total_ns", best(&total[i]))
                    .metric("alloc_median_ns", median(&mut alloc[i]))
                    .metric("free_median_ns", median(&mut free[i]))
                    .metric("total_median_ns", median(&mut total[i])),
            );
        }
    }

    for metric in ["alloc_ns", "free_ns", "total_ns", "total_median_ns"] {
        println!("pagealloc, order 0, {metric} per page (best of {samples} samples)");
        println!("{}", exp.table(metric, AllocatorKind::PerCpuLists.name()));
    }
    exp.chart(&kvmm::Chart {
        stem: "ns-by-batch",
        title: "alloc + free per frame by batch size (order 0, best)",
        x: "batch",
        y: "total_ns",
        log_x: true,
        log_y: false,
        only: &[("order", 0.0)],
    });
    exp.finish();
    println!(
        "took {:.1} s in {mode:?} mode",
        started.elapsed().as_secs_f64()
    );
}

//! Seed 2's experiment: how many mappings reclaim examines per frame, anon_vma chains
//! against the flat anon_vma they replaced, and what the clone locking (seed 3) and the
//! anon_vma reuse rule (commit 7a3ef208) cost or save.
//!
//! 1. Scan: one parent region of P pages (all faulted in, filed under its anon_vma) is
//!    snapshot-forked into N children; each child COWs all P pages (new frames filed under
//!    the child's `anon_vma_prepare`). Then frames are walked as reclaim does
//!    (`WalkMode::TryShared`, in LRU order: fault order), every frame, or above a
//!    mode-dependent cap the frames whose page offset is a multiple of k (the same for
//!    both designs; every region keeps its exact share of the walks). Two visitors: one
//!    checks the mapping's page-table entry as reclaim's referenced check does (trylock
//!    of the 512-page block's page-table lock, test of the accessed bit:
//!    `walks_per_sec`), one does nothing (`walks_per_sec_noop`: the reverse map's own
//!    cost). Reported per design: mean and max mappings examined per walk, tree nodes
//!    visited per walk, walks per second, and root-lock acquisitions per fork with
//!    batched and per-entry clone locking.
//! 2. Generations: a VM forks a child and exits, generation after generation (each child
//!    COWs one page). Reported with and without anon_vma reuse: final and largest chain
//!    length, anon_vmas still alive, root locks per fork (batched vs per entry).
//!
//! `cargo bench --bench rmap_scan -- --quick` (under a minute), `cargo bench --bench
//! rmap_scan` (every frame walked), `cargo test --benches` (smoke: tiny sizes, sanity
//! checks only). JSON: `target/experiments/rmap_scan.json`.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kvmm::{Experiment, Mode, Row};
use rmap::{
    AnonVma, CloneLocking, Design, RegionRmap, Rmap, RmapConfig, WalkMode, WalkOutcome, rmap_walk,
};

/// What a frame descriptor keeps for the reverse map.
struct Frame {
    anon_vma: usize,
    pgoff: u64,
}

fn design_name(d: Design) -> &'static str {
    match d {
        Design::Chain => "chain",
        Design::Flat => "flat",
    }
}

fn locking_name(l: CloneLocking) -> &'static str {
    match l {
        CloneLocking::Batched => "batched",
        CloneLocking::PerEntry => "per-entry",
    }
}

fn config(design: Design, clone_locking: CloneLocking, reuse: bool) -> RmapConfig {
    RmapConfig {
        design,
        clone_locking,
        reuse_anon_vmas: reuse,
    }
}

struct Scan {
    walks: u64,
    mean_examined: f64,
    max_examined: u64,
    visited_per_walk: f64,
    walks_per_sec_noop: f64,
    walks_per_sec_check: f64,
    referenced: u64,
    locks_per_fork: f64,
}

/// The accessed bit of a page-table entry in the checking visitor's tables.
const ACCESSED: u64 = 1 << 5;

/// Pages per page-table lock (guestmem's split page-table lock granularity).
const BLOCK: u64 = 512;

/// One region's page table, as the checking visitor sees it.
struct Table {
    locks: Vec<Mutex<()>>,
    ptes: Vec<AtomicU64>,
}

impl Table {
    fn new(pages: u64) -> Table {
        Table {
            locks: (0..pages.div_ceil(BLOCK)).map(|_| Mutex::new(())).collect(),
            ptes: (0..pages).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Builds the fork tree (parent + `n` children that COWed all `p` pages) and, if
/// `walk_cap` is non-zero, walks up to `walk_cap` frames `reps` times with each visitor.
fn scan(design: Design, locking: CloneLocking, n: u32, p: u64, walk_cap: usize, reps: u32) -> Scan {
    let rmap = Rmap::new(config(design, locking, true));
    let mut frames: Vec<Frame> = Vec::with_capacity(((n as u64 + 1) * p) as usize);
    let mut parent = rmap.region(0u32, 0..p).expect("p > 0");
    let pav = rmap
        .anon_vma_prepare(&mut parent)
        .expect("no failpoint armed");
    for pgoff in 0..p {
        frames.push(Frame {
            anon_vma: AnonVma::into_raw(pav.clone()),
            pgoff,
        });
    }
    let before = rmap.snapshot();
    let mut children: Vec<RegionRmap<u32>> = Vec::with_capacity(n as usize);
    for c in 1..=n {
        let mut child = rmap.region(c, 0..p).expect("p > 0");
        rmap.anon_vma_fork(&mut child, &parent)
            .expect("no failpoint armed");
        children.push(child);
    }
    let locks_per_fork = rmap.snapshot().since(&before).lock_acquisitions() as f64 / n as f64;
    for child in &mut children {
        let av = rmap.anon_vma_prepare(child).expect("no failpoint armed");
        for pgoff in 0..p {
            frames.push(Frame {
                anon_vma: AnonVma::into_raw(av.clone()),
                pgoff,
            });
        }
    }

    // Page tables of the parent (index 0) and the children: one entry per page and one
    // lock per 512-page block (guestmem's split page-table lock), for the checking visitor.
    let tables: Vec<Table> = (0..=n).map(|_| Table::new(p)).collect();
    let mut result = Scan {
        walks: 0,
        mean_examined: 0.0,
        max_examined: 0,
        visited_per_walk: 0.0,
        walks_per_sec_noop: 0.0,
        walks_per_sec_check: 0.0,
        referenced: 0,
        locks_per_fork,
    };
    if walk_cap > 0 {
        // Reclaim's order: LRU, oldest first, i.e. fault order. Above the cap, only the
        // frames whose page offset is a multiple of k: every region keeps its exact share
        // of the walks, so the mean and max are those of walking every frame.
        let k = frames.len().div_ceil(walk_cap).max(1) as u64;
        let order: Vec<usize> = (0..frames.len())
            .filter(|&i| frames[i].pgoff % k == 0)
            .collect();
        for check in [false, true] {
            let mut best = 0.0f64;
            for _ in 0..reps {
                let before = rmap.snapshot();
                let mut max = 0u64;
                let mut referenced = 0u64;
                let start = Instant::now();
                for &i in &order {
                    let f = &frames[i];
                    // SAFETY: `f.anon_vma` came from `AnonVma::into_raw` and is released
                    // only below, after every walk.
                    let av = unsafe { AnonVma::<u32>::borrow_raw(f.anon_vma) };
                    let out = rmap_walk(av, f.pgoff, WalkMode::TryShared, |m, pgoff| {
                        if check {
                            // Reclaim's referenced check (seed 1): trylock the block's
                            // page-table lock, test the entry's accessed bit.
                            let t = &tables[*m as usize];
                            match t.locks[(pgoff / BLOCK) as usize].try_lock() {
                                Ok(_pt_lock) => {
                                    let pte = t.ptes[pgoff as usize].load(Ordering::Relaxed);
                                    if pte & ACCESSED != 0 {
                                        referenced += 1;
                                    }
                                }
                                Err(_) => referenced += 1,
                            }
                        } else {
                            std::hint::black_box(m);
                        }
                        ControlFlow::Continue(())
                    })
                    .expect("TryShared walks cannot fail");
                    assert_ne!(
                        out,
                        WalkOutcome::Contended,
                        "nothing writes during the scan"
                    );
                    max = max.max(out.examined());
                }
                let secs = start.elapsed().as_secs_f64();
                let d = rmap.snapshot().since(&before);
                best = best.max(d.walks as f64 / secs.max(1e-9));
                result.walks = d.walks;
                result.mean_examined = d.mappings_examined as f64 / d.walks as f64;
                result.max_examined = max;
                result.visited_per_walk = d.entries_visited as f64 / d.walks as f64;
                result.referenced = referenced;
            }
            if check {
                result.walks_per_sec_check = best;
            } else {
                result.walks_per_sec_noop = best;
            }
        }
    }
    drop(children);
    drop(parent);
    drop(pav);
    for f in frames {
        // SAFETY: each raw value owns one reference, released exactly once here.
        unsafe { AnonVma::<u32>::drop_raw(f.anon_vma) };
    }
    let s = rmap.snapshot();
    assert_eq!(
        s.anon_vmas_allocated, s.anon_vmas_freed,
        "no anon_vma leaked"
    );
    result
}

struct Generations {
    final_chain: usize,
    max_chain: usize,
    live_anon_vmas: u64,
    locks_per_fork: f64,
    last_walk_examined: u64,
}

/// A VM forks a child and exits, `g` times; the child COWs one page each generation.
fn generations(locking: CloneLocking, reuse: bool, g: u32) -> Generations {
    let rmap = Rmap::new(config(Design::Chain, locking, reuse));
    let mut cur = rmap.region(0u32, 0..16).expect("non-empty");
    rmap.anon_vma_prepare(&mut cur).expect("no failpoint armed");
    let mut max_chain = cur.chain_len();
    let mut locks = 0u64;
    let mut frames = Vec::new();
    for gen_no in 1..=g {
        let mut child = rmap.region(gen_no, 0..16).expect("non-empty");
        let before = rmap.snapshot();
        rmap.anon_vma_fork(&mut child, &cur)
            .expect("no failpoint armed");
        locks += rmap.snapshot().since(&before).lock_acquisitions();
        let av = rmap
            .anon_vma_prepare(&mut child)
            .expect("no failpoint armed");
        frames.push(Frame {
            anon_vma: AnonVma::into_raw(av),
            pgoff: u64::from(gen_no % 16),
        });
        rmap.unlink_anon_vmas(&mut cur);
        max_chain = max_chain.max(child.chain_len());
        cur = child;
    }
    let s = rmap.snapshot();
    let last = frames.last().expect("g > 0");
    // SAFETY: `last.anon_vma` owns a reference until the loop below.
    let av = unsafe { AnonVma::<u32>::borrow_raw(last.anon_vma) };
    let out = rmap_walk(av, last.pgoff, WalkMode::Shared, |_, _| {
        ControlFlow::Continue(())
    })
    .expect("shared walks cannot fail");
    let result = Generations {
        final_chain: cur.chain_len(),
        max_chain,
        live_anon_vmas: s.anon_vmas_allocated - s.anon_vmas_freed,
        locks_per_fork: locks as f64 / f64::from(g),
        last_walk_examined: out.examined(),
    };
    drop(cur);
    for f in frames {
        // SAFETY: each raw value owns one reference, released exactly once here.
        unsafe { AnonVma::<u32>::drop_raw(f.anon_vma) };
    }
    result
}

fn main() {
    let mode = Mode::from_args();
    let p: u64 = mode.pick(20, 1000, 1000);
    let ns: &[u32] = mode.pick(
        &[1, 10][..],
        &[1, 10, 100, 1000][..],
        &[1, 10, 100, 1000][..],
    );
    let walk_cap: usize = mode.pick(usize::MAX, 200_000, usize::MAX);
    let reps: u32 = mode.pick(1, 3, 3);
    let gens: u32 = mode.pick(20, 1000, 1000);
    let mut exp = Experiment::new("rmap_scan", mode);

    for &n in ns {
        for design in [Design::Flat, Design::Chain] {
            let s = scan(design, CloneLocking::Batched, n, p, walk_cap, reps);
            let per_entry = scan(design, CloneLocking::PerEntry, n, p, 0, 0);
            exp.push(
                Row::new(design_name(design))
                    .param("n", n)
                    .param("p", p)
                    .metric("walks", s.walks as f64)
                    .metric("mean_examined", s.mean_examined)
                    .metric("max_examined", s.max_examined as f64)
                    .metric("visited_per_walk", s.visited_per_walk)
                    .metric("walks_per_sec", s.walks_per_sec_check)
                    .metric("walks_per_sec_noop", s.walks_per_sec_noop)
                    .metric("referenced", s.referenced as f64)
                    .metric("locks_per_fork_batched", s.locks_per_fork)
                    .metric("locks_per_fork_per_entry", per_entry.locks_per_fork),
            );
        }
    }
    for reuse in [false, true] {
        let variant = if reuse { "reuse" } else { "no-reuse" };
        let mut row = Row::new(variant).param("generations", gens);
        for locking in [CloneLocking::Batched, CloneLocking::PerEntry] {
            let r = generations(locking, reuse, gens);
            let key = format!(
                "gen_locks_per_fork_{}",
                locking_name(locking).replace('-', "_")
            );
            row = row.metric(&key, r.locks_per_fork);
            if locking == CloneLocking::Batched {
                row = row
                    .metric("gen_final_chain_len", r.final_chain as f64)
                    .metric("gen_max_chain_len", r.max_chain as f64)
                    .metric("gen_live_anon_vmas", r.live_anon_vmas as f64)
                    .metric("gen_last_walk_examined", r.last_walk_examined as f64);
            }
        }
        exp.push(row);
    }

    println!(
        "rmap_scan ({mode:?}): P = {p} pages; frames walked in LRU order, pgoff % k == 0 only above \
         {walk_cap} walks; walks_per_sec trylocks and checks each mapping's page-table entry, \
         walks_per_sec_noop does nothing per mapping\n"
    );
    for metric in [
        "mean_examined",
        "max_examined",
        "visited_per_walk",
        "walks_per_sec",
        "walks_per_sec_noop",
        "locks_per_fork_batched",
        "locks_per_fork_per_entry",
    ] {
        println!("{}", exp.table(metric, "flat"));
    }
    println!("generations: fork then exit, {gens} times\n");
    for metric in [
        "gen_final_chain_len",
        "gen_max_chain_len",
        "gen_live_anon_vmas",
        "gen_last_walk_examined",
        "gen_locks_per_fork_batched",
        "gen_locks_per_fork_per_entry",
    ] {
        println!("{}", exp.table(metric, "no-reuse"));
    }

    // Seed 2's targets, at the largest N measured; sanity checks in every mode.
    let n = *ns.last().expect("at least one N");
    let at = Row::new("").param("n", n).param("p", p).params;
    let get = |v: &str, m: &str| exp.get(v, &at, m).unwrap_or(f64::NAN);
    let chain_mean = get("chain", "mean_examined");
    let flat_mean = get("flat", "mean_examined");
    let speedup = get("chain", "walks_per_sec") / get("flat", "walks_per_sec");
    let speedup_noop = get("chain", "walks_per_sec_noop") / get("flat", "walks_per_sec_noop");
    let batched = get("chain", "locks_per_fork_batched");
    let verdict = |ok: bool| match (n, ok) {
        (1000, true) => "met",
        (1000, false) => "MISSED",
        _ => "target is for N=1000",
    };
    println!(
        "targets at N={n}: chain mean examined {chain_mean:.3} (<= 2: {}), flat {flat_mean:.1} \
         (~N); chain/flat walk throughput {speedup:.1}x with the referenced check (>= 100x: \
         {}), {speedup_noop:.1}x with an empty visitor; chain batched locks per fork \
         {batched} (== 1: {})",
        verdict(chain_mean <= 2.0),
        verdict(speedup >= 100.0),
        verdict(batched == 1.0)
    );
    assert!(
        chain_mean <= 2.0,
        "chain examines at most 2 mappings per walk on average"
    );
    assert!(
        flat_mean >= f64::from(n),
        "flat examines the whole fork tree"
    );
    assert_eq!(batched, 1.0, "a batched fork takes the root lock once");
    let reuse_chain = exp
        .rows
        .iter()
        .find(|r| r.variant == "reuse")
        .and_then(|r| r.metrics.get("gen_max_chain_len").copied())
        .unwrap_or(f64::NAN);
    assert!(reuse_chain <= 3.0, "anon_vma reuse bounds the chain");

    for (stem, title, y) in [
        (
            "examined",
            "mappings examined per reverse-map walk",
            "mean_examined",
        ),
        ("walks", "reverse-map walks per second", "walks_per_sec"),
    ] {
        exp.chart(&kvmm::Chart {
            stem,
            title,
            x: "n",
            y,
            log_x: true,
            log_y: true,
            only: &[],
        });
    }
    exp.finish();
}

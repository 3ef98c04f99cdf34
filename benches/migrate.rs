//! `migrate`: moving guest pages between nodes (issue 11, seed 4).
//!
//! Every part runs on a prefaulted two-node pool (both nodes backed by host memory before
//! the clock starts, so neither side pays the host's first touch). On this one-node host
//! the two nodes are separate pools in the same memory: the figures are the manager's
//! cost of a move (walks, entries, host unmaps, copies), not a cross-socket copy.
//!
//! 1. `memcpy`: one thread copies 64 MiB between two prefaulted buffers: the copy speed
//!    a move is held against. Measured before each timed move as well (the best of all
//!    is the figure), so that a moment of host noise cannot flatter the moves' share.
//! 2. `batched` / `4k`: a software VM's 64 MiB of written pages move to the other node
//!    as naturally aligned runs of up to 512 pages (`AddressSpace::migrate`: per run one
//!    allocation, one unmap walk and one remap walk per frame, one host unmap per run,
//!    512 copies), against the same pages moved one by one (`Manager::migrate_run` per
//!    page: the same steps for runs of one). GB/s of pages moved; host unmaps per run.
//!    `batched-guest`: the same batched move of a KVM guest's 64 MiB (its window is a real
//!    host view: each host unmap is a `MADV_DONTNEED`-style drop with its TLB shootdown).
//! 3. `walks`: seed 4's busy fork tree. A parent VM of 64 MiB; a forker thread forks a
//!    child, writes 16 of its pages, and exits it after 8 more forks (so the tree is
//!    always forking and exiting: link and unlink take the root lock for writing); 1 or 2
//!    migrating threads move their half of the parent's pages to the other node and back
//!    for a fixed time, with the rmap walks' root lock exclusive, shared, or not taken.
//!    GB/s moved and forks per second, for each mode and thread count.
//! 4. `stall`: a KVM guest writes one word per page over 32 MiB, 64 pages per command,
//!    each command timed from the host; p50/p99 with no migration and while a host
//!    thread moves the guest's memory to the other node and back all the time.
//!
//! Needs /dev/kvm for `batched-guest` and `stall` (SKIP_KVM=1 skips them).
//! `cargo bench --bench migrate -- --quick`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guestmem::{Gfn, Manager, ManagerConfig, MigrateWalk, NodeId, PAGE_SIZE, Pfn};
use kvmm::{Experiment, Mode, Row, setup};
use vmm::guest::DATA_START;
use vmm::{Command, Hypervisor, ManagedVm, Op, VmConfig};

const MIB: u64 = 1 << 20;
const WALKS: [MigrateWalk; 3] = [
    MigrateWalk::Exclusive,
    MigrateWalk::Shared,
    MigrateWalk::Unlocked,
];

fn gbs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// One thread's copy speed between two prefaulted buffers: the best of every
/// [`Memcpy::sample`] taken so far.
struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
    best: f64,
}

impl Memcpy {
    fn new(bytes: usize, reps: usize) -> Memcpy {
        let src = vec![0x5au8; bytes];
        let mut dst = vec![0u8; bytes];
        dst.copy_from_slice(&src);
        let mut m = Memcpy {
            src,
            dst,
            best: 0.0,
        };
        for _ in 0..reps {
            m.sample();
        }
        m
    }

    fn sample(&mut self) {
        let t = Instant::now();
        self.dst.copy_from_slice(std::hint::black_box(&self.src));
        std::hint::black_box(&self.dst);
        self.best = self.best.max(gbs(self.src.len() as u64, t.elapsed()));
    }
}

/// The frames of `vm`'s pages `0 .. pages`.
fn frames(vm: &guestmem::AddressSpace, first: Gfn, pages: u64) -> Vec<Pfn> {
    (0..pages)
        .filter_map(|p| vm.pte(first.offset(p)).ok().and_then(|e| e.pfn()))
        .collect()
}

/// A batched move's row: throughput, its share of memcpy, host unmaps and runs.
fn batched_row(variant: &str, pages: u64, gbs: f64, copy: f64, unmaps: u64, runs: u64) -> Row {
    Row::new(variant)
        .param("pages", pages)
        .metric("gb_per_sec", gbs)
        .metric("share_of_memcpy", gbs / copy)
        .metric("host_unmaps", unmaps as f64)
        .metric("runs", runs as f64)
}

fn software(exp: &mut Experiment, pages: u64, reps: usize, copy: &mut Memcpy) {
    let bytes = pages * PAGE_SIZE as u64;
    let mm = setup::manager_nodes(2 * (bytes + 8 * MIB), 2, ManagerConfig::default());
    let vm = setup::written_vm(&mm, pages, 7);
    let mut node = 1u16;
    let (mut best, mut unmaps, mut runs) = (Duration::MAX, 0, 0);
    for _ in 0..reps {
        copy.sample();
        let t = Instant::now();
        let st = vm
            .migrate(Gfn(0)..Gfn(pages), NodeId(node), MigrateWalk::Shared)
            .expect("migrate");
        let d = t.elapsed();
        assert_eq!(st.pages, pages, "{st:?}");
        if d < best {
            (best, unmaps, runs) = (d, st.host_unmaps, st.runs);
        }
        node ^= 1;
    }
    let batched = gbs(bytes, best);
    let mut best4k = Duration::MAX;
    for _ in 0..reps {
        let pfns = frames(&vm, Gfn(0), pages);
        copy.sample();
        let t = Instant::now();
        let mut moved = 0;
        for p in pfns {
            moved += mm
                .migrate_run(&[p], NodeId(node), MigrateWalk::Shared)
                .pages;
        }
        let d = t.elapsed();
        assert_eq!(moved, pages);
        best4k = best4k.min(d);
        node ^= 1;
    }
    let one = gbs(bytes, best4k);
    let copy = copy.best;
    eprintln!(
        "memcpy {copy:.2} GB/s; batched runs {batched:.2} GB/s ({:.0}% of memcpy; {unmaps} host unmaps for {runs} runs); 4 KiB one by one {one:.2} GB/s ({:.0}% of memcpy; Linux's 4 KiB move_pages is about 30% of its copy speed)",
        100.0 * batched / copy,
        100.0 * one / copy
    );
    exp.push(batched_row("batched", pages, batched, copy, unmaps, runs));
    exp.push(
        Row::new("4k")
            .param("pages", pages)
            .metric("gb_per_sec", one)
            .metric("share_of_memcpy", one / copy),
    );
}

fn guest_batched(
    exp: &mut Experiment,
    hv: &Hypervisor,
    pages: u64,
    reps: usize,
    copy: &mut Memcpy,
) {
    let bytes = pages * PAGE_SIZE as u64;
    let mem = DATA_START + bytes + 2 * MIB;
    let mm = setup::manager_nodes(2 * (mem + 8 * MIB), 2, ManagerConfig::default());
    let vm = ManagedVm::new(hv, &VmConfig::new(mem, 1), &mm).expect("vm");
    let data = Gfn(DATA_START / 4096);
    let r = vm
        .vm()
        .run(0, Command::new(Op::Fill, data, pages, 3))
        .expect("fill");
    assert_eq!(r.mismatches(), 0);
    let mut node = 1u16;
    let (mut best, mut unmaps, mut runs) = (Duration::MAX, 0, 0);
    for _ in 0..reps {
        // The guest touches its data first, so the view maps it and every run needs its
        // host unmap (as it would for a guest in use).
        vm.vm()
            .run(0, Command::new(Op::Touch, data, pages, 3))
            .expect("touch");
        copy.sample();
        let t = Instant::now();
        let st = vm
            .space()
            .migrate(data..data.offset(pages), NodeId(node), MigrateWalk::Shared)
            .expect("migrate");
        let d = t.elapsed();
        if d < best {
            (best, unmaps, runs) = (d, st.host_unmaps, st.runs);
        }
        node ^= 1;
    }
    let v = vm
        .vm()
        .run(0, Command::new(Op::Verify, data, pages, 3))
        .expect("verify");
    assert_eq!(v.mismatches(), 0, "the guest's memory survived the moves");
    let g = gbs(bytes, best);
    let copy = copy.best;
    eprintln!(
        "guest batched {g:.2} GB/s ({:.0}% of memcpy; {unmaps} host unmaps for {runs} runs)",
        100.0 * g / copy
    );
    exp.push(batched_row("batched-guest", pages, g, copy, unmaps, runs));
}

fn walks(exp: &mut Experiment, pages: u64, secs: f64) {
    for threads in [1usize, 2] {
        for walk in WALKS {
            let bytes = pages * PAGE_SIZE as u64;
            let mm: Arc<Manager> =
                setup::manager_nodes(2 * (2 * bytes + 64 * MIB), 2, ManagerConfig::default());
            let parent = setup::written_vm(&mm, pages, 1);
            let stop = Arc::new(AtomicBool::new(false));
            let forks = Arc::new(AtomicU64::new(0));
            let forker = {
                let (parent, stop, forks) =
                    (Arc::clone(&parent), Arc::clone(&stop), Arc::clone(&forks));
                std::thread::spawn(move || {
                    let mut alive = std::collections::VecDeque::new();
                    while !stop.load(Ordering::Relaxed) {
                        let c = parent.fork(Arc::new(guestmem::mmu::NoopMmu)).expect("fork");
                        setup::write_pages(&c, 0, 16, 2);
                        alive.push_back(c);
                        if alive.len() > 8 {
                            if let Some(old) = alive.pop_front() {
                                old.exit();
                            }
                        }
                        forks.fetch_add(1, Ordering::Relaxed);
                    }
                })
            };
            let moved = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let movers: Vec<_> = (0..threads)
                .map(|t| {
                    let (parent, stop, moved) =
                        (Arc::clone(&parent), Arc::clone(&stop), Arc::clone(&moved));
                    let share = pages / threads as u64;
                    std::thread::spawn(move || {
                        let range = Gfn(t as u64 * share)..Gfn((t as u64 + 1) * share);
                        let mut node = 1u16;
                        while !stop.load(Ordering::Relaxed) {
                            let st = parent
                                .migrate(range.clone(), NodeId(node), walk)
                                .expect("migrate");
                            moved.fetch_add(st.pages, Ordering::Relaxed);
                            node ^= 1;
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
            for m in movers {
                m.join().expect("mover");
            }
            let elapsed = start.elapsed();
            forker.join().expect("forker");
            let g = gbs(moved.load(Ordering::Relaxed) * PAGE_SIZE as u64, elapsed);
            let fps = forks.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
            eprintln!("walks {walk:?} x{threads}: {g:.2} GB/s moved beside {fps:.0} forks+exits/s");
            exp.push(
                Row::new(format!("walks-{walk:?}").to_lowercase().as_str())
                    .param("threads", threads as u64)
                    .metric("gb_per_sec", g)
                    .metric("forks_per_sec", fps),
            );
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn stall(exp: &mut Experiment, hv: &Hypervisor, pages: u64, commands: usize) {
    let bytes = pages * PAGE_SIZE as u64;
    let mem = DATA_START + bytes + 2 * MIB;
    let mm = setup::manager_nodes(2 * (mem + 8 * MIB), 2, ManagerConfig::default());
    let vm = Arc::new(ManagedVm::new(hv, &VmConfig::new(mem, 1), &mm).expect("vm"));
    let data = Gfn(DATA_START / 4096);
    vm.vm()
        .run(0, Command::new(Op::Fill, data, pages, 3))
        .expect("fill");
    let timed = |n: usize| -> Vec<Duration> {
        let mut lat = Vec::with_capacity(n);
        for k in 0..n {
            let at = (k as u64 * 64) % pages;
            let t = Instant::now();
            vm.vm()
                .run(0, Command::new(Op::Dirty, data.offset(at), 64, 3))
                .expect("dirty");
            lat.push(t.elapsed());
        }
        lat.sort();
        lat
    };
    let quiet = timed(commands);
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let (vm, stop) = (Arc::clone(&vm), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut node = 1u16;
            let mut st = guestmem::MigrateStats::default();
            while !stop.load(Ordering::Relaxed) {
                let s = vm
                    .space()
                    .migrate(data..data.offset(pages), NodeId(node), MigrateWalk::Shared)
                    .expect("migrate");
                st.pages += s.pages;
                node ^= 1;
            }
            st.pages
        })
    };
    let busy = timed(commands);
    stop.store(true, Ordering::Relaxed);
    let moved = mover.join().expect("mover");
    let (q50, q99) = (percentile(&quiet, 0.5), percentile(&quiet, 0.99));
    let (b50, b99) = (percentile(&busy, 0.5), percentile(&busy, 0.99));
    eprintln!(
        "stall: 64-page guest write commands p50/p99 {q50:.0}/{q99:.0} us quiet, {b50:.0}/{b99:.0} us while {moved} pages moved"
    );
    for (variant, p50, p99) in [("stall-quiet", q50, q99), ("stall-migrating", b50, b99)] {
        exp.push(
            Row::new(variant)
                .param("pages", pages)
                .metric("p50_us", p50)
                .metric("p99_us", p99),
        );
    }
}

fn main() {
    let mode = Mode::from_args();
    let mut exp = Experiment::new("migrate", mode);
    let pages = mode.pick(1024, 16384, 65536);
    let reps = mode.pick(1, 3, 5);
    let mut copy = Memcpy::new((pages * PAGE_SIZE as u64) as usize, reps.max(3));
    software(&mut exp, pages, reps, &mut copy);
    walks(&mut exp, pages, mode.pick(0.1, 1.0, 3.0));
    match Hypervisor::new() {
        Ok(hv) => {
            guest_batched(&mut exp, &hv, pages, reps, &mut copy);
            stall(&mut exp, &hv, pages / 2, mode.pick(50, 2000, 10000));
        }
        Err(e) if std::env::var("SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("migrate: guest parts skipped ({e})");
        }
        Err(e) => panic!("migrate needs KVM: {e} (set SKIP_KVM=1 to skip)"),
    }
    // The copy speed every share above was held against (the best sample of the run);
    // a share written before a later, faster sample is recomputed here.
    for r in exp.rows.iter_mut() {
        if let Some(g) = r.metrics.get("gb_per_sec").copied()
            && r.metrics.contains_key("share_of_memcpy")
        {
            r.metrics.insert("share_of_memcpy".into(), g / copy.best);
        }
    }
    exp.push(
        Row::new("memcpy")
            .param("pages", pages)
            .metric("gb_per_sec", copy.best),
    );
    eprintln!("memcpy best of the run: {:.2} GB/s", copy.best);
    exp.bars(&kvmm::Bars {
        stem: "throughput",
        title: "migration GB/s (memcpy: the copy speed of the run)",
        y: "gb_per_sec",
        only: &[],
    });
    exp.bars(&kvmm::Bars {
        stem: "stall",
        title: "guest write command p99 (us), quiet vs while moving",
        y: "p99_us",
        only: &[],
    });
    exp.finish();
}

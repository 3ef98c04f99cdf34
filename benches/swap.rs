//! `swap`: swap-out throughput and swap-in cost (issue 10).
//!
//! 1. Swap-out, software VM: a VM writes every page of a region with incompressible
//!    data (no same-filled pages) in a prefaulted pool with a swap file attached; after
//!    one aging pass, one thread reclaims every page (`shrink_node`): referenced walk,
//!    swap-cache insert, entries replaced, one `pwritev` per run of slots, hole punched
//!    (or not, see below), frame freed. Reported in GB/s of pages written, with the device's write calls.
//! 2. Swap-in, software access: one 8-byte read per swapped page in order, each timed;
//!    p50 and p99 per access, and per major fault (an access that read its page from
//!    the file, with readahead of up to 64 neighbours, which later accesses find
//!    mapped). `warm`: the swap file's pages are still in the host page cache (just
//!    written); `cold`: after `echo 1 > /proc/sys/vm/drop_caches` (skipped if not
//!    permitted).
//! 3. Swap-in, KVM guest (needs /dev/kvm; SKIP_KVM=1 skips): a guest's pages are all
//!    swapped out, then the guest verifies them (one userfaultfd MISSING fault + read per
//!    page) — average ns per page — against the same guest's copy-on-write faults after
//!    a fork in the same run (a clone writes every page: one WP fault + copy per page).
//!    Both sides run cold in guest terms: every page faults once.
//!
//! Swap-out runs with synchronous `pwritev` (`SwapIo::Pwritev`, the default) and with
//! io_uring (`SwapIo::IoUring`: a batch is written by the kernel's workers while the
//! next is unmapped). Each part runs with
//! reclaimed frames' host memory punched at once
//! (`Punch::OnReclaim`: a swap-in's frames are allocated and zeroed by the host again)
//! and with it kept for reuse (`Punch::WhenIdle`, the default: the background
//! reclaimer returns free memory only when no node is under pressure).
//!
//! `cargo bench --bench swap -- --quick`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::reclaim::swap::{SwapConfig, SwapDevice, SwapIo};
use guestmem::reclaim::{Punch, ReclaimConfig};
use guestmem::{Gfn, Gpa, Manager, ManagerConfig, PAGE_SIZE, ReferencedLocking};
use kvmm::{Experiment, Mode, Row, setup};
use vmm::guest::DATA_START;
use vmm::{Command, ForkOptions, Hypervisor, ManagedVm, Op, VmConfig};

fn attach(mm: &Manager, slots: u64, punch: Punch, io: SwapIo) {
    let dev = SwapDevice::create(&SwapConfig {
        slots,
        io,
        ..Default::default()
    })
    .expect("a swap file in the temp dir");
    let mut cfg = ReclaimConfig::for_pool(mm.pool().total_frames());
    cfg.referenced = ReferencedLocking::Trylock;
    cfg.punch = punch;
    mm.attach_swap(dev, cfg).expect("attach");
}

/// Ages every frame once (moves them to the active list, young bits cleared, and back),
/// so the timed pass reclaims without first finding them referenced.
fn age(mm: &Manager) {
    for pfn in (0..mm.pool().total_frames()).map(|p| guestmem::Pfn(p as u32)) {
        mm.frame_referenced(pfn, ReferencedLocking::Blocking);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn drop_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

fn label(punch: Punch) -> &'static str {
    match punch {
        Punch::OnReclaim => "on-reclaim",
        Punch::WhenIdle => "when-idle",
    }
}

fn software(exp: &mut Experiment, pages: u64, punch: Punch, io: SwapIo) {
    let mm = setup::manager((pages + 4096) * PAGE_SIZE as u64, ManagerConfig::default());
    attach(&mm, pages + 1024, punch, io);
    let io = mm.swap_device().expect("attached").io();
    let p = label(punch);
    let vm = mm
        .create(
            &[guestmem::RegionSpec {
                start: Gfn(0),
                pages,
            }],
            Arc::new(guestmem::mmu::NoopMmu),
        )
        .expect("vm");
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        for w in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        vm.write(Gpa(p * PAGE_SIZE as u64), &page).expect("write");
    }
    age(&mm);
    let calls0 = mm.swap_device().expect("attached").stats().write_calls;
    let t = Instant::now();
    let res = mm.shrink_node(0, u64::MAX, None);
    let secs = t.elapsed().as_secs_f64();
    let st = mm.reclaim_stats();
    let calls = mm.swap_device().expect("attached").stats().write_calls - calls0;
    assert_eq!(
        vm.memory().swapped,
        pages,
        "every page swapped out: {res:?} {st:?}"
    );
    let gbs = (st.written * PAGE_SIZE as u64) as f64 / secs / 1e9;
    eprintln!(
        "swap-out (punch {p}, {io:?}): {} pages in {:.3} s = {gbs:.2} GB/s, {calls} write calls",
        st.written, secs
    );
    exp.push(
        Row::new("swap-out")
            .param("pages", pages)
            .param("punch", p)
            .param("io", format!("{io:?}"))
            .metric("gb_per_sec", gbs)
            .metric(
                "pages_per_write_call",
                st.written as f64 / calls.max(1) as f64,
            ),
    );
    for (variant, cold) in [
        ("software-swapin-warm", false),
        ("software-swapin-cold", true),
    ] {
        if cold {
            // Swap everything out again (the pages just read are clean: no writes), and
            // drop the page cache.
            age(&mm);
            mm.shrink_node(0, u64::MAX, None);
            if !drop_caches() {
                eprintln!("{variant}: skipped (cannot write /proc/sys/vm/drop_caches)");
                continue;
            }
        }
        let n = pages.min(16384);
        let mut lat = Vec::with_capacity(n as usize);
        let mut faults = Vec::new();
        let mut b = [0u8; 8];
        for p in 0..n {
            let before = vm.counters().major_faults;
            let t = Instant::now();
            vm.read(Gpa(p * PAGE_SIZE as u64), &mut b).expect("read");
            let d = t.elapsed();
            lat.push(d);
            if vm.counters().major_faults > before {
                faults.push(d);
            }
        }
        lat.sort();
        faults.sort();
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        let (f50, f99) = (percentile(&faults, 0.5), percentile(&faults, 0.99));
        eprintln!(
            "{variant} (punch {p}, {io:?}): per access p50 {p50:.1} us, p99 {p99:.1} us over {n} pages; per major fault (readahead of up to 64 pages) p50 {f50:.1} us, p99 {f99:.1} us over {} faults",
            faults.len()
        );
        exp.push(
            Row::new(variant)
                .param("pages", n)
                .param("punch", p)
                .param("io", format!("{io:?}"))
                .metric("access_p50_us", p50)
                .metric("access_p99_us", p99)
                .metric("fault_p50_us", f50)
                .metric("fault_p99_us", f99)
                .metric("major_faults", faults.len() as f64),
        );
    }
    vm.exit();
}

fn guest(exp: &mut Experiment, hv: &Hypervisor, pages: u64, punch: Punch) {
    let mem = pages * PAGE_SIZE as u64 + (8 << 20);
    let mm = setup::manager(3 * mem, ManagerConfig::default());
    attach(&mm, pages + 4096, punch, SwapIo::default());
    let p = label(punch);
    let vm = ManagedVm::new(hv, &VmConfig::new(mem, 1), &mm).expect("vm");
    let data = Gfn(DATA_START / 4096);
    let run = |vm: &ManagedVm, op, seed| -> Duration {
        let t = Instant::now();
        let r = vm
            .vm()
            .run(0, Command::new(op, data, pages, seed))
            .expect("guest work");
        assert_eq!(r.mismatches(), 0, "guest memory corrupted");
        t.elapsed()
    };
    run(&vm, Op::Fill, 5);
    age(&mm);
    mm.shrink_node(0, u64::MAX, None);
    let swapped = vm.memory().swapped;
    assert!(swapped >= pages, "the guest's pages are swapped: {swapped}");
    let majors = vm.counters().major_faults;
    let swapin = run(&vm, Op::Verify, 5);
    let majors = vm.counters().major_faults - majors;
    let (clones, _) = vm.fork_with(hv, &ForkOptions::new(1), None).expect("fork");
    let cow = run(&clones[0], Op::Fill, 6);
    let per = |d: Duration| d.as_secs_f64() * 1e9 / pages as f64;
    let (si, cw) = (per(swapin), per(cow));
    eprintln!(
        "guest (punch {p}): swap-in {si:.0} ns/page ({majors} major faults), guest COW {cw:.0} ns/page: {:.2}x",
        si / cw
    );
    exp.push(
        Row::new("guest-swapin")
            .param("pages", pages)
            .param("punch", p)
            .metric("ns_per_page", si)
            .metric("major_faults", majors as f64),
    );
    exp.push(
        Row::new("guest-cow")
            .param("pages", pages)
            .param("punch", p)
            .metric("ns_per_page", cw),
    );
}

const PUNCH: [Punch; 2] = [Punch::OnReclaim, Punch::WhenIdle];

fn main() {
    let mode = Mode::from_args();
    let mut exp = Experiment::new("swap", mode);
    for (punch, io) in [
        (Punch::OnReclaim, SwapIo::Pwritev),
        (Punch::WhenIdle, SwapIo::Pwritev),
        (Punch::WhenIdle, SwapIo::IoUring),
    ] {
        software(&mut exp, mode.pick(2048, 65536, 262144), punch, io);
    }
    match Hypervisor::new() {
        Ok(hv) => {
            for punch in PUNCH {
                guest(&mut exp, &hv, mode.pick(512, 16384, 32768), punch);
            }
        }
        Err(e) if std::env::var("SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("swap: guest part skipped ({e})");
        }
        Err(e) => panic!("swap needs KVM: {e} (set SKIP_KVM=1 to skip)"),
    }
    exp.bars(&kvmm::Bars {
        stem: "throughput",
        title: "swap-out GB/s by punch and I/O mode",
        y: "gb_per_sec",
        only: &[],
    });
    exp.finish();
}

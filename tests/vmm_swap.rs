//! Reclaim and swap under real KVM guests (issue 10): guests whose memory is twice the
//! pool verify every word after their pages went to the swap file and came back through
//! userfaultfd faults; a snapshot-fork in overcommit keeps every clone's bytes; injected
//! write errors (EIO) and a full disk (ENOSPC) lose nothing. Needs /dev/kvm (fails saying
//! so unless SKIP_KVM=1).

use std::sync::Arc;

use guestmem::reclaim::swap::{InjectedFault, SwapConfig, SwapDevice};
use guestmem::reclaim::{ReclaimConfig, Reclaimer};
use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::{Command, ForkOptions, ManagedVm, Op, VmConfig};

mod common;
use common::{hypervisor, two_vcpus_on_two_nodes};

const MIB: u64 = 1 << 20;

fn manager(pool_bytes: u64, swap_bytes: u64) -> Arc<Manager> {
    manager_nodes(pool_bytes, 1, swap_bytes)
}

/// A manager whose pool of `pool_bytes` has `nodes` nodes, with a swap file attached.
fn manager_nodes(pool_bytes: u64, nodes: usize, swap_bytes: u64) -> Arc<Manager> {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(
            pool_bytes,
            nodes,
            AllocatorKind::Magazine,
        ))
        .expect("pool"),
    );
    let frames = pool.total_frames();
    let mm = Manager::new(pool, ManagerConfig::default());
    let dev = SwapDevice::create(&SwapConfig {
        slots: swap_bytes / 4096,
        ..Default::default()
    })
    .expect("swap file in the temp dir");
    mm.attach_swap(dev, ReclaimConfig::for_pool(frames))
        .expect("attach");
    mm
}

fn data(page: u64) -> Gfn {
    Gfn(DATA_START / 4096 + page)
}

fn run(vm: &ManagedVm, cmd: Command) -> vmm::CmdResult {
    vm.vm()
        .run(0, cmd)
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn fill(vm: &ManagedVm, start: u64, pages: u64, seed: u64) {
    run(vm, Command::new(Op::Fill, data(start), pages, seed));
}

fn mismatches(vm: &ManagedVm, start: u64, pages: u64, seed: u64) -> u64 {
    run(vm, Command::new(Op::Verify, data(start), pages, seed)).mismatches()
}

#[test]
fn a_guest_touching_twice_its_pool_verifies_every_word() {
    let Some(hv) = hypervisor() else { return };
    // 64 MiB of guest RAM written, in a 32 MiB pool.
    let mm = manager(32 * MIB, 128 * MIB);
    let _kswapd = Reclaimer::start(&mm).expect("kswapd");
    let vm = ManagedVm::new(&hv, &VmConfig::new(72 * MIB, 1), &mm).expect("vm");
    let pages = 64 * MIB / 4096;
    fill(&vm, 0, pages, 7);
    assert_eq!(mismatches(&vm, 0, pages, 7), 0, "every word after swap-in");
    // And once more: pages swapped in are reclaimed again (clean ones without I/O).
    assert_eq!(mismatches(&vm, 0, pages, 7), 0);
    let st = mm.reclaim_stats();
    assert!(
        st.written >= pages / 4 && st.major_faults >= pages / 4,
        "the guest's pages went to swap and came back: {st:?}"
    );
    let c = vm.counters();
    assert!(c.major_faults > 0 && c.swapins >= c.major_faults, "{c:?}");
    let windows = vm.vm().window().host_mappings();
    eprintln!("reclaim {st:?}; window mappings {windows:?}");
    drop(vm);
}

#[test]
fn a_guest_in_overcommit_keeps_its_host_mappings_to_two_per_span() {
    let Some(hv) = hypervisor() else { return };
    // 128 MiB written twice and verified twice in a 64 MiB pool, with the window allowed
    // two host mappings per 64-page span (plus the boot region's): reclaim that left
    // single frames between frames in use, or split runs per page, would pass it.
    let mm = manager(64 * MIB, 256 * MIB);
    let _kswapd = Reclaimer::start(&mm).expect("kswapd");
    let vm = ManagedVm::new(&hv, &VmConfig::new(130 * MIB, 1), &mm).expect("vm");
    let window = vm.vm().window();
    let spans = window.pages() / guestmem::space::UNMAP_SPAN;
    window.set_map_budget(2 * spans + 64);
    let pages = 128 * MIB / 4096;
    for seed in [5, 6] {
        fill(&vm, 0, pages, seed);
        assert_eq!(
            mismatches(&vm, 0, pages, seed),
            0,
            "every word, seed {seed}"
        );
        assert_eq!(mismatches(&vm, 0, pages, seed), 0, "every word again");
    }
    let st = mm.reclaim_stats();
    assert!(st.written >= pages / 4 && st.major_faults > 0, "{st:?}");
    let used = window.host_mappings().expect("/proc/self/maps");
    assert!(
        used <= 2 * spans + 64,
        "{used} host mappings for {spans} spans"
    );
    eprintln!("{used} host mappings for {spans} spans; {st:?}");
}

#[test]
fn a_vcpu_waiting_on_a_swap_in_does_not_hold_up_its_sibling() {
    let Some(hv) = hypervisor() else { return };
    let mm = manager(24 * MIB, 128 * MIB);
    let kswapd = Reclaimer::start(&mm).expect("kswapd");
    let vm = Arc::new(ManagedVm::new(&hv, &VmConfig::new(64 * MIB, 2), &mm).expect("vm"));
    // 32 MiB written in a 24 MiB pool: the first pages are swapped out.
    let pages = 32 * MIB / 4096;
    fill(&vm, 0, pages, 3);
    drop(kswapd);
    // Reclaim until the first page is out (the LRU may hold it active for a pass or two).
    for _ in 0..16 {
        if vm.space().pte(data(0)).is_ok_and(|p| !p.is_present()) {
            break;
        }
        mm.shrink_node(0, 1024, None);
    }
    assert!(
        vm.space().pte(data(0)).is_ok_and(|p| !p.is_present()),
        "the first page was swapped out: {:?}",
        mm.reclaim_stats()
    );
    let dev = mm.swap_device().expect("swap");
    dev.hold_reads(true);
    // vCPU 0 reads the swapped-out pages: its fault's read waits.
    let reader = {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || {
            vm.vm()
                .run(0, Command::new(Op::Verify, data(0), pages, 3))
                .map(|r| r.mismatches())
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while dev.reads_waiting() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "vCPU 0 never reached a swap-in"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // vCPU 1 writes memory no one touched: its faults need no read and must not queue
    // behind vCPU 0's.
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || {
            let r = vm
                .vm()
                .run(1, Command::new(Op::Fill, data(pages), 256, 4))
                .map(|r| r.mismatches());
            let _ = tx.send(());
            r
        })
    };
    let done = rx.recv_timeout(std::time::Duration::from_secs(30));
    assert!(
        dev.reads_waiting() > 0,
        "vCPU 0's swap-in was still waiting"
    );
    dev.hold_reads(false);
    assert!(
        done.is_ok(),
        "vCPU 1 finished its fill while vCPU 0 waited on a swap-in"
    );
    writer.join().expect("writer").expect("vCPU 1 fill");
    assert_eq!(reader.join().expect("reader").expect("vCPU 0 verify"), 0);
    assert_eq!(mismatches(&vm, pages, 256, 4), 0);
}

#[test]
fn a_vm_out_of_memory_and_swap_fails_alone_and_its_sibling_runs_on() {
    let Some(hv) = hypervisor() else { return };
    // A 16 MiB swap file for both. B keeps 8 MiB under its limit of 12 MiB; A may hold
    // 18 MiB and writes 64 MiB: once the swap file is full, A runs out of memory.
    let mm = manager(32 * MIB, 16 * MIB);
    let _kswapd = Reclaimer::start(&mm).expect("kswapd");
    let b = ManagedVm::new(&hv, &VmConfig::new(16 * MIB, 1), &mm).expect("vm b");
    b.space().set_limit(Some(12 * MIB / 4096));
    let b_pages = 8 * MIB / 4096;
    fill(&b, 0, b_pages, 2);
    let a = ManagedVm::new(&hv, &VmConfig::new(72 * MIB, 1), &mm).expect("vm a");
    a.space().set_limit(Some(18 * MIB / 4096));
    let err = a
        .vm()
        .run(0, Command::new(Op::Fill, data(0), 64 * MIB / 4096, 1))
        .expect_err("A cannot hold 64 MiB in 18 MiB and 16 MiB of swap");
    let msg = err.to_string();
    eprintln!("A: {msg}");
    assert!(
        matches!(err, vmm::VcpuError::FaultFailed { .. }) && msg.contains("swap"),
        "a clear out-of-memory error naming swap: {msg}"
    );
    assert!(a.vm().failure().is_some(), "A is stopped");
    // B runs on: its bytes are there, and it can write and read again.
    assert_eq!(mismatches(&b, 0, b_pages, 2), 0, "B's bytes");
    fill(&b, 0, b_pages, 3);
    assert_eq!(mismatches(&b, 0, b_pages, 3), 0, "B after A failed");
    drop(a);
    fill(&b, 0, b_pages, 4);
    assert_eq!(mismatches(&b, 0, b_pages, 4), 0, "B after A exited");
}

#[test]
fn clones_forked_in_overcommit_keep_their_own_bytes() {
    let Some(hv) = hypervisor() else { return };
    let mm = manager(24 * MIB, 256 * MIB);
    let _kswapd = Reclaimer::start(&mm).expect("kswapd");
    let cfg = VmConfig::new(40 * MIB, 1);
    let parent = ManagedVm::new(&hv, &cfg, &mm).expect("vm");
    let pages = 32 * MIB / 4096;
    fill(&parent, 0, pages, 1);
    let (clones, _) = parent
        .fork_with(&hv, &ForkOptions::new(4), None)
        .unwrap_or_else(|e| panic!("fork: {e}"));
    // Each clone rewrites its own quarter: 4 x 8 MiB private on top of the shared 32 MiB.
    let quarter = pages / 4;
    for (i, c) in clones.iter().enumerate() {
        fill(c, i as u64 * quarter, quarter, 10 + i as u64);
    }
    for (i, c) in clones.iter().enumerate() {
        for q in 0..4u64 {
            let seed = if q == i as u64 { 10 + q } else { 1 };
            assert_eq!(
                mismatches(c, q * quarter, quarter, seed),
                0,
                "clone {i} quarter {q}"
            );
        }
    }
    assert_eq!(mismatches(&parent, 0, pages, 1), 0, "the parent");
    let st = mm.reclaim_stats();
    assert!(st.written > 0 && st.major_faults > 0, "{st:?}");
}

#[test]
fn write_errors_and_a_full_disk_keep_every_page() {
    let Some(hv) = hypervisor() else { return };
    for fault in [
        InjectedFault::Eio { next: u64::MAX },
        InjectedFault::NoSpace,
    ] {
        let mm = manager(24 * MIB, 128 * MIB);
        let _kswapd = Reclaimer::start(&mm).expect("kswapd");
        let vm = ManagedVm::new(&hv, &VmConfig::new(40 * MIB, 1), &mm).expect("vm");
        // Fill half the pool, make the disk fail, then ask for more than the pool holds:
        // reclaim can only drop what needs no write, so the guest runs out of memory
        // cleanly or fits; whatever it wrote before must read back.
        let pages = 8 * MIB / 4096;
        fill(&vm, 0, pages, 3);
        mm.swap_device().unwrap().inject(Some(fault));
        // Force reclaim to try: everything cold goes to the (failing) device.
        for _ in 0..4 {
            mm.shrink_node(0, u64::MAX, None);
        }
        let st = mm.reclaim_stats();
        assert!(
            st.write_failed > 0,
            "{fault:?}: writes were attempted: {st:?}"
        );
        assert_eq!(mismatches(&vm, 0, pages, 3), 0, "{fault:?}: nothing lost");
        let dev = mm.swap_device().unwrap();
        match fault {
            InjectedFault::Eio { .. } => assert!(dev.stats().bad > 0, "EIO slots marked bad"),
            InjectedFault::NoSpace => assert!(dev.is_stopped(), "a full disk stops swap-out"),
        }
        // With the device healthy again (EIO) the pages can go out on new slots.
        dev.inject(None);
    }
}

#[test]
fn hinting_faults_race_with_reclaim_and_swap_in_and_lose_nothing() {
    let Some(hv) = hypervisor() else { return };
    // Two nodes of 16 MiB each, a guest whose two vCPUs (one per node) write 32 MiB
    // each: its pages go to swap and back while balancing harvests make every next
    // access a hinting fault.
    let mm = manager_nodes(32 * MIB, 2, 128 * MIB);
    let _kswapd = Reclaimer::start(&mm).expect("kswapd");
    let vm = ManagedVm::new(&hv, &two_vcpus_on_two_nodes(72 * MIB), &mm).expect("vm");
    let n = 32 * MIB / 4096;
    let slice = |cpu: usize, op, seed| {
        vm.vm()
            .run(cpu, Command::new(op, data(cpu as u64 * n), n, seed))
            .unwrap_or_else(|e| panic!("vCPU {cpu} {op:?}: {e}"))
    };
    std::thread::scope(|s| {
        for cpu in 0..2 {
            s.spawn(move || slice(cpu, Op::Fill, cpu as u64 + 1));
        }
    });
    let bcfg = guestmem::BalanceConfig::default();
    // Each round reads everything (pages come back from swap read-only, still in the
    // swap cache), harvests, rewrites with a new seed (hinting faults on pages that must
    // stay write-protected until the write takes them out of the swap cache), harvests
    // and verifies.
    let both = |op, seed: u64| -> Vec<u64> {
        std::thread::scope(|s| {
            let h: Vec<_> = (0..2)
                .map(|cpu| s.spawn(move || slice(cpu, op, seed + cpu as u64).mismatches()))
                .collect();
            h.into_iter().map(|h| h.join().expect("a vCPU")).collect()
        })
    };
    for round in 0..3u64 {
        let seed = 10 * round + 1;
        assert_eq!(both(Op::Verify, seed), [0, 0], "round {round}, before");
        mm.balance_numa(&bcfg);
        both(Op::Fill, seed + 10);
        mm.balance_numa(&bcfg);
        assert_eq!(both(Op::Verify, seed + 10), [0, 0], "round {round}, after");
    }
    let (st, hints) = (mm.reclaim_stats(), vm.fault_counts().hint);
    eprintln!("reclaim {st:?}; {hints} hinting faults");
    assert!(st.major_faults > 0 && hints > 0, "{st:?}, {hints} hints");
}

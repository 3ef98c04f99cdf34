//! Guest access harvesting (`Window::harvest_accessed`, guestmem's
//! `HostMmu::harvest_accessed`) with a real KVM guest:
//!
//! - a guest that touches a known set of pages (a `touch` range and seeded `random`
//!   accesses) is reported exactly that set, and a second harvest with no guest work in
//!   between reports nothing; the data survives the zaps;
//! - a write-protected page stays write-protected across a harvest: after an in-place
//!   fork, the parent's touched pages are harvested (zapped), still carry their uffd-wp
//!   marker, and the parent's writes still copy (the clone verifies every word of the old
//!   contents, the parent reads its new ones);
//! - a hole stays a hole: never reported, and the guest's first access to it still raises
//!   a MISSING fault (its registration survived); the harvest changes no host mapping.
//!
//! Needs /dev/kvm (fails saying so unless SKIP_KVM=1).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use guestmem::mmu::HostMmu;
use guestmem::types::{Gfn, Gpa};
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::{DATA_START, pattern, random_accesses};
use vmm::sys::pagemap::{PM_PRESENT, PM_UFFD_WP, Pagemap};
use vmm::{Command, ForkOptions, Hypervisor, ManagedVm, Op, ParentMode, VmConfig};

const MIB: u64 = 1 << 20;
const DATA: u64 = DATA_START / 4096;

fn setup(mem: u64) -> Option<(Hypervisor, Arc<Manager>)> {
    if !common::kvm() {
        return None;
    }
    let hv = Hypervisor::new().expect("open /dev/kvm");
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(4 * mem, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    Some((hv, Manager::new(pool, ManagerConfig::default())))
}

/// The pages (relative to the harvested range) whose bits are set.
fn pages_of(bitmap: &[u64], pages: u64) -> BTreeSet<u64> {
    (0..pages)
        .filter(|&p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// Harvests data pages `0 .. pages` of `vm` through the `HostMmu` trait, as reclaim does.
fn harvest(vm: &ManagedVm, pages: u64) -> BTreeSet<u64> {
    let mut bitmap = Vec::new();
    let has = HostMmu::harvest_accessed(&**vm.vm().window(), Gfn(DATA), pages, &mut bitmap)
        .expect("harvest");
    assert!(has, "a window reports access information");
    assert_eq!(bitmap.len() as u64, pages.div_ceil(64));
    pages_of(&bitmap, pages)
}

#[test]
fn harvest_reports_exactly_the_pages_the_guest_touched_then_nothing() {
    let mem = 32 * MIB;
    let Some((hv, mm)) = setup(mem) else { return };
    let vm = ManagedVm::new(&hv, &VmConfig::new(mem, 1), &mm).expect("VM");
    let n = 4096;
    vm.vm()
        .run(0, Command::new(Op::Fill, Gfn(DATA), n, 1))
        .expect("fill");
    // Arm: every page the fill mapped is reported once and zapped (its last first-touch
    // run may reach past the filled range: a sequential fill's runs grow to 2 MiB, and a
    // page counts as accessed until its first harvest).
    let armed = harvest(&vm, n);
    assert_eq!(armed.len() as u64, n, "the fill touched every page");
    let mut rest = Vec::new();
    let window = vm.vm().window();
    window
        .harvest_accessed(Gfn(DATA + n), window.pages() - DATA - n, &mut rest)
        .expect("arm the rest of the window");

    vm.vm()
        .run(0, Command::new(Op::Touch, Gfn(DATA + 100), 200, 0))
        .expect("touch");
    let random = Command::random(Gfn(DATA + 1000), 2000, 5, 300);
    vm.vm().run(0, random).expect("random");
    let mut expected: BTreeSet<u64> = (100..300).collect();
    expected.extend(random_accesses(&random).map(|a| a.gpa / 4096 - DATA));
    let got = harvest(&vm, n);
    let missed: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(&expected).collect();
    assert!(
        missed.is_empty() && extra.is_empty(),
        "harvest must name exactly the {} pages touched: missed {} (first {:?}), extra {} (first {:?})",
        expected.len(),
        missed.len(),
        &missed[..missed.len().min(8)],
        extra.len(),
        &extra[..extra.len().min(8)]
    );

    // Nothing ran since: nothing is reported, anywhere in the window.
    let again = harvest(&vm, n);
    assert!(
        again.is_empty(),
        "no guest work, no access: {} pages reported (first {:?})",
        again.len(),
        again.first()
    );
    let window = vm.vm().window();
    let mut whole = Vec::new();
    window
        .harvest_accessed(Gfn(0), window.pages(), &mut whole)
        .expect("harvest the whole window");
    let boot = pages_of(&whole, window.pages());
    assert!(
        boot.iter().all(|&p| p < DATA),
        "only boot pages may be reported outside the data range: {} pages (last {:?})",
        boot.len(),
        boot.last()
    );
    assert!(
        window
            .harvest_accessed(Gfn(0), window.pages(), &mut whole)
            .is_ok()
    );
    assert!(
        pages_of(&whole, window.pages()).is_empty(),
        "a second whole-window harvest reports nothing"
    );

    // The zaps lost no data (the random range is left out: it also wrote).
    for (from, to) in [(0, 1000), (3000, n)] {
        let r = vm
            .vm()
            .run(0, Command::new(Op::Verify, Gfn(DATA + from), to - from, 1))
            .expect("verify");
        assert_eq!(r.mismatches(), 0, "zapped pages keep their contents");
    }
}

#[test]
fn write_protected_pages_stay_write_protected_across_a_harvest() {
    let mem = 32 * MIB;
    let Some((hv, mm)) = setup(mem) else { return };
    let parent = ManagedVm::new(&hv, &VmConfig::new(mem, 1), &mm).expect("VM");
    let n = 1024;
    parent
        .vm()
        .run(0, Command::new(Op::Fill, Gfn(DATA), n, 1))
        .expect("fill");
    let opts = ForkOptions {
        parent: ParentMode::InPlace,
        ..ForkOptions::new(1)
    };
    let (clones, _) = parent.fork(&hv, &opts).expect("fork");
    // The parent reads every page (no fault: write-protected, still mapped), then the
    // harvest reports and zaps them all.
    parent
        .vm()
        .run(0, Command::new(Op::Touch, Gfn(DATA), n, 0))
        .expect("touch");
    assert_eq!(harvest(&parent, n).len() as u64, n);
    // Each zapped page kept its uffd-wp state (a PTE marker) and is not present.
    let pm = Pagemap::open().expect("pagemap");
    let window = parent.vm().window();
    let pin = window.pin();
    let mut entries = vec![0u64; n as usize];
    pm.read(pin.base() + DATA_START, &mut entries)
        .expect("pagemap read");
    drop(pin);
    let unprotected: Vec<usize> = (0..n as usize)
        .filter(|&p| entries[p] & PM_UFFD_WP == 0 || entries[p] & PM_PRESENT != 0)
        .collect();
    assert!(
        unprotected.is_empty(),
        "zapped write-protected pages must keep a uffd-wp marker: {} of {n} did not (first {:?})",
        unprotected.len(),
        unprotected.first()
    );

    // The parent's writes still fault and copy: the clone keeps every old word.
    let wp0 = parent.fault_counts().write_protect;
    parent
        .vm()
        .run(0, Command::new(Op::Dirty, Gfn(DATA), n, 2))
        .expect("dirty");
    assert!(
        parent.fault_counts().write_protect > wp0,
        "writes to harvested write-protected pages must raise write-protect faults"
    );
    let r = clones[0]
        .vm()
        .run(0, Command::new(Op::Verify, Gfn(DATA), n, 1))
        .expect("clone verify");
    assert_eq!(
        r.mismatches(),
        0,
        "the parent's writes after a harvest must not reach the frames it shares with its clone"
    );
    for p in 0..n {
        let gpa = DATA_START + p * 4096;
        let first = parent.vm().read_u64(Gpa(gpa)).expect("read");
        let second = parent.vm().read_u64(Gpa(gpa + 8)).expect("read");
        assert_eq!(first, pattern(2, gpa), "page {p} not written");
        assert_eq!(second, pattern(1, gpa + 8), "page {p} not copied");
    }
}

#[test]
fn a_hole_stays_a_hole_across_a_harvest() {
    let mem = 32 * MIB;
    let Some((hv, mm)) = setup(mem) else { return };
    let vm = ManagedVm::new(&hv, &VmConfig::new(mem, 1), &mm).expect("VM");
    let n = 4096;
    vm.vm()
        .run(0, Command::new(Op::Fill, Gfn(DATA), 64, 1))
        .expect("fill");
    // Far from the fill and its fault-around: never mapped.
    let hole = 3000;
    let window = vm.vm().window();
    let mappings = window.host_mappings();
    let got = harvest(&vm, n);
    assert!(!got.contains(&hole), "a hole is never reported");
    assert!(
        got.iter().all(|&p| p < 64),
        "only filled pages: {} pages (last {:?})",
        got.len(),
        got.last()
    );
    assert_eq!(window.host_mappings(), mappings, "a harvest maps nothing");

    let f0 = vm.fault_counts();
    vm.vm()
        .run(0, Command::new(Op::Touch, Gfn(DATA + hole), 1, 0))
        .expect("touch the hole");
    let f1 = vm.fault_counts();
    assert!(
        f1.missing_read > f0.missing_read,
        "the guest's first access to a harvested hole must still raise a MISSING fault"
    );
    let got = harvest(&vm, n);
    assert!(got.contains(&hole), "the page faulted in is reported");
}

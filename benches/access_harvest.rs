//! `access_harvest`: ways to learn which pages a KVM guest accessed since the last check,
//! measured with a real guest (one VM on guestmem-managed memory, one vCPU pinned to CPU 0,
//! the built-in ring-3 guest) at 256 MiB and 1 GiB (16 MiB in smoke mode).
//!
//! Methods:
//!
//! - `zap+scan` (what `Window::harvest_accessed` does): `madvise(MADV_DONTNEED)` drops the
//!   host page-table entries of the window's memfd pages (the frames stay in the memfd's
//!   page cache; KVM drops its own entries through its MMU notifier); a guest access then
//!   takes a KVM fault plus a host minor fault that maps the same frame again; the
//!   `PAGEMAP_SCAN` ioctl (Linux 6.7+, categories PRESENT and FILE) then lists the present
//!   pages = the pages accessed. `arm` = the zap, `scan` = the ioctl, `harvest` = one
//!   `Window::harvest_accessed` call (scan, report, zap only what was present).
//! - `zap+pagemap`: the same, reading `/proc/self/pagemap` (8 bytes a page, bit 63
//!   present) instead of `PAGEMAP_SCAN`: the fallback before 6.7.
//! - `soft-dirty`: `/proc/self/clear_refs` "4" (clears soft-dirty for the whole process,
//!   write-protecting every writable PTE of it), guest writes, pagemap bit 55: written
//!   pages only, never reads; does a guest write through KVM set it here?
//! - `kvm-dirty-log`: `KVM_MEM_LOG_DIRTY_PAGES` on the memslot, `KVM_GET_DIRTY_LOG`
//!   (which re-protects): written pages only; its cost is KVM write-protecting its own
//!   entries and a KVM fault on each first write after a get.
//! - `uffd-minor`: `UFFD_FEATURE_MINOR_SHMEM`, register MINOR on a memfd mapping, zap, and
//!   each access raises a MINOR fault resolved by `UFFDIO_CONTINUE`: exact per-access
//!   events, one userfault round trip each. Measured host-side (a host thread touches,
//!   another resolves, both on CPU 0), and (`uffd-minor-guest`) as the VMM uses it for
//!   hinting faults that name the touching vCPU: a VM whose vCPUs live on two nodes has
//!   its window take MINOR faults (`Window::take_hinting_faults`); after a harvest, each
//!   guest access is a MINOR fault its handler resolves (`AddressSpace::hint_fault`,
//!   `UFFDIO_CONTINUE`). Its `reaccess_ns` compares with `zap+scan`'s, where the host
//!   kernel maps the page again by itself.
//! - Not measured: uffd-wp async mode with `PAGE_IS_WRITTEN` (async WP is a property of
//!   the whole userfaultfd, and a range registers with one userfaultfd only: the window's
//!   must stay synchronous, its WP faults are the copy-on-write path); DAMON (sysfs needs
//!   root, it samples regions of a pid's address space at millisecond intervals and
//!   reports region access frequencies, not an exact page set); page_idle (not built in).
//!
//! Accuracy: the guest touches a known set (a `touch` range of 1/8 of the pages and
//! `random` accesses, count 1/16 of the pages, over all of them); `false_neg` / `false_pos`
//! count pages of the data range missed / reported extra (`expected` pages). For the
//! written-only methods the set is the pages `random` wrote.
//!
//! On the dev host (PVM software KVM, kernel 6.18, 256 MiB and 1 GiB, `cargo bench`):
//! zap 50-66 ms/GiB (0.2 us a page); read-back of a fully present range 11-16 ms/GiB
//! with either interface, of an empty one 0.01-0.02 ms/GiB with `PAGEMAP_SCAN` against
//! 0.42 with pagemap reads; a whole harvest 57-61 ms/GiB with 18% of the pages accessed,
//! 66-68 with all; the guest's next access 4.1-4.5 us a page (17-19 ns when mapped);
//! exact sets (0 false negatives, 0 false positives). MINOR + `UFFDIO_CONTINUE` 6.7-8.0 us
//! a page before any KVM cost; the dirty log is exact for writes (enable 14-17 ms/GiB,
//! get 8 ms/GiB, 2.3-2.8 us per first write after a get) but blind to reads; soft-dirty
//! is never set here: this kernel is built without `CONFIG_MEM_SOFT_DIRTY`.
//!
//! Run: `cargo bench --bench access_harvest` (full), `-- --quick`, or
//! `cargo test --release --bench access_harvest` (smoke).

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use kvmm::{Chart, Experiment, Mode, Row};
use vmm::guest::{DATA_START, random_accesses};
use vmm::sys::mman;
use vmm::sys::pagemap::{
    self, PAGE_IS_FILE, PAGE_IS_PRESENT, PM_PRESENT, PM_SOFT_DIRTY, Pagemap, ScanQuery,
};
use vmm::{Command, Hypervisor, ManagedVm, Op, VmConfig};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
const PAGE: u64 = 4096;
const DATA: u64 = DATA_START / PAGE;

/// Milliseconds per GiB for `d` spent on `bytes`.
fn ms_per_gib(d: Duration, bytes: u64) -> f64 {
    d.as_nanos() as f64 / 1e6 * GIB / bytes as f64
}

fn best<T>(n: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut out = f();
    for _ in 1..n {
        let r = f();
        if r.0 < out.0 {
            out = r;
        }
    }
    out
}

fn run(vm: &ManagedVm, cmd: Command) -> Duration {
    let t = Instant::now();
    vm.vm()
        .run(0, cmd)
        .unwrap_or_else(|e| panic!("guest {:?} failed: {e}", cmd.op));
    t.elapsed()
}

fn bits(bitmap: &[u64], pages: u64) -> BTreeSet<u64> {
    (0..pages)
        .filter(|&p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// (false negatives, false positives).
fn errors(expected: &BTreeSet<u64>, got: &BTreeSet<u64>) -> (f64, f64) {
    (
        expected.difference(got).count() as f64,
        got.difference(expected).count() as f64,
    )
}

/// The guest's known access set: a touch range and random accesses. Returns (all pages
/// accessed, pages written), data-relative.
fn known_work(vm: &ManagedVm, pages: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (t0, tn) = (pages / 4, pages / 8);
    run(vm, Command::new(Op::Touch, Gfn(DATA + t0), tn, 0));
    let random = Command::random(Gfn(DATA), pages, 11, (pages / 16).max(16));
    run(vm, random);
    let mut all: BTreeSet<u64> = (t0..t0 + tn).collect();
    let mut written = BTreeSet::new();
    for a in random_accesses(&random) {
        let p = a.gpa / PAGE - DATA;
        all.insert(p);
        if a.write {
            written.insert(p);
        }
    }
    (all, written)
}

struct Ctx<'a> {
    hv: &'a Hypervisor,
    mem: u64,
    samples: usize,
}

impl Ctx<'_> {
    fn vm(&self) -> ManagedVm {
        let pool = Arc::new(
            Pool::new(&PoolConfig::uniform(
                self.mem + 64 * MIB,
                1,
                AllocatorKind::Magazine,
            ))
            .expect("pool"),
        );
        let mm = Manager::new(pool, ManagerConfig::default());
        let cfg = VmConfig {
            cpu: Some(0),
            ..VmConfig::new(self.mem, 1)
        };
        ManagedVm::new(self.hv, &cfg, &mm).expect("managed VM")
    }

    /// A VM whose two vCPUs live on nodes 0 and 1 of a two-node pool (both threads on
    /// CPU 0): its window takes hinting faults.
    fn hinting_vm(&self) -> ManagedVm {
        let pool = Arc::new(
            Pool::new(&PoolConfig::uniform(
                2 * (self.mem + 64 * MIB),
                2,
                AllocatorKind::Magazine,
            ))
            .expect("pool"),
        );
        let mm = Manager::new(pool, ManagerConfig::default());
        let home = |n| vmm::VcpuHome {
            node: guestmem::NodeId(n),
            cpus: None,
        };
        let cfg = VmConfig {
            cpu: Some(0),
            vcpu_homes: Some(Arc::from([home(0), home(1)])),
            ..VmConfig::new(self.mem, 2)
        };
        let vm = ManagedVm::new(self.hv, &cfg, &mm).expect("managed VM");
        assert!(vm.vm().window().takes_hinting_faults());
        vm
    }

    fn pages(&self) -> u64 {
        (self.mem - DATA_START) / PAGE
    }
}

/// The pagemap-present set of data pages `0 .. pages` of `vm`.
fn present(pm: &Pagemap, base: u64, pages: u64) -> BTreeSet<u64> {
    let mut e = vec![0u64; pages as usize];
    pm.read(base + DATA_START, &mut e).expect("pagemap read");
    (0..pages)
        .filter(|&p| e[p as usize] & PM_PRESENT != 0)
        .collect()
}

fn scan_all(pm: &Pagemap, start: u64, end: u64) -> u64 {
    let q = ScanQuery {
        mask: PAGE_IS_PRESENT | PAGE_IS_FILE,
        inverted: 0,
        ret: PAGE_IS_PRESENT,
    };
    let mut v = Vec::with_capacity(512);
    let (mut at, mut found) = (start, 0);
    while at < end {
        let next = pm.scan(at, end, q, &mut v).expect("PAGEMAP_SCAN");
        found += v.iter().map(|r| (r.end - r.start) / PAGE).sum::<u64>();
        let next = v.last().map_or(next, |r| next.max(r.end));
        if next <= at {
            break;
        }
        at = next;
    }
    found
}

/// `zap+scan` and `zap+pagemap`.
fn zap_methods(c: &Ctx<'_>, exp: &mut Experiment) {
    let vm = c.vm();
    let pages = c.pages();
    let bytes = pages * PAGE;
    let mib = c.mem / MIB;
    let window = vm.vm().window().clone();
    let pm = Pagemap::open().expect("pagemap");
    run(&vm, Command::new(Op::Fill, Gfn(DATA), pages, 1));
    let base = window.pin().base();
    let (start, end) = (base + DATA_START, base + DATA_START + bytes);

    // Scan costs with every page present (after a full touch), then empty (after a zap).
    let touch_all = || run(&vm, Command::new(Op::Touch, Gfn(DATA), pages, 0));
    touch_all();
    let (scan_full, n) = best(c.samples, || {
        let t = Instant::now();
        let n = scan_all(&pm, start, end);
        (t.elapsed(), n)
    });
    assert_eq!(n, pages, "every page is present after a fill");
    let (read_full, n) = best(c.samples, || {
        let t = Instant::now();
        let n = present(&pm, base, pages).len() as u64;
        (t.elapsed(), n)
    });
    assert_eq!(n, pages);
    // Arm: the zap of a fully present range, and the guest's next access per page.
    let mut zap = Duration::MAX;
    let mut reaccess = Duration::MAX;
    let mut present_touch = Duration::MAX;
    for _ in 0..c.samples {
        present_touch = present_touch.min(touch_all());
        let t = Instant::now();
        // SAFETY: the window's data range holds only MAP_SHARED memfd runs after the fill
        // (no holes left), which a zap only unmaps; nothing in Rust points into it.
        unsafe { pagemap::zap(start, bytes) }.expect("zap");
        zap = zap.min(t.elapsed());
        reaccess = reaccess.min(touch_all());
    }
    // SAFETY: as above.
    unsafe { pagemap::zap(start, bytes) }.expect("zap");
    let scan_empty = best(c.samples, || {
        let t = Instant::now();
        let n = scan_all(&pm, start, end);
        (t.elapsed(), n)
    })
    .0;
    let read_empty = best(c.samples, || {
        let t = Instant::now();
        let n = present(&pm, base, pages).len();
        (t.elapsed(), n)
    })
    .0;

    // Accuracy, both read-backs, then one harvest_accessed over the sparse set and over
    // a fully touched range.
    let mut bitmap = Vec::new();
    window
        .harvest_accessed(Gfn(DATA), pages, &mut bitmap)
        .expect("arm");
    let (expected, _) = known_work(&vm, pages);
    let by_read = present(&pm, base, pages);
    let t = Instant::now();
    window
        .harvest_accessed(Gfn(DATA), pages, &mut bitmap)
        .expect("harvest");
    let harvest_sparse = t.elapsed();
    let by_scan = bits(&bitmap, pages);
    touch_all();
    let t = Instant::now();
    window
        .harvest_accessed(Gfn(DATA), pages, &mut bitmap)
        .expect("harvest");
    let harvest_full = t.elapsed();
    assert_eq!(bits(&bitmap, pages).len() as u64, pages);
    // (That zaps lose no data is checked by vmm/tests/harvest.rs; `random` rewrote pages.)

    let per_page = |d: Duration| d.as_nanos() as f64 / pages as f64;
    for (name, scan, scan_e, got, harvest) in [
        (
            "zap+scan",
            scan_full,
            scan_empty,
            &by_scan,
            Some((harvest_sparse, harvest_full)),
        ),
        ("zap+pagemap", read_full, read_empty, &by_read, None),
    ] {
        let (fneg, fpos) = errors(&expected, got);
        let mut row = Row::new(name)
            .param("mem_mib", mib)
            .metric("arm_ms_per_gib", ms_per_gib(zap, bytes))
            .metric("scan_ms_per_gib", ms_per_gib(scan, bytes))
            .metric("scan_empty_ms_per_gib", ms_per_gib(scan_e, bytes))
            .metric("reaccess_ns", per_page(reaccess))
            .metric("present_access_ns", per_page(present_touch))
            .metric("expected", expected.len() as f64)
            .metric("false_neg", fneg)
            .metric("false_pos", fpos);
        if let Some((sparse, full)) = harvest {
            row = row
                .metric("harvest_sparse_ms_per_gib", ms_per_gib(sparse, bytes))
                .metric("harvest_full_ms_per_gib", ms_per_gib(full, bytes));
        }
        exp.push(row);
    }
}

/// `uffd-minor-guest`: the guest's next access after a harvest in a window that takes
/// hinting faults, and the harvest's accuracy there.
fn guest_hinting(c: &Ctx<'_>, exp: &mut Experiment) {
    let vm = c.hinting_vm();
    let pages = c.pages();
    let window = vm.vm().window().clone();
    run(&vm, Command::new(Op::Fill, Gfn(DATA), pages, 1));
    let touch_all = || run(&vm, Command::new(Op::Touch, Gfn(DATA), pages, 0));
    let mut bitmap = Vec::new();
    let mut reaccess = Duration::MAX;
    let hints = vm.fault_counts().hint;
    for _ in 0..c.samples {
        window
            .harvest_accessed(Gfn(DATA), pages, &mut bitmap)
            .expect("harvest");
        reaccess = reaccess.min(touch_all());
    }
    let hinted = vm.fault_counts().hint - hints;
    assert!(
        hinted >= pages * c.samples as u64,
        "every access after a harvest is a hinting fault: {hinted}"
    );
    window
        .harvest_accessed(Gfn(DATA), pages, &mut bitmap)
        .expect("arm");
    let (expected, _) = known_work(&vm, pages);
    window
        .harvest_accessed(Gfn(DATA), pages, &mut bitmap)
        .expect("harvest");
    let (fneg, fpos) = errors(&expected, &bits(&bitmap, pages));
    let v = vm
        .vm()
        .run(0, Command::new(Op::Verify, Gfn(DATA), pages, 1));
    // `random` rewrote some pages with its own pattern: only the count of bad words is
    // not checked here (vmm/tests/harvest.rs checks bytes); the guest must run.
    v.expect("verify runs");
    exp.push(
        Row::new("uffd-minor-guest")
            .param("mem_mib", c.mem / MIB)
            .metric("reaccess_ns", reaccess.as_nanos() as f64 / pages as f64)
            .metric("expected", expected.len() as f64)
            .metric("false_neg", fneg)
            .metric("false_pos", fpos),
    );
}

/// `soft-dirty` (process-wide clear_refs, pagemap bit 55).
fn soft_dirty(c: &Ctx<'_>, exp: &mut Experiment) {
    let vm = c.vm();
    let pages = c.pages();
    let pm = Pagemap::open().expect("pagemap");
    run(&vm, Command::new(Op::Fill, Gfn(DATA), pages, 1));
    let base = vm.vm().window().pin().base();
    let t = Instant::now();
    let cleared = pagemap::clear_soft_dirty();
    let clear = t.elapsed();
    let mut row = Row::new("soft-dirty").param("mem_mib", c.mem / MIB);
    if let Err(e) = cleared {
        eprintln!("soft-dirty: {e}");
        exp.push(row.metric("works", 0.0));
        return;
    }
    let (_, written) = known_work(&vm, pages);
    let mut e = vec![0u64; pages as usize];
    pm.read(base + DATA_START, &mut e).expect("pagemap read");
    let got: BTreeSet<u64> = (0..pages)
        .filter(|&p| e[p as usize] & PM_SOFT_DIRTY != 0)
        .collect();
    let (fneg, fpos) = errors(&written, &got);
    row = row
        .metric("works", f64::from(u8::from(fneg == 0.0)))
        .metric("clear_refs_ms", clear.as_nanos() as f64 / 1e6)
        .metric("expected", written.len() as f64)
        .metric("false_neg", fneg)
        .metric("false_pos", fpos);
    exp.push(row);
}

/// `kvm-dirty-log`.
fn kvm_dirty_log(c: &Ctx<'_>, exp: &mut Experiment) {
    use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
    let vm = c.vm();
    let pages = c.pages();
    let bytes = pages * PAGE;
    run(&vm, Command::new(Op::Fill, Gfn(DATA), pages, 1));
    let dirty_all = |seed| run(&vm, Command::new(Op::Dirty, Gfn(DATA), pages, seed));
    let plain = dirty_all(2).min(dirty_all(3));
    let fd = vm.vm().vm_fd();
    let base = vm.vm().window().pin().base();
    let set = |flags: u32| {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: c.mem,
            userspace_addr: base,
        };
        // SAFETY: the same slot, range and size the VM was created with (the window's
        // current range, pinned by nothing else: the VM is idle between commands); only
        // the dirty-logging flag changes.
        unsafe { fd.set_user_memory_region(region) }
    };
    let mut row = Row::new("kvm-dirty-log").param("mem_mib", c.mem / MIB);
    let t = Instant::now();
    if let Err(e) = set(KVM_MEM_LOG_DIRTY_PAGES) {
        eprintln!("kvm-dirty-log: enabling dirty logging failed: {e}");
        exp.push(row.metric("works", 0.0));
        return;
    }
    let enable = t.elapsed();
    let first = dirty_all(4);
    let t = Instant::now();
    let log = fd.get_dirty_log(0, c.mem as usize);
    let get = t.elapsed();
    match log {
        Ok(_) => {
            let (_, written) = known_work(&vm, pages);
            let log = fd
                .get_dirty_log(0, c.mem as usize)
                .expect("second KVM_GET_DIRTY_LOG");
            let got: BTreeSet<u64> = (0..pages)
                .filter(|&p| {
                    let g = DATA + p;
                    log[(g / 64) as usize] & (1 << (g % 64)) != 0
                })
                .collect();
            let (fneg, fpos) = errors(&written, &got);
            let _ = fd.get_dirty_log(0, c.mem as usize);
            let again = dirty_all(5);
            row = row
                .metric("works", f64::from(u8::from(fneg == 0.0)))
                .metric("arm_ms_per_gib", ms_per_gib(enable, bytes))
                .metric("scan_ms_per_gib", ms_per_gib(get, bytes))
                .metric(
                    "rewrite_ns",
                    (again.as_nanos() as f64 - plain.as_nanos() as f64) / pages as f64,
                )
                .metric(
                    "first_write_logged_ns",
                    first.as_nanos() as f64 / pages as f64,
                )
                .metric("present_access_ns", plain.as_nanos() as f64 / pages as f64)
                .metric("expected", written.len() as f64)
                .metric("false_neg", fneg)
                .metric("false_pos", fpos);
        }
        Err(e) => {
            eprintln!("kvm-dirty-log: KVM_GET_DIRTY_LOG failed: {e}");
            row = row.metric("works", 0.0);
        }
    }
    let _ = set(0);
    exp.push(row);
}

/// Raw userfaultfd bits for the MINOR experiment (`<linux/userfaultfd.h>`); the VMM's
/// own layer (`vmm::sys::uffd`) does not offer MINOR.
mod minor {
    pub const API: libc::c_ulong = 0xc018_aa3f;
    pub const REGISTER: libc::c_ulong = 0xc020_aa00;
    pub const CONTINUE: libc::c_ulong = 0xc020_aa07;
    pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
    pub const FEATURE_WP_SHMEM: u64 = 1 << 12;
    pub const FEATURE_FLAG_WP: u64 = 1 << 0;
    pub const MODE_MISSING: u64 = 1;
    pub const MODE_WP: u64 = 2;
    pub const MODE_MINOR: u64 = 4;
    pub const FLAG_MINOR: u64 = 1 << 2;

    #[repr(C)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Register {
        pub start: u64,
        pub len: u64,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Continue {
        pub start: u64,
        pub len: u64,
        pub mode: u64,
        pub mapped: i64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct Msg {
        pub event: u8,
        pub r1: u8,
        pub r2: u16,
        pub r3: u32,
        pub flags: u64,
        pub address: u64,
        pub ptid: u64,
    }

    /// A blocking userfaultfd with `features`, or None.
    pub fn open(features: u64) -> Option<i32> {
        // SAFETY: the syscall takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
        if fd < 0 {
            return None;
        }
        let mut a = Api {
            api: 0xAA,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API on a fresh userfaultfd with a `struct uffdio_api`.
        (unsafe { libc::ioctl(fd, API, &mut a) } == 0).then_some(fd)
    }

    /// UFFDIO_REGISTER `start .. start + len` with `mode` on `fd`.
    pub fn register(fd: i32, start: u64, len: u64, mode: u64) -> bool {
        let mut r = Register {
            start,
            len,
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the kernel
        // checks the range against our mappings.
        unsafe { libc::ioctl(fd, REGISTER, &mut r) == 0 }
    }

    pub fn pin_to_cpu0() {
        // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// `uffd-minor`, host-side.
fn uffd_minor(c: &Ctx<'_>, window_uffd: i32, window_range: (u64, u64), exp: &mut Experiment) {
    let pages = c.pages().min(16384);
    let len = pages * PAGE;
    let mut row = Row::new("uffd-minor").param("mem_mib", c.mem / MIB);
    // The window's userfaultfd was negotiated without MINOR_SHMEM: can it add MINOR?
    let on_window = minor::register(
        window_uffd,
        window_range.0,
        window_range.1,
        minor::MODE_MISSING | minor::MODE_WP | minor::MODE_MINOR,
    );
    row = row.metric("window_uffd_can_add_minor", f64::from(u8::from(on_window)));
    let Some(fd) =
        minor::open(minor::FEATURE_MINOR_SHMEM | minor::FEATURE_WP_SHMEM | minor::FEATURE_FLAG_WP)
    else {
        exp.push(row.metric("works", 0.0));
        return;
    };
    let memfd = mman::memfd("minor", len).expect("memfd");
    let direct = mman::map_shared(len, memfd.as_fd()).expect("map");
    // SAFETY: our own fresh mapping; fill its page cache.
    unsafe { std::ptr::write_bytes(direct, 1, len as usize) };
    let win = mman::reserve(len).expect("reserve") as u64;
    // SAFETY: our fresh reservation.
    unsafe { mman::map_shared_fixed(win, len, memfd.as_fd(), 0) }.expect("map");
    let all = minor::register(
        fd,
        win,
        len,
        minor::MODE_MISSING | minor::MODE_WP | minor::MODE_MINOR,
    );
    row = row.metric("missing_wp_minor_register", f64::from(u8::from(all)));
    if !all && !minor::register(fd, win, len, minor::MODE_MINOR) {
        exp.push(row.metric("works", 0.0));
        return;
    }
    let mut best_ns = f64::MAX;
    for _ in 0..c.samples {
        // SAFETY: a shared memfd mapping we own.
        unsafe { pagemap::zap(win, len) }.expect("zap");
        let handler = std::thread::spawn(move || {
            minor::pin_to_cpu0();
            let mut n = 0;
            while n < pages {
                let mut m = minor::Msg::default();
                // SAFETY: reads one 32-byte `struct uffd_msg` into `m`.
                let r = unsafe { libc::read(fd, (&mut m as *mut minor::Msg).cast(), 32) };
                if r != 32 || m.flags & minor::FLAG_MINOR == 0 {
                    return false;
                }
                let mut cont = minor::Continue {
                    start: m.address & !(PAGE - 1),
                    len: PAGE,
                    mode: 0,
                    mapped: 0,
                };
                // SAFETY: UFFDIO_CONTINUE maps the page-cache page at a registered address
                // and wakes the faulting thread.
                if unsafe { libc::ioctl(fd, minor::CONTINUE, &mut cont) } != 0 {
                    return false;
                }
                n += 1;
            }
            true
        });
        minor::pin_to_cpu0();
        let t = Instant::now();
        let mut sum = 0u64;
        for p in 0..pages {
            // SAFETY: inside our mapping; the MINOR fault is resolved by the handler.
            sum =
                sum.wrapping_add(unsafe { ((win + p * PAGE) as *const u8).read_volatile() } as u64);
        }
        let el = t.elapsed();
        let ok = handler.join().unwrap_or(false);
        assert!(ok && sum == pages, "every access raised one MINOR fault");
        best_ns = best_ns.min(el.as_nanos() as f64 / pages as f64);
    }
    row = row.metric("works", 1.0).metric("reaccess_ns", best_ns);
    // SAFETY: ours; nothing refers to them any more.
    unsafe {
        mman::unmap(win as *mut u8, len);
        mman::unmap(direct, len);
        libc::close(fd);
    }
    exp.push(row);
}

fn main() {
    let mode = Mode::from_args();
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) if std::env::var("SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("access_harvest: skipped ({e})");
            return;
        }
        Err(e) => panic!("access_harvest needs KVM: {e} (set SKIP_KVM=1 to skip)"),
    };
    let sizes: &[u64] = mode.pick(&[16 * MIB], &[256 * MIB], &[256 * MIB, 1024 * MIB]);
    let samples = mode.pick(1, 3, 5);
    let mut exp = Experiment::new("access_harvest", mode);
    println!(
        "harvesting through {}",
        if vmm::window::harvest_uses_scan() {
            "PAGEMAP_SCAN"
        } else {
            "pagemap reads"
        }
    );
    for &mem in sizes {
        let c = Ctx {
            hv: &hv,
            mem,
            samples,
        };
        zap_methods(&c, &mut exp);
        guest_hinting(&c, &mut exp);
        kvm_dirty_log(&c, &mut exp);
        {
            let vm = c.vm();
            let w = vm.vm().window();
            let base = w.pin().base();
            uffd_minor(
                &c,
                w.uffd().as_fd().as_raw_fd(),
                (base + DATA_START, 64 * PAGE),
                &mut exp,
            );
        }
        // Last: it write-protects every PTE of the process.
        soft_dirty(&c, &mut exp);
    }
    for m in [
        "arm_ms_per_gib",
        "scan_ms_per_gib",
        "scan_empty_ms_per_gib",
        "harvest_sparse_ms_per_gib",
        "harvest_full_ms_per_gib",
        "reaccess_ns",
        "rewrite_ns",
        "present_access_ns",
        "first_write_logged_ns",
        "clear_refs_ms",
        "expected",
        "false_neg",
        "false_pos",
        "works",
        "window_uffd_can_add_minor",
        "missing_wp_minor_register",
    ] {
        println!("{}", exp.table(m, "zap+scan"));
    }
    if sizes.len() > 1 {
        exp.chart(&Chart {
            stem: "scan",
            title: "read-back cost per GiB, every page present",
            x: "mem_mib",
            y: "scan_ms_per_gib",
            log_x: true,
            log_y: false,
            only: &[],
        });
    }
    for r in &exp.rows {
        if r.variant.starts_with("zap+") || r.variant == "uffd-minor-guest" {
            assert_eq!(
                r.metrics.get("false_neg"),
                Some(&0.0),
                "{}: the zap methods miss no access",
                r.variant
            );
        }
    }
    exp.finish();
}

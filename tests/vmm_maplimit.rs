//! A window fragmented past the host's mapping limit fails with a clear error naming
//! `vm.max_map_count` and the sysctl to raise it, instead of killing the process. Runs in
//! its own test binary: it fills this process's mappings to the limit.

use std::os::fd::AsFd;
use std::sync::Arc;

use guestmem::mmu::{HostMmu, MapRun};
use guestmem::types::{Gfn, NodeId, Pfn};
use vmm::sys::mman;
use vmm::sys::uffd::Uffd;
use vmm::{Window, WindowError};

#[test]
fn fragmenting_past_max_map_count_reports_the_sysctl() {
    let limit = mman::max_map_count().expect("read vm.max_map_count");
    if limit > 200_000 {
        eprintln!("skipping: vm.max_map_count is {limit}, too high to reach quickly");
        return;
    }
    let pages = limit + 1000;
    let fd = mman::memfd("maplimit", 2 * pages * 4096).expect("memfd");
    let uffd = Arc::new(Uffd::new().expect("userfaultfd"));
    let w = Window::new(uffd, pages * 4096).expect("window");
    // Past any per-window budget: this test is about the process-wide host limit.
    w.set_map_budget(u64::MAX);
    // Every other page from a non-adjacent file offset: no two runs merge.
    let mut err = None;
    for i in 0..pages / 2 {
        let run = MapRun {
            gfn: Gfn(2 * i),
            pages: 1,
            node: NodeId(0),
            pfn: Pfn(0),
            fd: fd.as_fd(),
            file_offset: 4 * i * 4096 % (2 * pages * 4096),
            writable: i % 2 == 0,
        };
        if let Err(e) = w.map_run(run) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the mapping limit must be hit");
    let msg = e.to_string();
    assert!(msg.contains("vm.max_map_count"), "{msg}");
    assert!(msg.contains("sysctl -w vm.max_map_count="), "{msg}");
    // A new window is refused up front while the process is at the limit.
    let uffd = Arc::new(Uffd::new().expect("userfaultfd"));
    match Window::new(uffd, 1 << 20) {
        Err(WindowError::Mman(mman::MmanError::MapLimit { .. })) => {}
        other => panic!("expected MapLimit, got {other:?}"),
    }
}

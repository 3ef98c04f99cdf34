//! Set-ups the software-driven benchmarks share: a prefaulted pool with its manager, and
//! a one-region VM with every page written.

use std::sync::Arc;

use guestmem::mmu::NoopMmu;
use guestmem::{
    AddressSpace, AllocatorKind, Gfn, Gpa, Manager, ManagerConfig, PAGE_SIZE, Pool, PoolConfig,
    RegionSpec,
};

/// A manager over a one-node magazine pool of `bytes`, backed by host memory up front so
/// that experiments measure the manager, not the host's first-touch cost.
pub fn manager(bytes: u64, config: ManagerConfig) -> Arc<Manager> {
    manager_nodes(bytes, 1, config)
}

/// [`manager`] with the pool split into `nodes` equal nodes.
pub fn manager_nodes(bytes: u64, nodes: usize, config: ManagerConfig) -> Arc<Manager> {
    let pool = Pool::new(&PoolConfig::uniform(bytes, nodes, AllocatorKind::Magazine))
        .expect("a benchmark pool fits in this machine's memory");
    pool.prefault().expect("the host backs the benchmark pool");
    Manager::new(Arc::new(pool), config)
}

/// A VM with one region of `pages` pages at gfn 0, every page written with `value`.
pub fn written_vm(mm: &Arc<Manager>, pages: u64, value: u8) -> Arc<AddressSpace> {
    let vm = mm
        .create(
            &[RegionSpec {
                start: Gfn(0),
                pages,
            }],
            Arc::new(NoopMmu),
        )
        .expect("a one-region VM");
    write_pages(&vm, 0, pages, value);
    vm
}

/// Writes `value` to the first byte of pages `first .. first + n` of `vm`.
pub fn write_pages(vm: &AddressSpace, first: u64, n: u64, value: u8) {
    for p in first..first + n {
        vm.write(Gpa(p * PAGE_SIZE as u64), &[value])
            .expect("the benchmark pool was sized for every page written");
    }
}

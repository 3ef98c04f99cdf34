//! What the KVM integration tests share.

use std::sync::Arc;

use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::DATA_START;
use vmm::{Command, Hypervisor, ManagedVm, Op, VcpuHome, VmConfig};

/// Where [`filled_parent`]'s VM wrote, how many pages, with which seed.
#[allow(dead_code)] // not every test crate that includes this module uses it
pub const FILLED: (Gfn, u64, u64) = (Gfn(DATA_START / 4096), 512, 3);

/// A 64 MiB frame pool, its manager, and a 32 MiB one-vCPU VM on it that has written
/// [`FILLED`].
#[allow(dead_code)] // not every test crate that includes this module uses it
pub fn filled_parent(hv: &Hypervisor) -> (Arc<Pool>, Arc<Manager>, ManagedVm) {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(64 << 20, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let parent = ManagedVm::new(hv, &VmConfig::new(32 << 20, 1), &mm).expect("parent");
    let (gfn, pages, seed) = FILLED;
    parent
        .vm()
        .run(0, Command::new(Op::Fill, gfn, pages, seed))
        .expect("fill");
    (pool, mm, parent)
}

/// Opens /dev/kvm. Where it is missing the test fails saying so, unless `SKIP_KVM=1`
/// (then `None`: the caller returns, skipping).
pub fn hypervisor() -> Option<Hypervisor> {
    if !std::path::Path::new("/dev/kvm").exists() {
        if std::env::var("SKIP_KVM").as_deref() == Ok("1") {
            eprintln!("skipping: /dev/kvm is missing and SKIP_KVM=1");
            return None;
        }
        panic!("/dev/kvm is missing: these tests need KVM (set SKIP_KVM=1 to skip them)");
    }
    Some(Hypervisor::new().expect("open /dev/kvm"))
}

/// A VM of `mem` bytes with two vCPUs, vCPU 0 living on node 0 and vCPU 1 on node 1.
#[allow(dead_code)] // not every test crate that includes this module uses it
pub fn two_vcpus_on_two_nodes(mem: u64) -> VmConfig {
    let home = |n| VcpuHome {
        node: guestmem::NodeId(n),
        cpus: None,
    };
    VmConfig {
        vcpu_homes: Some(std::sync::Arc::from([home(0), home(1)])),
        ..VmConfig::new(mem, 2)
    }
}

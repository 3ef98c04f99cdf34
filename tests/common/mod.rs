//! What the KVM integration tests share.

use vmm::{Hypervisor, VcpuHome, VmConfig};

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

//! What the KVM integration tests share.

use vmm::Hypervisor;

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

//! Integration tests of the KVM half of issue 5: real KVM, real userfaultfd, real memfds.
//! They need /dev/kvm; without it they fail saying so, unless SKIP_KVM=1 (then they skip).

use std::sync::Arc;

use guestmem::types::{Gfn, Gpa};
use vmm::guest::{self, DATA_START, pattern, random_accesses};
use vmm::{
    Command, FaultResolver, Hypervisor, Op, ScaffoldResolver, Vm, VmConfig, VcpuError, VmError,
};

const MIB: u64 = 1 << 20;

/// Opens /dev/kvm, or says why not: `None` means "skip" (SKIP_KVM=1 and no KVM).
fn hypervisor() -> Option<Hypervisor> {
    let present = std::path::Path::new("/dev/kvm").exists();
    if !present {
        if std::env::var("SKIP_KVM").as_deref() == Ok("1") {
            eprintln!("skipping: /dev/kvm is missing and SKIP_KVM=1");
            return None;
        }
        panic!("/dev/kvm is missing: these tests need KVM (set SKIP_KVM=1 to skip them)");
    }
    Some(Hypervisor::new().expect("open /dev/kvm"))
}

struct TestVm {
    vm: Vm,
    scaffold: Arc<ScaffoldResolver>,
}

fn vm(hv: &Hypervisor, mem: u64, vcpus: u32) -> TestVm {
    let mut scaffold = None;
    let vm = Vm::new(
        hv,
        &VmConfig {
            mem_bytes: mem,
            vcpus,
            cpu: None,
        },
        |w| {
            let r = Arc::new(ScaffoldResolver::new(w.clone(), mem / 4096 * 2)?);
            scaffold = Some(r.clone());
            Ok(r as Arc<dyn FaultResolver>)
        },
    )
    .expect("create VM");
    TestVm {
        vm,
        scaffold: scaffold.expect("resolver built"),
    }
}

fn data(page: u64) -> Gfn {
    Gfn(DATA_START / 4096 + page)
}

#[test]
fn fill_then_verify_through_first_touch_faults() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 16 * MIB, 1);
    let pages = 1000;
    let before = t.vm.fault_counts();
    let r = t.vm.run(0, Command::new(Op::Fill, data(0), pages, 42)).expect("fill");
    assert_eq!(r.r0, 0);
    let after_fill = t.vm.fault_counts();
    assert_eq!(after_fill.missing_write - before.missing_write, pages);
    assert_eq!(after_fill.missing_read, before.missing_read);
    let v = t.vm.run(0, Command::new(Op::Verify, data(0), pages, 42)).expect("verify");
    assert_eq!(v.mismatches(), 0, "first bad {:?}", v.first_bad());
    assert_eq!(v.first_bad(), None);
    // The host sees the same bytes.
    let gpa = data(7).gpa().0 + 8 * 13;
    assert_eq!(t.vm.read_u64(Gpa(gpa)).unwrap(), pattern(42, gpa));
    // A wrong seed mismatches every word, and the first bad address is the first word.
    let bad = t.vm.run(0, Command::new(Op::Verify, data(0), 2, 43)).expect("verify");
    assert_eq!(bad.mismatches(), 1024);
    assert_eq!(bad.first_bad(), Some(data(0).gpa()));
    assert_eq!(t.vm.fault_counts().total(), after_fill.total());
}

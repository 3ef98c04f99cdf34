//! A read-only run is never writable: the window maps it `PROT_READ` until userfaultfd
//! write-protection is in place, and a guest write in that moment gets `EFAULT` from
//! `KVM_RUN`, which the vCPU retries while `window::ro_map_state` shows such a change
//! in flight. This test holds a page in that in-between state while the guest writes it.
//! Needs /dev/kvm; fails saying so unless SKIP_KVM=1.

use std::sync::Arc;
use std::time::Duration;

use guestmem::types::Gfn;
use vmm::guest::{DATA_START, pattern};
use vmm::window::{ro_map_begin, ro_map_end};
use vmm::{Command, FaultResolver, Op, ScaffoldResolver, Vm, VmConfig};

mod common;
use common::hypervisor;

fn protect(addr: u64, prot: libc::c_int) {
    // SAFETY: `addr` is one page of the test VM's guest RAM window, which the VM owns and
    // keeps mapped; changing its protection touches no Rust object.
    let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, 4096, prot) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
}

#[test]
fn a_guest_write_to_a_run_still_being_made_read_only_waits_instead_of_crashing() {
    let Some(hv) = hypervisor() else { return };
    let vm = Vm::new(&hv, &VmConfig::new(8 << 20, 1), |w| {
        Ok(Arc::new(ScaffoldResolver::new(w.clone(), 4096)?) as Arc<dyn FaultResolver>)
    })
    .expect("create VM");
    let page = Gfn(DATA_START / 4096);
    vm.run(0, Command::new(Op::Fill, page, 1, 1))
        .expect("first fill");

    // The page is now mapped; put it in the state map_run leaves a read-only run in
    // between its mmap and its write-protection, with the sequence odd.
    let addr = vm.window().host_base() + page.0 * 4096;
    ro_map_begin();
    protect(addr, libc::PROT_READ);
    let vcpu = vm.vcpu(0).expect("vCPU 0");
    vcpu.submit(Command::new(Op::Fill, page, 1, 2))
        .expect("submit");
    std::thread::sleep(Duration::from_millis(50));
    protect(addr, libc::PROT_READ | libc::PROT_WRITE);
    ro_map_end();

    vcpu.wait()
        .expect("the write waited for the mapping instead of crashing the VM");
    let r = vm
        .run(0, Command::new(Op::Verify, page, 1, 2))
        .expect("verify");
    assert_eq!(r.mismatches(), 0);
    assert_eq!(
        vm.read_u64(page.gpa()).expect("read"),
        pattern(2, page.gpa().0)
    );
}

//! Integration tests of the KVM half of issue 5: real KVM, real userfaultfd, real memfds.
//! They need /dev/kvm; without it they fail saying so, unless SKIP_KVM=1 (then they skip).

use std::sync::Arc;

use guestmem::types::{Gfn, Gpa};
use vmm::guest::{self, DATA_START, pattern, random_accesses};
use vmm::{
    Command, FaultResolver, Hypervisor, Op, ScaffoldResolver, VcpuError, Vm, VmConfig, VmError,
};

mod common;
use common::hypervisor;

const MIB: u64 = 1 << 20;

struct TestVm {
    vm: Vm,
    scaffold: Arc<ScaffoldResolver>,
}

fn vm(hv: &Hypervisor, mem: u64, vcpus: u32) -> TestVm {
    let mut scaffold = None;
    let vm = Vm::new(hv, &VmConfig::new(mem, vcpus), |w| {
        let r = Arc::new(ScaffoldResolver::new(w.clone(), mem / 4096 * 2)?);
        scaffold = Some(r.clone());
        Ok(r as Arc<dyn FaultResolver>)
    })
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
    let r =
        t.vm.run(0, Command::new(Op::Fill, data(0), pages, 42))
            .expect("fill");
    assert_eq!(r.r0, 0);
    let after_fill = t.vm.fault_counts();
    assert_eq!(after_fill.missing_write - before.missing_write, pages);
    assert_eq!(after_fill.missing_read, before.missing_read);
    let v =
        t.vm.run(0, Command::new(Op::Verify, data(0), pages, 42))
            .expect("verify");
    assert_eq!(v.mismatches(), 0, "first bad {:?}", v.first_bad());
    assert_eq!(v.first_bad(), None);
    // The host sees the same bytes.
    let gpa = data(7).gpa().0 + 8 * 13;
    assert_eq!(t.vm.read_u64(Gpa(gpa)).unwrap(), pattern(42, gpa));
    // A wrong seed mismatches every word, and the first bad address is the first word.
    let bad =
        t.vm.run(0, Command::new(Op::Verify, data(0), 2, 43))
            .expect("verify");
    assert_eq!(bad.mismatches(), 1024);
    assert_eq!(bad.first_bad(), Some(data(0).gpa()));
    assert_eq!(t.vm.fault_counts().total(), after_fill.total());
}

#[test]
fn fault_counts_by_kind_match_the_workload() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 16 * MIB, 1);
    // Reads of absent pages: one MISSING read fault each.
    let touch =
        t.vm.run(0, Command::new(Op::Touch, data(0), 100, 0))
            .expect("touch");
    assert_eq!((touch.r0, touch.r1), (0, 100));
    let c = t.vm.fault_counts();
    assert_eq!(
        (c.missing_read, c.missing_write, c.write_protect),
        (100, 0, 0)
    );
    // Writes to pages already there: no faults.
    t.vm.run(0, Command::new(Op::Fill, data(0), 100, 5))
        .expect("fill");
    assert_eq!(t.vm.fault_counts().total(), 100);
    // Write-protect half, write everything: one WP (copy-on-write) fault per protected page.
    t.scaffold.write_protect(data(0), 50).expect("protect");
    t.vm.run(0, Command::new(Op::Dirty, data(0), 100, 6))
        .expect("dirty");
    let c = t.vm.fault_counts();
    assert_eq!(
        (c.missing_read, c.missing_write, c.write_protect),
        (100, 0, 50)
    );
    // Reads of protected pages do not fault; the copies kept their contents.
    t.scaffold.write_protect(data(0), 100).expect("protect");
    t.vm.run(0, Command::new(Op::Touch, data(0), 100, 0))
        .expect("touch");
    assert_eq!(t.vm.fault_counts().write_protect, 50);
    // Unmapped pages fault again as MISSING and come back zero.
    t.scaffold.unmap(data(90), 10).expect("unmap");
    let sum =
        t.vm.run(0, Command::new(Op::Checksum, data(90), 10, 0))
            .expect("checksum");
    assert_eq!(sum.r0, 0);
    assert_eq!(t.vm.fault_counts().missing_read, 110);
}

#[test]
fn random_accesses_and_checksum_match_the_rust_model() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 8 * MIB, 1);
    let (start, pages, seed) = (data(0), 64, 0xdead_beef);
    t.vm.run(0, Command::new(Op::Fill, start, pages, seed))
        .expect("fill");
    let cmd = Command::random(start, pages, seed, 20_000);
    let r = t.vm.run(0, cmd).expect("random");
    let (mut sum, mut writes) = (0u64, 0u64);
    for a in random_accesses(&cmd) {
        if a.write {
            writes += 1;
        } else {
            sum = sum.wrapping_add(pattern(seed, a.gpa));
        }
    }
    assert_eq!((r.r0, r.r1), (sum, writes));
    // Random writes store the fill pattern: memory still verifies.
    let v =
        t.vm.run(0, Command::new(Op::Verify, start, pages, seed))
            .expect("verify");
    assert_eq!(v.mismatches(), 0);
    let ck =
        t.vm.run(0, Command::new(Op::Checksum, start, pages, 0))
            .expect("checksum");
    let lo = start.gpa().0;
    let want = (0..pages * 512).fold(0u64, |s, i| s.wrapping_add(pattern(seed, lo + i * 8)));
    assert_eq!((ck.r0, ck.r1), (want, pages * 512));
}

#[test]
fn several_vcpus_work_on_disjoint_ranges() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 32 * MIB, 4);
    let per = 512;
    for (i, v) in t.vm.vcpus().iter().enumerate() {
        v.submit(Command::new(
            Op::Fill,
            data(i as u64 * per),
            per,
            100 + i as u64,
        ))
        .expect("submit");
    }
    for v in t.vm.vcpus() {
        v.wait().expect("fill");
    }
    assert_eq!(t.vm.fault_counts().missing_write, 4 * per);
    for (i, v) in t.vm.vcpus().iter().enumerate() {
        // Each vCPU verifies its neighbour's range.
        let j = (i + 1) % 4;
        let r = v
            .run(Command::new(
                Op::Verify,
                data(j as u64 * per),
                per,
                100 + j as u64,
            ))
            .expect("verify");
        assert_eq!(r.mismatches(), 0, "vcpu {i} checking range {j}");
    }
}

#[test]
fn several_vms_run_at_once() {
    let Some(hv) = hypervisor() else { return };
    let hv = &hv;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|k| {
                s.spawn(move || {
                    let t = vm(hv, 16 * MIB, 2);
                    for round in 0..3 {
                        let seed = k * 1000 + round;
                        t.vm.run(0, Command::new(Op::Fill, data(0), 800, seed))
                            .expect("fill");
                        let v =
                            t.vm.run(1, Command::new(Op::Verify, data(0), 800, seed))
                                .expect("verify");
                        assert_eq!(v.mismatches(), 0);
                    }
                    t.vm.fault_counts().missing_write + t.vm.fault_counts().missing_read
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().expect("VM thread"), 800);
        }
    });
}

#[test]
fn crashing_guest_is_reported_and_its_sibling_runs_on() {
    let Some(hv) = hypervisor() else { return };
    let bad = vm(&hv, 8 * MIB, 1);
    let good = vm(&hv, 8 * MIB, 1);
    good.vm.vcpus()[0]
        .submit(Command::new(Op::Fill, data(0), 1000, 9))
        .expect("submit");
    let err = bad
        .vm
        .run(0, Command::new(Op::Crash, data(0), 1, 0))
        .expect_err("the guest must crash");
    match &err {
        VcpuError::GuestCrashed { vcpu, reason, regs } => {
            assert_eq!(*vcpu, 0);
            assert!(!reason.is_empty());
            assert_eq!(regs.cs & 3, 3, "crashed in ring 3: {err}");
        }
        other => panic!("expected a crash report, got {other}"),
    }
    eprintln!("crash report: {err}");
    // The crashed vCPU refuses more work; the sibling VM is fine.
    assert!(matches!(
        bad.vm.run(0, Command::new(Op::Touch, data(0), 1, 0)),
        Err(VcpuError::Dead(0))
    ));
    good.vm.vcpus()[0].wait().expect("fill");
    let v = good
        .vm
        .run(0, Command::new(Op::Verify, data(0), 1000, 9))
        .expect("verify");
    assert_eq!(v.mismatches(), 0);
}

#[test]
fn pause_save_and_restore_continue_a_command_on_another_vcpu() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 64 * MIB, 2);
    let pages = (60 * MIB - DATA_START) / 4096;
    // Warm the range so the fill runs long on already-mapped memory.
    let cmd = Command::new(Op::Fill, data(0), pages, 77);
    t.vm.run(0, Command::new(Op::Fill, data(0), pages, 1))
        .expect("warm");
    let (v0, v1) = (&t.vm.vcpus()[0], &t.vm.vcpus()[1]);
    let mut paused_mid_command = false;
    for _ in 0..20 {
        v0.submit(cmd).expect("submit");
        std::thread::sleep(std::time::Duration::from_millis(2));
        v0.pause();
        let st = v0.save_state().expect("save");
        if st.in_flight.is_some() {
            paused_mid_command = true;
            assert!(!st.msrs.is_empty(), "MSRs are part of the state");
            eprintln!(
                "state: {} MSRs of {} listed, xsave {}, xcrs {}",
                st.msrs.len(),
                hv.msr_indices().len(),
                st.xsave.is_some(),
                st.xcrs.is_some()
            );
            assert_eq!(st.regs.rdi, Op::Fill as u64);
            v1.restore_state(&st).expect("restore");
            v1.wait().expect("the copy finishes the fill");
        }
        v0.resume();
        v0.wait().expect("the original finishes the fill");
        if paused_mid_command {
            break;
        }
    }
    assert!(paused_mid_command, "never caught the fill in flight");
    let v =
        t.vm.run(1, Command::new(Op::Verify, data(0), pages, 77))
            .expect("verify");
    assert_eq!(v.mismatches(), 0);
    let _ = guest::CODE_GPA;
}

#[test]
fn a_fault_that_cannot_be_resolved_stops_only_its_vm() {
    let Some(hv) = hypervisor() else { return };
    // A pool of 64 frames: the boot region takes a few, the fill runs out.
    let mut scaffold = None;
    let small = Vm::new(&hv, &VmConfig::new(8 * MIB, 1), |w| {
        let r = Arc::new(ScaffoldResolver::new(w.clone(), 64)?);
        scaffold = Some(r.clone());
        Ok(r as Arc<dyn FaultResolver>)
    })
    .expect("create VM");
    let good = vm(&hv, 8 * MIB, 1);
    let err = small
        .run(0, Command::new(Op::Fill, data(0), 200, 1))
        .expect_err("out of frames");
    assert!(matches!(err, VcpuError::FaultFailed { .. }), "{err}");
    assert!(
        small
            .failure()
            .is_some_and(|f| f.to_string().contains("out of guest frames"))
    );
    let v = good
        .vm
        .run(0, Command::new(Op::Fill, data(0), 200, 1))
        .expect("sibling fill");
    assert_eq!(v.r0, 0);
}

#[test]
fn bad_config_and_commands_are_rejected() {
    let Some(hv) = hypervisor() else { return };
    let cfg = VmConfig::new(4096 * 3 + 1, 1);
    let e = Vm::new(&hv, &cfg, |_| unreachable!()).expect_err("unaligned");
    assert!(matches!(e, VmError::Config(_)));
    let t = vm(&hv, 4 * MIB, 1);
    let e =
        t.vm.run(0, Command::new(Op::Fill, Gfn(0), 1, 0))
            .expect_err("boot region");
    assert!(matches!(e, VcpuError::BadCommand { .. }));
    let e =
        t.vm.run(0, Command::new(Op::Fill, data(0), 4 * 256, 0))
            .expect_err("past RAM");
    assert!(matches!(e, VcpuError::BadCommand { .. }));
}

/// Maps frames of a memfd without populating them (bypassing `Window::map_run`, which
/// populates): every access faults back forever.
#[derive(Debug)]
struct UnpopulatedResolver {
    window: Arc<vmm::Window>,
    fd: std::os::fd::OwnedFd,
}

impl FaultResolver for UnpopulatedResolver {
    fn resolve(&self, gfn: Gfn, _kind: vmm::FaultKind) -> Result<(), vmm::FaultError> {
        use std::os::fd::AsFd;
        let addr = self.window.host_base() + gfn.0 * 4096;
        // SAFETY: one page inside the VM's window, which outlives the VM's use of it; no
        // Rust reference points into guest RAM.
        unsafe { vmm::sys::mman::map_shared_fixed(addr, 4096, self.fd.as_fd(), gfn.0 * 4096) }?;
        self.window.uffd().register(addr, 4096)?;
        Ok(())
    }
}

#[test]
fn a_resolver_mapping_unpopulated_frames_fails_the_vm_instead_of_hanging() {
    let Some(hv) = hypervisor() else { return };
    let err = Vm::new(&hv, &VmConfig::new(4 * MIB, 1), |w| {
        let fd = vmm::sys::mman::memfd("unpopulated", 4 * MIB)?;
        Ok(Arc::new(UnpopulatedResolver {
            window: w.clone(),
            fd,
        }) as Arc<dyn FaultResolver>)
    })
    .expect_err("the boot region cannot be written");
    assert!(err.to_string().contains("not populated"), "{err}");
}

#[test]
fn repeated_pause_and_resume_under_load_loses_nothing() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 64 * MIB, 4);
    let per = 2048;
    for (i, v) in t.vm.vcpus().iter().enumerate() {
        v.submit(Command::new(
            Op::Fill,
            data(i as u64 * per),
            per,
            500 + i as u64,
        ))
        .expect("submit");
        v.submit(Command::random(
            data(i as u64 * per),
            per,
            500 + i as u64,
            200_000,
        ))
        .expect("submit");
    }
    for k in 0..60 {
        std::thread::sleep(std::time::Duration::from_micros(200 + 37 * k));
        t.vm.pause();
        // While paused, nothing runs: the fault counts stand still.
        let c = t.vm.fault_counts();
        std::thread::sleep(std::time::Duration::from_micros(300));
        assert_eq!(t.vm.fault_counts(), c);
        t.vm.resume();
    }
    for v in t.vm.vcpus() {
        v.wait().expect("fill");
        v.wait().expect("random");
    }
    for (i, v) in t.vm.vcpus().iter().enumerate() {
        let r = v
            .run(Command::new(
                Op::Verify,
                data(i as u64 * per),
                per,
                500 + i as u64,
            ))
            .expect("verify");
        assert_eq!(r.mismatches(), 0);
    }
    assert_eq!(t.vm.fault_counts().missing_write, 4 * per);
}

#[test]
fn a_command_submitted_while_paused_is_refused_and_runs_after_resume() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 8 * MIB, 1);
    t.vm.pause();
    let e =
        t.vm.vcpu(0)
            .expect("vCPU 0")
            .submit(Command::new(Op::Fill, data(0), 1, 1))
            .expect_err("a paused vCPU takes no new command");
    assert!(matches!(e, VcpuError::Paused(0)), "{e}");
    assert!(e.to_string().contains("resume"));
    t.vm.resume();
    t.vm.run(0, Command::new(Op::Fill, data(0), 1, 1))
        .expect("runs after resume");
    let r =
        t.vm.run(0, Command::new(Op::Verify, data(0), 1, 1))
            .expect("verify");
    assert_eq!(r.mismatches(), 0);
}

#[test]
fn stop_ends_a_command_in_flight_at_once_without_waiting_for_the_vcpu() {
    let Some(hv) = hypervisor() else { return };
    let t = vm(&hv, 8 * MIB, 1);
    let vcpu = t.vm.vcpu(0).expect("vCPU 0");
    // Minutes of work in the guest: only a stop can end it within the wait below.
    vcpu.submit(Command::random(data(0), 16, 1, 1 << 40))
        .expect("submit");
    std::thread::sleep(std::time::Duration::from_millis(50));
    t.vm.stop();
    let e = vcpu
        .wait_deadline(Some(
            std::time::Instant::now() + std::time::Duration::from_secs(60),
        ))
        .expect_err("a stopped vCPU does not finish its command");
    assert!(matches!(e, VcpuError::Dead(0)), "{e}");
    let e = vcpu
        .submit(Command::new(Op::Fill, data(0), 1, 1))
        .expect_err("a stopped vCPU takes no new command");
    assert!(matches!(e, VcpuError::Dead(0)), "{e}");
}

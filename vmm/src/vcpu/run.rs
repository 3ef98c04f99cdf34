//! A vCPU thread's loop: commands in, `KVM_RUN` until the guest rings its doorbell,
//! pauses honoured between runs, crashes reported with the registers.

use super::*;

pub(super) fn vcpu_thread(
    s: Arc<Shared>,
    rx: Receiver<Req>,
    tx: Sender<Result<CmdResult, VcpuError>>,
    pin: &crate::numa::Pin,
) {
    pin.apply();
    KICK.with(|k| k.set(&s.kick));
    while let Ok(req) = rx.recv() {
        let (cmd, load) = match req {
            Req::Boot => (None, false),
            Req::Run(c) => (Some(c), true),
            Req::Continue(c) => (Some(c), false),
            Req::Exit => break,
        };
        lock(&s.ctl).in_flight = cmd;
        let r = match cmd {
            Some(cmd) => run_command(&s, cmd, load),
            None => run_to_doorbell(&s).map(|_| CmdResult::default()),
        };
        let mut ctl = lock(&s.ctl);
        if cmd.is_some() {
            ctl.queued.pop_front();
        }
        ctl.busy = !ctl.queued.is_empty();
        ctl.in_flight = None;
        if matches!(
            r,
            Err(VcpuError::GuestCrashed { .. } | VcpuError::FaultFailed { .. })
        ) {
            ctl.dead = true;
        }
        drop(ctl);
        s.cv.notify_all();
        if tx.send(r).is_err() {
            break;
        }
    }
    KICK.with(|k| k.set(std::ptr::null()));
}

fn run_command(s: &Shared, cmd: Command, load: bool) -> Result<CmdResult, VcpuError> {
    if load {
        let fd = lock(&s.fd);
        let mut r = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        r.rdi = cmd.op as u64;
        r.rsi = cmd.start.gpa().0;
        r.rdx = cmd.end().0;
        r.rcx = cmd.seed;
        r.r8 = cmd.count;
        fd.set_regs(&r).map_err(kvm("KVM_SET_REGS"))?;
    }
    let r = run_to_doorbell(s)?;
    Ok(CmdResult {
        r0: r.rax,
        r1: r.rbx,
    })
}

fn crash(s: &Shared, fd: &VcpuFd, reason: String) -> VcpuError {
    let regs = fd.get_regs().unwrap_or_default();
    let sregs = fd.get_sregs().unwrap_or_default();
    VcpuError::GuestCrashed {
        vcpu: s.id,
        reason,
        regs: Box::new(RegsDump::new(&regs, &sregs)),
    }
}

/// Whether an `EFAULT` from `KVM_RUN` may come from a host-view change that refuses
/// writes for a moment ([`crate::window::ro_map_state`]): one is in flight, or one
/// completed during the run. Waits for those in flight before the caller retries; gives
/// up after many `EFAULT`s in a row over a long time, so that a real one is still
/// reported (a page re-mapped read-only back to back can refuse a write thousands of
/// times in a second: only the two bounds together mean the `EFAULT` is not transient).
fn ro_map_in_flight(gen_before: u64, retries: &mut EfaultRetries) -> bool {
    const MAX_RETRIES: u32 = 10_000;
    const MAX_TIME: Duration = Duration::from_secs(5);
    let (in_flight, generation) = crate::window::ro_map_state();
    if in_flight == 0 && generation == gen_before {
        return false;
    }
    retries.count += 1;
    let since = *retries.first.get_or_insert_with(Instant::now);
    if retries.count > MAX_RETRIES && since.elapsed() > MAX_TIME {
        return false;
    }
    while crate::window::ro_map_state().0 > 0 {
        std::thread::yield_now();
    }
    true
}

/// `EFAULT`s from `KVM_RUN` in a row, and when the first of them came.
#[derive(Debug, Default)]
struct EfaultRetries {
    count: u32,
    first: Option<Instant>,
}

/// Runs until the guest rings the doorbell; returns its registers then.
fn run_to_doorbell(s: &Shared) -> Result<kvm_regs, VcpuError> {
    let mut efault_retries = EfaultRetries::default();
    loop {
        {
            let mut ctl = lock(&s.ctl);
            while ctl.stopped() && !ctl.dead {
                ctl.parked = true;
                s.cv.notify_all();
                ctl = s.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
            }
            ctl.parked = false;
            if ctl.dead {
                return Err(VcpuError::Dead(s.id));
            }
        }
        if let Some(reason) = lock(&s.vm.failure).clone() {
            return Err(VcpuError::FaultFailed { vcpu: s.id, reason });
        }
        let mut fd = lock(&s.fd);
        let ro_gen = crate::window::ro_map_state().1;
        let ran = fd.run();
        if ran.is_ok() {
            efault_retries = EfaultRetries::default();
        }
        let exit = match ran {
            Ok(VcpuExit::IoOut(DOORBELL_PORT, _)) => Ok(None),
            Ok(VcpuExit::IoOut(ERROR_PORT, _)) => Err(VcpuError::UnknownOp {
                vcpu: s.id,
                op: fd.get_regs().map(|r| r.rdi).unwrap_or(0),
            }),
            Ok(VcpuExit::Intr) => Ok(Some(())),
            Ok(VcpuExit::Shutdown) => Err(crash(s, &fd, "triple fault (KVM_EXIT_SHUTDOWN)".into())),
            Ok(VcpuExit::InternalError) => Err(crash(s, &fd, "KVM internal error".into())),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(crash(
                s,
                &fd,
                format!("VM entry failed (hardware reason {reason:#x} on cpu {cpu})"),
            )),
            Ok(VcpuExit::IoOut(port, _)) => {
                Err(crash(s, &fd, format!("unexpected OUT to port {port:#x}")))
            }
            Ok(VcpuExit::IoIn(port, _)) => {
                Err(crash(s, &fd, format!("unexpected IN from port {port:#x}")))
            }
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => Err(crash(
                s,
                &fd,
                format!("access to {addr:#x}, outside guest RAM"),
            )),
            Ok(other) => {
                let reason = format!("unexpected exit {other:?}");
                Err(crash(s, &fd, reason))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Some(())),
            Err(e)
                if e.errno() == libc::EFAULT && ro_map_in_flight(ro_gen, &mut efault_retries) =>
            {
                Ok(Some(()))
            }
            Err(e) => {
                let reason = format!(
                    "KVM_RUN failed: {}",
                    std::io::Error::from_raw_os_error(e.errno())
                );
                Err(crash(s, &fd, reason))
            }
        };
        fd.set_kvm_immediate_exit(0);
        match exit {
            Ok(None) => return fd.get_regs().map_err(kvm("KVM_GET_REGS")),
            Ok(Some(())) => continue,
            Err(e) => return Err(e),
        }
    }
}

//! vCPUs: one host thread per vCPU running the built-in guest's command loop, with pause
//! and resume (a kick signal plus `immediate_exit`), crash reports carrying the vCPU's
//! registers, and full state save/restore for snapshot-fork.
//!
//! The thread owns the run loop; the vCPU fd sits behind a mutex the thread holds only
//! around each `KVM_RUN`, so once a vCPU is paused (or idle between commands) the
//! controller may read and write its state from its own thread.
//!
//! Pausing is race-free: the controller sets `pause` and then sends [`kick_signal`]; the
//! signal handler sets `kvm_run.immediate_exit` through a thread-local pointer, so a kick
//! that lands just before `KVM_RUN` makes it return `EINTR` at once; the run loop clears
//! `immediate_exit` after every return and checks `pause` before every entry.
//!
//! A paused vCPU can be moved to a new KVM vCPU fd (`Vcpu::install_fd`, used when a fork
//! gives the parent a fresh VM): the kick handler finds the current `kvm_run` page through
//! the vCPU's `KickCell`, and the swap waits until no handler is using the old page
//! before handing the old fd back.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, Msrs, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::fault::FaultError;
use crate::guest::{self, CmdResult, Command, DOORBELL_PORT, ERROR_PORT};

mod run;
use run::vcpu_thread;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Where the kick handler finds the vCPU's `kvm_run` page.
#[derive(Debug, Default)]
struct KickCell {
    /// The current vCPU fd's `kvm_run` mapping. SeqCst: stored by `install_fd` before it
    /// reads `in_kick`, loaded by the handler after it raised `in_kick`.
    run: AtomicPtr<kvm_run>,
    /// Kick handlers running now (see `install_fd`).
    in_kick: AtomicU32,
}

thread_local! {
    /// This thread's vCPU kick cell, for the kick handler (null on other threads).
    static KICK: Cell<*const KickCell> = const { Cell::new(std::ptr::null()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let k = KICK.with(Cell::get);
    if k.is_null() {
        return;
    }
    // SAFETY: `k` points into the vCPU's `Shared`, which the vCPU thread keeps alive (an
    // Arc) until after it clears KICK; atomics are async-signal-safe.
    let k = unsafe { &*k };
    k.in_kick.fetch_add(1, Ordering::SeqCst);
    let p = k.run.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` is the current vCPU fd's kvm_run mapping: `install_fd` replaces it only
        // after storing the new pointer and seeing `in_kick` at zero, so the mapping we
        // loaded stays mapped until we lower `in_kick`; a byte store is signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
    k.in_kick.fetch_sub(1, Ordering::SeqCst);
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    // 0 or the errno of a failed registration; written once inside call_once.
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            RESULT.store(e.errno(), Ordering::Relaxed);
        }
    });
    // Relaxed: call_once's completion orders the store before this load.
    let r = RESULT.load(Ordering::Relaxed);
    if r != 0 {
        return Err(VcpuError::Kvm {
            op: "install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(r),
        });
    }
    Ok(())
}

/// General registers and control state of a vCPU, for crash reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RegsDump {
    /// rip
    pub rip: u64,
    /// rsp
    pub rsp: u64,
    /// rflags
    pub rflags: u64,
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, r8 .. r15
    pub gprs: [u64; 15],
    /// cs selector (its low two bits are the CPL)
    pub cs: u16,
    /// cr0
    pub cr0: u64,
    /// cr2 (last page-fault address)
    pub cr2: u64,
    /// cr3
    pub cr3: u64,
    /// cr4
    pub cr4: u64,
    /// efer
    pub efer: u64,
}

impl RegsDump {
    fn new(r: &kvm_regs, s: &kvm_sregs) -> RegsDump {
        RegsDump {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
                r.r13, r.r14, r.r15,
            ],
            cs: s.cs.selector,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }
}

impl std::fmt::Display for RegsDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.gprs;
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
             rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} r8={:#x} r13={:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer,
            g[0],
            g[1],
            g[2],
            g[3],
            g[4],
            g[5],
            g[7],
            g[12]
        )
    }
}

/// A vCPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("KVM call failed: {op}: {source}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The guest crashed (triple fault, internal error, unexpected exit).
    #[error("vCPU {vcpu} crashed: {reason}; registers: {regs}")]
    GuestCrashed {
        /// vCPU index.
        vcpu: u32,
        /// What KVM reported.
        reason: String,
        /// Registers at the crash.
        regs: Box<RegsDump>,
    },
    /// The guest did not recognise a command (a VMM bug).
    #[error("vCPU {vcpu}: the guest rejected opcode {op}")]
    UnknownOp {
        /// vCPU index.
        vcpu: u32,
        /// The opcode.
        op: u64,
    },
    /// The VM's fault handler failed; the VM is stopped.
    #[error("vCPU {vcpu} stopped: resolving a guest memory fault failed: {reason}")]
    FaultFailed {
        /// vCPU index.
        vcpu: u32,
        /// The resolver's error (shared by every vCPU of the VM).
        reason: Arc<FaultError>,
    },
    /// No vCPU with this index.
    #[error("the VM has no vCPU {0}")]
    NoSuchVcpu(u32),
    /// The vCPU crashed earlier and runs nothing more.
    #[error("vCPU {0} crashed earlier; create a new VM")]
    Dead(u32),
    /// The vCPU has neither booted the built-in guest nor had a state restored.
    #[error("vCPU {0} has no guest state: boot it or restore a saved state first")]
    NotBooted(u32),
    /// A state operation needs the vCPU paused or idle.
    #[error("vCPU {0} is running a command: pause it first")]
    NotPaused(u32),
    /// A new command was submitted while the vCPU is paused (its state may be being saved
    /// for a fork).
    #[error("vCPU {0} is paused: resume it before submitting a command")]
    Paused(u32),
    /// The command did not finish by the deadline given to [`Vcpu::wait_deadline`]; it is
    /// still running.
    #[error(
        "vCPU {0} did not finish its command in time (an endless loop in the guest?): give it \
         longer (--timeout) or a smaller workload"
    )]
    Timeout(u32),
    /// A vCPU held by a worker process ([`crate::worker`]) could not be reached or
    /// failed there.
    #[error("vCPU {vcpu}: {source}")]
    Remote {
        /// vCPU index.
        vcpu: u32,
        /// What the worker said, or why it could not be asked.
        #[source]
        source: Box<crate::worker::WorkerError>,
    },
    /// `wait` without a submitted command, or the vCPU thread is gone.
    #[error("vCPU {0} has no command in flight")]
    NothingInFlight(u32),
    /// A command's range is outside guest RAM or below the data region.
    #[error("command {cmd:?} is outside the workload region {lo:#x}..{hi:#x}")]
    BadCommand {
        /// The command.
        cmd: Command,
        /// First usable gpa.
        lo: u64,
        /// End of guest RAM.
        hi: u64,
    },
}

impl VcpuError {
    /// Whether the vCPU stopped on a host limit (its VM's fault hit one).
    pub fn is_host_limit(&self) -> bool {
        matches!(self, VcpuError::FaultFailed { reason, .. } if reason.is_host_limit())
    }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// A vCPU's complete architectural state, as saved by [`Vcpu::save_state`]. LAPIC state is
/// not included: the VMs run without an in-kernel irqchip.
#[derive(Debug, Clone)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Full XSAVE state (AVX and beyond), where it fits KVM's 4 KiB buffer.
    pub xsave: Option<Arc<kvm_xsave>>,
    /// Extended control registers, where the host supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs the host let us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The command the vCPU was running when paused (None: idle at the doorbell).
    pub in_flight: Option<Command>,
    /// Whether the guest had reached its command loop.
    pub booted: bool,
}

/// Per-VM facts a vCPU needs: its workload bounds and the VM's failure flag.
#[derive(Debug)]
pub(crate) struct VmLink {
    pub ram: u64,
    /// Set by the fault handler when a fault cannot be resolved (the first error wins).
    pub failure: Mutex<Option<Arc<FaultError>>>,
    /// Fault handler threads that may hold an event: each counts itself in before it
    /// reads the userfaultfd and out once a read finds the queue empty. SeqCst, paired
    /// with the load in `Vm::pause`'s quiesce (with the queue's readability checked
    /// after it).
    pub handlers_busy: std::sync::atomic::AtomicU32,
    /// Each live vCPU thread's kernel thread id and home node: a fault names its thread,
    /// and is resolved as a thread of that node.
    pub vcpu_threads: parking_lot::RwLock<Vec<(u32, guestmem::NodeId)>>,
}

impl VmLink {
    /// The home node of the vCPU whose thread is `tid` (`None`: not a vCPU of this VM, or
    /// no thread id: the kernel did not give one).
    pub fn node_of_thread(&self, tid: u32) -> Option<guestmem::NodeId> {
        if tid == 0 {
            return None;
        }
        self.vcpu_threads
            .read()
            .iter()
            .find(|&&(t, _)| t == tid)
            .map(|&(_, n)| n)
    }
}

#[derive(Debug, Default)]
struct Ctl {
    /// Outstanding [`Vcpu::pause`]s not yet matched by a [`Vcpu::resume`] (pauses nest).
    pauses: u32,
    /// Outstanding internal holds (a fork's [`Vcpu::hold`]): counted apart from
    /// `pauses`, so no `resume` from any thread can unpark a vCPU a fork holds.
    holds: u32,
    /// The thread is inside a command (between request and reply).
    busy: bool,
    /// The thread is parked on `pause` inside a command.
    parked: bool,
    in_flight: Option<Command>,
    /// Commands submitted and not finished, oldest first (`in_flight` is the front once
    /// the thread has started it).
    queued: std::collections::VecDeque<Command>,
    booted: bool,
    dead: bool,
    /// Submitted commands not yet waited for.
    outstanding: u32,
}

impl Ctl {
    /// Whether anything holds the vCPU out of `KVM_RUN`.
    fn stopped(&self) -> bool {
        self.pauses > 0 || self.holds > 0
    }
}

#[derive(Debug)]
struct Shared {
    id: u32,
    fd: Mutex<VcpuFd>,
    kick: KickCell,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    msr_indices: Vec<u32>,
    has_xcrs: bool,
    has_xsave: bool,
    vm: Arc<VmLink>,
}

enum Req {
    /// Run from the entry to the first doorbell.
    Boot,
    /// Load the command into registers and run it.
    Run(Command),
    /// Continue the command already in the registers (after a restore).
    Continue(Command),
    Exit,
}

/// A vCPU and its thread.
#[derive(Debug)]
pub struct Vcpu {
    shared: Arc<Shared>,
    tx: Mutex<Sender<Req>>,
    rx: Mutex<Receiver<Result<CmdResult, VcpuError>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Req::Boot => write!(f, "Boot"),
            Req::Run(c) => write!(f, "Run({c:?})"),
            Req::Continue(c) => write!(f, "Continue({c:?})"),
            Req::Exit => write!(f, "Exit"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Options for a new vCPU.
#[derive(Debug, Clone)]
pub(crate) struct VcpuSetup {
    pub id: u32,
    pub cpuid: CpuId,
    pub msr_indices: Vec<u32>,
    pub has_xcrs: bool,
    /// KVM_GET/SET_XSAVE's 4 KiB buffer holds the host's full XSAVE state.
    pub has_xsave: bool,
    /// Where the vCPU thread runs.
    pub pin: crate::numa::Pin,
    /// Its home node ([`crate::vm::VmConfig::vcpu_home`]).
    pub home: guestmem::NodeId,
    /// Put the vCPU at the built-in guest's entry (false: a state will be restored into
    /// it, so only CPUID is set).
    pub boot_state: bool,
}

fn seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Puts a fresh vCPU at the guest's entry: long mode, paging, ring 3, IOPL=3.
fn init_boot_state(fd: &VcpuFd, setup: &VcpuSetup) -> Result<(), VcpuError> {
    fd.set_cpuid2(&setup.cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let mut s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    s.cr0 = 0x8001_0001; // PG | WP | PE
    s.cr3 = guest::PML4_GPA;
    s.cr4 = 1 << 5; // PAE
    s.efer = 0x500; // LME | LMA
    s.gdt.base = guest::GDT_GPA;
    s.gdt.limit = (guest::gdt().len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cs = seg(guest::USER_CS, true);
    let ds = seg(guest::USER_DS, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (ds, ds, ds, ds, ds);
    fd.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;
    let r = kvm_regs {
        rip: guest::CODE_GPA,
        rflags: 0x2 | (3 << 12), // IOPL=3
        ..Default::default()
    };
    fd.set_regs(&r).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

impl Vcpu {
    pub(crate) fn new(
        mut fd: VcpuFd,
        setup: VcpuSetup,
        vm: Arc<VmLink>,
    ) -> Result<Vcpu, VcpuError> {
        install_kick_handler()?;
        if setup.boot_state {
            init_boot_state(&fd, &setup)?;
        } else {
            fd.set_cpuid2(&setup.cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        }
        let kick = KickCell::default();
        kick.run.store(fd.get_kvm_run(), Ordering::SeqCst);
        let shared = Arc::new(Shared {
            id: setup.id,
            kick,
            fd: Mutex::new(fd),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            msr_indices: setup.msr_indices,
            has_xcrs: setup.has_xcrs,
            has_xsave: setup.has_xsave,
            vm,
        });
        let (tx, req_rx) = channel();
        let (res_tx, rx) = channel();
        let s = shared.clone();
        let pin = setup.pin.clone();
        let home = setup.home;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", setup.id))
            .spawn(move || {
                // SAFETY: gettid takes no arguments and cannot fail.
                let tid = unsafe { libc::gettid() } as u32;
                guestmem::set_home_node(home);
                s.vm.vcpu_threads.write().push((tid, home));
                vcpu_thread(s.clone(), req_rx, res_tx, &pin);
                s.vm.vcpu_threads.write().retain(|&(t, _)| t != tid);
            })
            .map_err(|e| VcpuError::Kvm {
                op: "spawn the vCPU thread",
                source: e,
            })?;
        Ok(Vcpu {
            shared,
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
            thread: Some(thread),
        })
    }

    /// The vCPU thread's pthread id.
    pub(crate) fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread
            .as_ref()
            .map(|t| t.as_pthread_t() as libc::pthread_t)
    }

    /// This vCPU's index.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Starts `cmd` on this vCPU; collect its result with [`Vcpu::wait`].
    pub fn submit(&self, cmd: Command) -> Result<(), VcpuError> {
        let (lo, hi) = (guest::DATA_START, self.shared.vm.ram);
        if cmd.start.gpa().0 < lo || cmd.end().0 > hi || cmd.pages == 0 || cmd.pages >= 1 << 32 {
            return Err(VcpuError::BadCommand { cmd, lo, hi });
        }
        self.send(Req::Run(cmd))
    }

    fn send(&self, req: Req) -> Result<(), VcpuError> {
        let mut ctl = lock(&self.shared.ctl);
        if ctl.dead {
            return Err(VcpuError::Dead(self.id()));
        }
        if let Req::Run(cmd) | Req::Continue(cmd) = req {
            if !ctl.booted {
                return Err(VcpuError::NotBooted(self.id()));
            }
            // A new command loads its registers before the thread parks: while paused
            // (a fork saving state), it would change the state behind the snapshot.
            // Continuing a restored command loads nothing and is allowed.
            if ctl.stopped() && matches!(req, Req::Run(_)) {
                return Err(VcpuError::Paused(self.id()));
            }
            ctl.queued.push_back(cmd);
        }
        // Busy from submission on, so that a pause issued before the thread picks the
        // request up still waits for it to park (not for it to start running).
        ctl.busy = true;
        ctl.outstanding += 1;
        drop(ctl);
        lock(&self.tx)
            .send(req)
            .map_err(|_| VcpuError::NothingInFlight(self.id()))
    }

    /// Waits for the oldest submitted command's result.
    pub fn wait(&self) -> Result<CmdResult, VcpuError> {
        self.wait_deadline(None)
    }

    /// As [`Vcpu::wait`], but gives up at `deadline` with [`VcpuError::Timeout`]: the
    /// command stays in flight (a later `wait` can still collect it, and dropping the VM
    /// stops it). A guest in an endless loop is reported instead of waited on forever.
    pub fn wait_deadline(&self, deadline: Option<Instant>) -> Result<CmdResult, VcpuError> {
        let rx = lock(&self.rx);
        {
            let ctl = lock(&self.shared.ctl);
            if ctl.outstanding == 0 {
                return Err(VcpuError::NothingInFlight(self.id()));
            }
        }
        let r = match deadline {
            None => rx.recv().map_err(|_| VcpuError::NothingInFlight(self.id())),
            Some(d) => rx
                .recv_timeout(d.saturating_duration_since(Instant::now()))
                .map_err(|e| match e {
                    RecvTimeoutError::Timeout => VcpuError::Timeout(self.id()),
                    RecvTimeoutError::Disconnected => VcpuError::NothingInFlight(self.id()),
                }),
        };
        if !matches!(r, Err(VcpuError::Timeout(_))) {
            let mut ctl = lock(&self.shared.ctl);
            ctl.outstanding = ctl.outstanding.saturating_sub(1);
        }
        r?
    }

    /// Runs `cmd` to completion.
    pub fn run(&self, cmd: Command) -> Result<CmdResult, VcpuError> {
        self.submit(cmd)?;
        self.wait()
    }

    /// Stops the vCPU: when this returns it is not in `KVM_RUN` and will not enter it until
    /// every pause is matched by a [`Vcpu::resume`] (pauses nest). A command in flight
    /// stays in flight. A fault it was waiting on may still be resolved afterwards; for a
    /// snapshot use `Vm::pause`, which also waits for those.
    pub fn pause(&self) {
        let mut ctl = lock(&self.shared.ctl);
        ctl.pauses = ctl.pauses.saturating_add(1);
        self.park(ctl);
    }

    /// As [`Vcpu::pause`], as an internal hold that only [`Vcpu::unhold`] undoes.
    pub(crate) fn hold(&self) {
        let mut ctl = lock(&self.shared.ctl);
        ctl.holds = ctl.holds.saturating_add(1);
        self.park(ctl);
    }

    /// Undoes one [`Vcpu::hold`].
    pub(crate) fn unhold(&self) {
        let mut ctl = lock(&self.shared.ctl);
        ctl.holds = ctl.holds.saturating_sub(1);
        let run = !ctl.stopped();
        drop(ctl);
        if run {
            self.shared.cv.notify_all();
        }
    }

    /// Waits until the thread is parked or idle (the caller has raised a pause or hold).
    fn park(&self, mut ctl: MutexGuard<'_, Ctl>) {
        while ctl.busy && !ctl.parked {
            if let Some(t) = &self.thread {
                // Kick after setting `pause` (the run loop checks it after clearing
                // immediate_exit). A failed kill means the thread is gone.
                let _ = t.kill(kick_signal());
            }
            let (g, _) = self
                .shared
                .cv
                .wait_timeout(ctl, std::time::Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
            ctl = g;
        }
    }

    /// Undoes one [`Vcpu::pause`]; the vCPU runs again once every pause is undone. A
    /// `resume` without a pause does nothing.
    pub fn resume(&self) {
        let mut ctl = lock(&self.shared.ctl);
        ctl.pauses = ctl.pauses.saturating_sub(1);
        let run = !ctl.stopped();
        drop(ctl);
        if run {
            self.shared.cv.notify_all();
        }
    }

    /// Outstanding [`Vcpu::pause`]s.
    pub fn pauses(&self) -> u32 {
        lock(&self.shared.ctl).pauses
    }

    /// Whether the vCPU is held out of `KVM_RUN` (a pause or a fork's hold).
    pub fn is_stopped(&self) -> bool {
        lock(&self.shared.ctl).stopped()
    }

    pub(crate) fn quiescent(&self) -> Result<Option<Command>, VcpuError> {
        let ctl = lock(&self.shared.ctl);
        if ctl.busy && !ctl.parked {
            return Err(VcpuError::NotPaused(self.id()));
        }
        if ctl.queued.len() > 1 {
            // Only one command may be in flight across a save: wait for the others.
            return Err(VcpuError::NotPaused(self.id()));
        }
        Ok(ctl.in_flight)
    }

    /// Runs the built-in guest from its entry to its command loop (done by [`Vm::new`]
    /// for fresh guests).
    ///
    /// [`Vm::new`]: crate::vm::Vm::new
    pub(crate) fn boot(&self) -> Result<(), VcpuError> {
        {
            let mut ctl = lock(&self.shared.ctl);
            if ctl.booted {
                return Ok(());
            }
            ctl.booted = true;
        }
        self.send(Req::Boot)?;
        self.wait().map(|_| ())
    }

    /// Saves the complete vCPU state. The vCPU must be paused ([`Vcpu::pause`]) or idle
    /// between commands. Pending port I/O is completed first (a `KVM_RUN` with
    /// `immediate_exit` set), as KVM's API requires before saving.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let in_flight = self.quiescent()?;
        let booted = lock(&self.shared.ctl).booted;
        let mut fd = lock(&self.shared.fd);
        fd.set_kvm_immediate_exit(1);
        let r = fd.run().map(|_| ()).map_err(|e| e.errno());
        fd.set_kvm_immediate_exit(0);
        match r {
            Ok(()) => {}
            Err(libc::EINTR) => {}
            Err(e) => {
                return Err(VcpuError::Kvm {
                    op: "KVM_RUN (complete pending I/O)",
                    source: std::io::Error::from_raw_os_error(e),
                });
            }
        }
        let mut msrs = Vec::with_capacity(self.shared.msr_indices.len());
        for chunk in self
            .shared
            .msr_indices
            .chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES)
        {
            // KVM_GET_MSRS stops at the first MSR it refuses: skip that one and read on,
            // as restoring does, so no later MSR is lost.
            let mut rest = chunk;
            while !rest.is_empty() {
                let entries: Vec<_> = rest
                    .iter()
                    .map(|&index| kvm_msr_entry {
                        index,
                        ..Default::default()
                    })
                    .collect();
                let mut m = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
                    op: "build the MSR list",
                    source: std::io::Error::other("too many MSRs"),
                })?;
                let n = fd.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))?;
                msrs.extend_from_slice(&m.as_slice()[..n.min(rest.len())]);
                rest = rest.get(n + 1..).unwrap_or(&[]);
            }
        }
        crate::failpoint::hit(crate::failpoint::ForkStep::SaveState)
            .map_err(kvm_ioctls::Error::new)
            .map_err(kvm("KVM_GET_REGS"))?;
        Ok(VcpuState {
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            xsave: if self.shared.has_xsave {
                Some(Arc::new(fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?))
            } else {
                None
            },
            xcrs: if self.shared.has_xcrs {
                Some(fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?)
            } else {
                None
            },
            msrs,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            in_flight,
            booted,
        })
    }

    /// Readies `fd`, a new KVM vCPU of another VM, to take this vCPU's place: CPUID and
    /// `state` loaded. Nothing changes for this vCPU until [`Vcpu::install_fd`].
    pub(crate) fn prepare_fd(
        &self,
        fd: &VcpuFd,
        cpuid: &CpuId,
        state: &VcpuState,
    ) -> Result<(), VcpuError> {
        fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        load_state(fd, state, self.shared.has_xcrs, self.shared.has_xsave)
    }

    /// Moves this vCPU onto `fd` (prepared by [`Vcpu::prepare_fd`]) and returns the old
    /// fd. A command in flight continues on the new fd at resume. Cannot fail: a fork
    /// calls it after its commit point, so the caller must have checked
    /// [`Vcpu::quiescent`] with the VM paused (pause count held, forks serialised), which
    /// keeps the thread out of `KVM_RUN` and its fd lock free until resume.
    pub(crate) fn install_fd(&self, mut fd: VcpuFd) -> VcpuFd {
        debug_assert!(self.is_stopped(), "install_fd on a running vCPU");
        let mut cur = lock(&self.shared.fd);
        self.shared
            .kick
            .run
            .store(fd.get_kvm_run(), Ordering::SeqCst);
        // A kick handler that loaded the old pointer raised in_kick first (SeqCst both
        // sides): wait for it before the old mapping may go.
        while self.shared.kick.in_kick.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        std::mem::replace(&mut *cur, fd)
    }

    /// Loads `state` into this vCPU (paused or idle, with nothing in flight); if the state
    /// had a command in flight, the vCPU continues it and [`Vcpu::wait`] returns its result.
    /// MSRs the host refuses are skipped.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if self.quiescent()?.is_some() {
            return Err(VcpuError::NotPaused(self.id()));
        }
        crate::failpoint::hit(crate::failpoint::ForkStep::RestoreState)
            .map_err(kvm_ioctls::Error::new)
            .map_err(kvm("KVM_SET_SREGS"))?;
        load_state(
            &lock(&self.shared.fd),
            state,
            self.shared.has_xcrs,
            self.shared.has_xsave,
        )?;
        lock(&self.shared.ctl).booted = state.booted;
        if let Some(cmd) = state.in_flight {
            self.send(Req::Continue(cmd))?;
        }
        Ok(())
    }
}

/// Loads a saved architectural state into `fd` (MSRs the host refuses are skipped).
fn load_state(
    fd: &VcpuFd,
    state: &VcpuState,
    has_xcrs: bool,
    has_xsave: bool,
) -> Result<(), VcpuError> {
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_fpu(&state.fpu).map_err(kvm("KVM_SET_FPU"))?;
    if let (Some(x), true) = (&state.xcrs, has_xcrs) {
        fd.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    if let (Some(x), true) = (&state.xsave, has_xsave) {
        // SAFETY: `x` is a whole kvm_xsave (4 KiB) and has_xsave means the host's
        // XSAVE state fits in it (KVM_CAP_XSAVE2 <= 4096), so KVM reads nothing past
        // its end.
        unsafe { fd.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?;
    }
    // KVM_SET_MSRS stops at the first MSR it refuses: skip that one and go on.
    let mut rest = &state.msrs[..];
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let m = Msrs::from_entries(chunk).map_err(|_| VcpuError::Kvm {
            op: "build the MSR list",
            source: std::io::Error::other("too many MSRs"),
        })?;
        let n = fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    Ok(())
}

impl Vcpu {
    /// Stops the vCPU for good without waiting for its thread: the thread leaves
    /// `KVM_RUN` (or its pause) and ends, a command in flight ends with
    /// [`VcpuError::Dead`], and no command is taken after. Dropping the vCPU then only has
    /// to join it, so a caller can stop many VMs at once before dropping them one by one.
    pub fn stop(&self) {
        let _ = lock(&self.tx).send(Req::Exit);
        lock(&self.shared.ctl).dead = true;
        // Unpark a paused thread (it checks `dead` whatever the pause count) and kick it
        // out of KVM_RUN: the kick sets `immediate_exit`, so even a kick that lands just
        // before the next entry makes it return at once, and the loop then sees `dead`.
        self.shared.cv.notify_all();
        if let Some(t) = &self.thread {
            let _ = t.kill(kick_signal());
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

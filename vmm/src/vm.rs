//! A VM: its KVM fd, its guest RAM [`Window`] (memslot 0 at gpa 0), its fault handler
//! threads and its vCPUs running the built-in guest.
//!
//! The fault handler threads (one per vCPU, up to [`Vm::MAX_FAULT_HANDLERS`]) poll the
//! window's userfaultfd, each resolving the faults it reads through the VM's
//! [`FaultResolver`] and waking the faulting vCPU, so one slow fault (a swap-in) holds up
//! only the vCPU that took it. A fault a handler cannot resolve stops
//! the VM (its vCPUs return [`VcpuError::FaultFailed`]); other VMs are unaffected. Pin the
//! VM to one CPU ([`VmConfig::cpu`]) to keep the handler and the faulting vCPU together:
//! cross-CPU wake-ups cost about 5x here.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use guestmem::types::{Gfn, Gpa, PAGE_SIZE};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::failpoint::{self, ForkStep};
use crate::fault::{FaultCounts, FaultError, FaultKind, FaultResolver, FaultStats};
use crate::guest::{self, CmdResult, Command};
use crate::sys::uffd::{Uffd, UffdError};
use crate::vcpu::{Vcpu, VcpuError, VcpuSetup, VmLink};
use crate::window::{Window, WindowError};

mod handler;
use handler::{fail, fault_loop};

const PAGE: u64 = PAGE_SIZE as u64;

/// Creating or driving a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}; load the kvm module and make sure this user may open it (e.g. add it to the `kvm` group)"
    )]
    NoKvm(#[source] std::io::Error),
    /// A KVM call failed.
    #[error("KVM call failed: {op}: {source}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// A bad configuration.
    #[error("bad VM configuration: {0}")]
    Config(String),
    /// The guest RAM window failed.
    #[error(transparent)]
    Window(#[from] WindowError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Resolving a boot-region page failed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM's fault handler failed (the VM is stopped).
    #[error("the VM is stopped: {0}")]
    Failed(#[source] Arc<FaultError>),
}

impl VmError {
    /// Whether creating or running the VM failed on a host limit the user can raise
    /// (mappings, memory, descriptors) rather than on the guest.
    pub fn is_host_limit(&self) -> bool {
        match self {
            VmError::Window(e) => e.is_host_limit(),
            VmError::Fault(e) => e.is_host_limit(),
            VmError::Failed(e) => e.is_host_limit(),
            VmError::Vcpu(e) => e.is_host_limit(),
            VmError::Kvm { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                )
            }
            _ => false,
        }
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// `/dev/kvm` and what the host supports, opened once and shared by all VMs.
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
    cpuid: CpuId,
    msr_indices: Vec<u32>,
    has_xcrs: bool,
    has_xsave: bool,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and reads the supported CPUID and MSR lists.
    pub fn new() -> Result<Hypervisor, VmError> {
        let kvm =
            Kvm::new().map_err(|e| VmError::NoKvm(std::io::Error::from_raw_os_error(e.errno())))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let has_xcrs = kvm.check_extension(Cap::Xcrs);
        // The 4 KiB KVM_GET/SET_XSAVE buffer holds the whole state unless KVM_CAP_XSAVE2
        // says it needs more (AMX); then only the legacy FPU state is carried.
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        let has_xsave = kvm.check_extension(Cap::Xsave)
            && xsave2 <= std::mem::size_of::<kvm_bindings::kvm_xsave>() as i32;
        let mut hv = Hypervisor {
            kvm,
            cpuid,
            msr_indices,
            has_xcrs,
            has_xsave,
        };
        hv.filter_msrs()?;
        raise_nofile_limit();
        Ok(hv)
    }

    /// Keeps only the MSRs a vCPU here lets us read (KVM_GET_MSRS stops at the first
    /// refused one, so each is tried alone on a scratch vCPU).
    fn filter_msrs(&mut self) -> Result<(), VmError> {
        let vm = create_vm(&self.kvm).map_err(kvm_err("KVM_CREATE_VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        self.msr_indices.retain(|&index| {
            let entry = kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            };
            kvm_bindings::Msrs::from_entries(&[entry])
                .ok()
                .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        });
        Ok(())
    }

    /// KVM's own cost of a VM, for comparison: a VM fd, a memslot of `mem_bytes` over a
    /// reserved (unpopulated) host range, and `vcpus` vCPU fds, nothing else (no threads,
    /// no userfaultfd, no guest).
    pub fn bare_vm(&self, mem_bytes: u64, vcpus: u32) -> Result<BareVm, VmError> {
        let ram = crate::sys::mman::reserve(mem_bytes).map_err(WindowError::from)?;
        let ram = BareRam {
            addr: ram as u64,
            len: mem_bytes,
        };
        let vm = Arc::new(create_vm(&self.kvm).map_err(kvm_err("KVM_CREATE_VM"))?);
        crate::window::set_memslot(&vm, 0, ram.addr, mem_bytes)?;
        let vcpus = (0..vcpus)
            .map(|i| {
                vm.create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BareVm {
            _vcpus: vcpus,
            _vm: vm,
            _ram: ram,
        })
    }

    /// The MSRs vCPU state save/restore covers.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }
}

/// A bare KVM VM from [`Hypervisor::bare_vm`] (benchmark baseline).
#[derive(Debug)]
pub struct BareVm {
    // Drop order: vCPUs, VM, then the range its memslot pointed at.
    _vcpus: Vec<kvm_ioctls::VcpuFd>,
    _vm: Arc<VmFd>,
    _ram: BareRam,
}

#[derive(Debug)]
struct BareRam {
    addr: u64,
    len: u64,
}

impl Drop for BareRam {
    fn drop(&mut self) {
        // SAFETY: our own reservation; the VM whose memslot pointed at it is gone (field
        // order in BareVm).
        unsafe { crate::sys::mman::unmap(self.addr as *mut u8, self.len) };
    }
}

/// Raises the soft open-file limit to the hard limit (every VM holds a handful of fds:
/// KVM VM and vCPUs, userfaultfd, eventfds) and returns the soft limit now.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    lim.rlim_cur
}

/// `KVM_CREATE_VM`, tried again when a signal interrupts it (Ctrl-C while shells are
/// made: the interrupt is checked between shells, not reported as a failed VM).
fn create_vm(kvm: &Kvm) -> Result<VmFd, kvm_ioctls::Error> {
    loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => return r,
        }
    }
}

/// File descriptors this process has open now (from `/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// A VM's shape.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM bytes (a multiple of 4 KiB, more than the 1 MiB boot region).
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Pin the fault handler and every vCPU thread to this host CPU.
    pub cpu: Option<usize>,
    /// The memory node of the VM's vCPUs: its fault handlers resolve faults as threads of
    /// that node, where a first-touch policy ([`guestmem::NodePolicy::FirstTouch`])
    /// allocates.
    pub home_node: guestmem::NodeId,
    /// The host CPUs of the home node when its pool node is bound to a host NUMA node:
    /// the VM's vCPU and fault-handler threads run on them (unless `cpu` pins them to
    /// one CPU).
    pub home_cpus: Option<std::sync::Arc<[usize]>>,
    /// Each vCPU's own home (vCPU `i` takes entry `i % len`); `None`: every vCPU lives at
    /// the VM's home. A fault is resolved as a thread of the faulting vCPU's node (the
    /// userfaultfd names the faulting thread), so first touch places a page on the node
    /// of the vCPU that touched it. When the homes span nodes, the window also takes
    /// hinting faults that name the touching vCPU, so balancing moves a page to the node
    /// of the vCPU that keeps touching it ([`guestmem::AddressSpace::record_touches`]).
    pub vcpu_homes: Option<std::sync::Arc<[VcpuHome]>>,
    /// Write the built-in guest's boot region (page tables, GDT, program) into guest RAM.
    /// False when the memory already holds a running guest (a snapshot-fork child), whose
    /// vCPUs then get their state from [`Vcpu::restore_state`].
    pub load_guest: bool,
}

/// Where one vCPU lives ([`VmConfig::vcpu_homes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuHome {
    /// Its memory node.
    pub node: guestmem::NodeId,
    /// The node's host CPUs when the pool node is bound to a host NUMA node: the vCPU
    /// thread runs on them (unless [`VmConfig::cpu`] pins it to one CPU).
    pub cpus: Option<std::sync::Arc<[usize]>>,
}

impl VmConfig {
    /// Where the VM's threads run: `cpu`, else the home node's CPUs, else anywhere.
    pub fn pin(&self) -> crate::numa::Pin {
        Self::pin_to(self.cpu, self.home_cpus.as_ref())
    }

    fn pin_to(cpu: Option<usize>, cpus: Option<&std::sync::Arc<[usize]>>) -> crate::numa::Pin {
        match (cpu, cpus) {
            (Some(c), _) => crate::numa::Pin::Cpu(c),
            (None, Some(cpus)) => crate::numa::Pin::Cpus(cpus.clone()),
            (None, None) => crate::numa::Pin::Anywhere,
        }
    }

    /// vCPU `i`'s home node and where its thread runs.
    pub fn vcpu_home(&self, i: u32) -> (guestmem::NodeId, crate::numa::Pin) {
        match self.vcpu_homes.as_deref().filter(|h| !h.is_empty()) {
            Some(h) => {
                let home = &h[i as usize % h.len()];
                (home.node, Self::pin_to(self.cpu, home.cpus.as_ref()))
            }
            None => (self.home_node, self.pin()),
        }
    }

    /// Whether the VM's vCPUs live on more than one node (then it takes hinting faults
    /// that name the touching vCPU).
    pub fn vcpus_span_nodes(&self) -> bool {
        (0..self.vcpus).any(|i| self.vcpu_home(i).0 != self.vcpu_home(0).0)
    }

    /// `mem_bytes` of RAM, `vcpus` vCPUs, unpinned, loading the built-in guest.
    pub fn new(mem_bytes: u64, vcpus: u32) -> VmConfig {
        VmConfig {
            mem_bytes,
            vcpus,
            cpu: None,
            home_node: guestmem::NodeId(0),
            home_cpus: None,
            vcpu_homes: None,
            load_guest: true,
        }
    }
}

/// A running VM (see the module docs). Dropping it stops its threads and frees its memory.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPU threads, then the handler, then the KVM VM (memslot),
    // then the resolver and the window the memslot pointed into.
    vcpus: Vec<Vcpu>,
    /// pthread ids the fault handler may kick; emptied before the vCPU threads end.
    kick: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// The fault handler threads ([`Vm::fault_handlers`] of them).
    handlers: Vec<JoinHandle<()>>,
    stop: OwnedFd,
    /// Shared only with the window, weakly (it moves the memslot on fork); replaced by
    /// [`Vm::rebirth`].
    vm_fd: Mutex<Arc<VmFd>>,
    link: Arc<VmLink>,
    stats: Arc<FaultStats>,
    /// Held across a whole snapshot-fork of this VM ([`Vm::fork_guard`]): forks of one
    /// VM are serialised, so no second fork can resume the vCPUs under the first.
    fork_lock: Mutex<()>,
    resolver: Arc<LateResolver>,
    window: Arc<Window>,
    cfg: VmConfig,
}

/// A VM's resolver, set once by [`Vm::attach`]; faults before that fail the VM.
#[derive(Debug, Default)]
struct LateResolver {
    inner: std::sync::OnceLock<Arc<dyn FaultResolver>>,
}

impl FaultResolver for LateResolver {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        match self.inner.get() {
            Some(r) => r.resolve(gfn, kind),
            None => Err(FaultError::NoResolver { gfn, kind }),
        }
    }

    fn resolve_run(&self, gfn: Gfn, kind: FaultKind) -> Result<std::ops::Range<Gfn>, FaultError> {
        match self.inner.get() {
            Some(r) => r.resolve_run(gfn, kind),
            None => Err(FaultError::NoResolver { gfn, kind }),
        }
    }
}

/// Pre-created [`Vm::shell`]s of one shape, so that a fork creates no KVM VM, vCPU,
/// window or thread on its path (KVM_CREATE_VM, the memslot and the vCPUs cost about
/// 0.4 ms per VM here, the VMM's threads and userfaultfd as much again).
#[derive(Debug)]
pub struct ShellPool {
    cfg: VmConfig,
    shells: Mutex<Vec<Vm>>,
}

impl ShellPool {
    /// An empty pool of shells shaped like `cfg` (`load_guest` is ignored: shells take a
    /// running guest's state).
    pub fn new(cfg: &VmConfig) -> ShellPool {
        ShellPool {
            cfg: VmConfig {
                load_guest: false,
                ..cfg.clone()
            },
            shells: Mutex::new(Vec::new()),
        }
    }

    /// Creates shells until the pool holds `n`.
    pub fn fill(&self, hv: &Hypervisor, n: usize) -> Result<(), VmError> {
        while self.len() < n {
            let vm = Vm::shell(hv, &self.cfg)?;
            self.shells
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(vm);
        }
        Ok(())
    }

    /// Shells ready now.
    pub fn len(&self) -> usize {
        self.shells.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no shell is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `vm` as if it were a shell (fault injection: a broken shell makes a fork
    /// fail midway). Only with the `failpoints` feature.
    #[cfg(feature = "failpoints")]
    pub fn push(&self, vm: Vm) {
        self.shells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(vm);
    }

    /// A shell for a VM shaped like `cfg` (ignoring `load_guest`), if one is ready.
    pub fn take(&self, cfg: &VmConfig) -> Option<Vm> {
        let same = cfg.mem_bytes == self.cfg.mem_bytes
            && cfg.vcpus == self.cfg.vcpus
            && cfg.cpu == self.cfg.cpu
            && cfg.home_node == self.cfg.home_node
            && cfg.home_cpus == self.cfg.home_cpus
            && cfg.vcpu_homes == self.cfg.vcpu_homes;
        if !same {
            return None;
        }
        self.shells.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
}

impl Vm {
    /// Creates a VM with `cfg.mem_bytes` of guest RAM (all holes), builds its resolver with
    /// `make_resolver`, writes the guest's boot region (resolving those pages directly,
    /// not counted as faults), and starts the fault handler and the vCPU threads. The
    /// vCPUs wait for commands. Equivalent to [`Vm::shell`] then [`Vm::attach`].
    pub fn new(
        hv: &Hypervisor,
        cfg: &VmConfig,
        make_resolver: impl FnOnce(&Arc<Window>) -> Result<Arc<dyn FaultResolver>, FaultError>,
    ) -> Result<Vm, VmError> {
        let vm = Vm::shell(hv, cfg)?;
        let resolver = make_resolver(&vm.window)?;
        vm.attach(resolver)?;
        Ok(vm)
    }

    /// A VM shell: everything KVM and the host need (userfaultfd, a reserved window
    /// registered as the memslot, the VM and vCPU fds, the fault handler and vCPU threads)
    /// but no memory behind it yet. [`Vm::attach`] gives it its resolver; a fork takes
    /// shells from a [`ShellPool`] so that none of this is on its path.
    pub fn shell(hv: &Hypervisor, cfg: &VmConfig) -> Result<Vm, VmError> {
        if cfg.mem_bytes <= guest::DATA_START
            || cfg.mem_bytes % PAGE != 0
            || cfg.mem_bytes > guest::MAX_RAM
        {
            return Err(VmError::Config(format!(
                "guest RAM {:#x} must be a multiple of 4 KiB above 1 MiB and at most 64 GiB",
                cfg.mem_bytes
            )));
        }
        if cfg.vcpus == 0 {
            return Err(VmError::Config("a VM needs at least one vCPU".into()));
        }
        failpoint::hit(ForkStep::ShellUffd).map_err(|e| UffdError::Open(failpoint::io(e)))?;
        let uffd = Arc::new(Uffd::new()?);
        let window = Arc::new(Window::new(uffd, cfg.mem_bytes)?);
        if cfg.vcpus_span_nodes() {
            window.take_hinting_faults()?;
        }
        let vm_fd = Arc::new(
            failpoint::hit(ForkStep::ShellVm)
                .map_err(kvm_ioctls::Error::new)
                .and_then(|()| create_vm(&hv.kvm))
                .map_err(kvm_err("KVM_CREATE_VM"))?,
        );
        failpoint::hit(ForkStep::ShellMemslot)
            .map_err(|e| WindowError::Memslot(failpoint::io(e)))?;
        crate::window::set_memslot(&vm_fd, 0, window.host_base(), cfg.mem_bytes)?;
        window.bind_memslot(&vm_fd, 0);
        // Intel hardware KVM wants a TSS address set before running; harmless elsewhere.
        let _ = vm_fd.set_tss_address(0xfffb_d000);

        let link = Arc::new(VmLink {
            ram: cfg.mem_bytes,
            failure: Mutex::new(None),
            handlers_busy: AtomicU32::new(0),
            vcpu_threads: parking_lot::RwLock::new(Vec::new()),
        });
        let stats = Arc::new(FaultStats::default());
        // SAFETY: eventfd takes flags only and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(VmError::Kvm {
                op: "eventfd for the fault handler",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh fd nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };

        let mut vm = Vm {
            vcpus: Vec::with_capacity(cfg.vcpus as usize),
            kick: Arc::new(Mutex::new(Vec::new())),
            handlers: Vec::new(),
            stop,
            vm_fd: Mutex::new(vm_fd.clone()),
            link,
            stats,
            fork_lock: Mutex::new(()),
            resolver: Arc::new(LateResolver::default()),
            window,
            cfg: cfg.clone(),
        };
        // The handler first: from here on any access to guest RAM, the VMM's own included,
        // can fault and be resolved (once a resolver is attached).
        for _ in 0..Vm::fault_handlers(cfg) {
            let h = vm.spawn_handler(cfg.pin())?;
            vm.handlers.push(h);
        }
        for id in 0..cfg.vcpus {
            let (home, pin) = cfg.vcpu_home(id);
            let fd = failpoint::hit(ForkStep::ShellVcpu)
                .map_err(kvm_ioctls::Error::new)
                .and_then(|()| vm_fd.create_vcpu(u64::from(id)))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let setup = VcpuSetup {
                id,
                cpuid: hv.cpuid.clone(),
                msr_indices: hv.msr_indices.clone(),
                has_xcrs: hv.has_xcrs,
                has_xsave: hv.has_xsave,
                pin,
                home,
                boot_state: cfg.load_guest,
            };
            let v = Vcpu::new(fd, setup, vm.link.clone())?;
            if let Some(t) = v.pthread() {
                vm.kick.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            }
            vm.vcpus.push(v);
        }
        Ok(vm)
    }

    /// Gives a shell its resolver (its memory); with `load_guest`, writes the boot region
    /// and boots the vCPUs into the guest's command loop. A VM takes one resolver only.
    pub fn attach(&self, resolver: Arc<dyn FaultResolver>) -> Result<(), VmError> {
        if self.resolver.inner.set(resolver).is_err() {
            return Err(VmError::Config(
                "the VM already has its memory: attach a resolver to a shell only".into(),
            ));
        }
        if self.cfg.load_guest {
            write_boot_region(&self.window, self.resolver.as_ref(), self.cfg.mem_bytes)?;
            if let Some(reason) = self.failure() {
                return Err(VmError::Failed(reason));
            }
            for v in &self.vcpus {
                v.boot()?;
            }
        }
        Ok(())
    }

    fn spawn_handler(&self, pin: crate::numa::Pin) -> Result<JoinHandle<()>, VmError> {
        let window = self.window.clone();
        let resolver = self.resolver.clone();
        let stats = self.stats.clone();
        let link = self.link.clone();
        let stop = self.stop.try_clone().map_err(|e| VmError::Kvm {
            op: "dup the stop eventfd",
            source: e,
        })?;
        let kick = self.kick.clone();
        let home = self.cfg.home_node;
        let per_vcpu = self.cfg.vcpu_homes.is_some();
        failpoint::hit(ForkStep::ShellHandler)
            .map_err(failpoint::io)
            .and_then(|()| {
                std::thread::Builder::new()
                    .name("uffd-handler".into())
                    .spawn(move || {
                        pin.apply();
                        guestmem::set_home_node(home);
                        fault_loop(
                            &window,
                            resolver.as_ref(),
                            &stats,
                            &link,
                            &stop,
                            &kick,
                            (home, per_vcpu),
                        )
                    })
            })
            .map_err(|e| VmError::Kvm {
                op: "spawn the fault handler thread",
                source: e,
            })
    }

    /// The configuration the VM was created with.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// vCPU `i`.
    pub fn vcpu(&self, i: usize) -> Option<&Vcpu> {
        self.vcpus.get(i)
    }

    /// Runs `cmd` on vCPU `i` to completion.
    pub fn run(&self, i: usize, cmd: Command) -> Result<CmdResult, VcpuError> {
        self.vcpus
            .get(i)
            .ok_or(VcpuError::NoSuchVcpu(i as u32))?
            .run(cmd)
    }

    /// Stops every vCPU for good without waiting for them ([`Vcpu::stop`]): commands in
    /// flight end with [`VcpuError::Dead`]. Stopping many VMs this way before dropping
    /// them keeps the VMs not yet dropped from running on while each drop waits.
    pub fn stop(&self) {
        self.vcpus.iter().for_each(Vcpu::stop);
    }

    /// Pauses every vCPU, then waits until the fault handler has resolved every fault
    /// already queued (a vCPU kicked out of a fault wait leaves its event behind), so that
    /// nothing changes guest memory or the host view until [`Vm::resume`] (except the VMM's
    /// own accesses).
    pub fn pause(&self) {
        self.vcpus.iter().for_each(Vcpu::pause);
        self.quiesce_handler();
    }

    fn quiesce_handler(&self) {
        let mut p = libc::pollfd {
            fd: self.window.uffd().as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SeqCst: pairs with the handler's store before it reads the queue; if it is
            // not busy and the queue is empty, no event is in flight.
            // Queue first, then busy: the handler sets busy before it reads an event, so
            // an event consumed after our poll shows up as busy.
            // SAFETY: one valid pollfd, zero timeout.
            let readable = unsafe { libc::poll(&mut p, 1, 0) } > 0;
            let busy = self.link.handlers_busy.load(Ordering::SeqCst) > 0;
            if (!busy && !readable) || self.failure().is_some() || self.handler_gone() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    fn handler_gone(&self) -> bool {
        self.handlers.iter().all(JoinHandle::is_finished)
    }

    /// Fault handler threads a VM of `cfg` gets: one per vCPU, at most
    /// [`Vm::MAX_FAULT_HANDLERS`]. They read the one userfaultfd of the VM and resolve
    /// faults side by side, so a vCPU waiting on a slow fault (a swap-in reading the
    /// swap file) does not hold up its siblings' faults.
    pub fn fault_handlers(cfg: &VmConfig) -> u32 {
        cfg.vcpus.clamp(1, Vm::MAX_FAULT_HANDLERS)
    }

    /// The most fault handler threads per VM.
    pub const MAX_FAULT_HANDLERS: u32 = 4;

    /// Undoes one [`Vm::pause`] of every vCPU (pauses nest; see [`Vcpu::resume`]).
    pub fn resume(&self) {
        self.vcpus.iter().for_each(Vcpu::resume);
    }

    /// Holds every vCPU out of `KVM_RUN` as [`Vm::pause`] does, until the returned guard
    /// is dropped. A hold is counted apart from pauses: no [`Vm::resume`], from any
    /// thread, lets a vCPU run while the hold lives (a snapshot-fork holds its parent).
    pub fn hold(&self) -> Hold<'_> {
        self.vcpus.iter().for_each(Vcpu::hold);
        self.quiesce_handler();
        Hold { vm: self }
    }

    /// The guest RAM window.
    pub fn window(&self) -> &Arc<Window> {
        &self.window
    }

    /// The resolver, once attached.
    pub fn resolver(&self) -> Option<&Arc<dyn FaultResolver>> {
        self.resolver.inner.get()
    }

    /// Faults handled so far, by kind.
    pub fn fault_counts(&self) -> FaultCounts {
        self.stats.snapshot()
    }

    /// Why the VM stopped, if its fault handler failed.
    pub fn failure(&self) -> Option<Arc<FaultError>> {
        self.link
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the VM with `reason` (the first reason wins): its vCPUs return
    /// [`VcpuError::FaultFailed`] at their next exit, and faults still arriving are let
    /// through on private memory (see `release`). Other VMs are not affected.
    pub fn fail(&self, reason: FaultError) {
        fail(&self.link, reason, &self.kick);
    }

    /// Serialises snapshot-forks of this VM: hold the guard from the pause to the resume.
    pub fn fork_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.fork_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The KVM VM fd (a fork may give the VM a new one: see [`Vm::rebirth`]).
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.vm_fd.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves this paused VM into a fresh KVM VM: a new VM fd whose memslot points at a
    /// fresh, all-holes window range, and new vCPU fds loaded with `states` (saved from
    /// this VM's vCPUs while paused). Its threads, resolver and address space stay; its
    /// guest pages fault back in from the manager (read-only where shared). The old VM and
    /// window range are destroyed on a background thread.
    ///
    /// This is how a fork stops the parent from writing shared pages without paying the
    /// host per populated page: creating a VM and a memslot costs well under a millisecond
    /// per GiB here, while write-protecting or zapping KVM's and the host's mappings of a
    /// populated GiB costs 13 to 24 ms. On error the VM is unchanged. The old VM and range
    /// are torn down on a background thread when the returned [`Retiree`] is dropped.
    ///
    /// [`Retiree`]: crate::window::Retiree
    pub fn rebirth(
        &self,
        hv: &Hypervisor,
        states: &[crate::vcpu::VcpuState],
    ) -> Result<crate::window::Retiree, VmError> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::Config(format!(
                "{} saved vCPU states for {} vCPUs",
                states.len(),
                self.vcpus.len()
            )));
        }
        // The commit below waits for every pin of the window; one held by this thread
        // would never go (the caller write-protects in place instead).
        if self.window.pinned_here() {
            return Err(VmError::Window(WindowError::PinnedByForkingThread));
        }
        failpoint::hit(ForkStep::RebirthFresh).map_err(|e| {
            WindowError::Mman(crate::sys::mman::MmanError::Mmap {
                op: "reserve window",
                addr: 0,
                len: self.cfg.mem_bytes,
                source: failpoint::io(e),
            })
        })?;
        let fresh = self.window.prepare_fresh()?;
        let new_vm = Arc::new(
            failpoint::hit(ForkStep::RebirthVm)
                .map_err(kvm_ioctls::Error::new)
                .and_then(|()| create_vm(&hv.kvm))
                .map_err(kvm_err("KVM_CREATE_VM"))?,
        );
        failpoint::hit(ForkStep::RebirthMemslot)
            .map_err(|e| WindowError::Memslot(failpoint::io(e)))?;
        crate::window::set_memslot(&new_vm, 0, fresh.addr(), self.cfg.mem_bytes)?;
        let _ = new_vm.set_tss_address(0xfffb_d000);
        let mut fds = Vec::with_capacity(self.vcpus.len());
        for (v, st) in self.vcpus.iter().zip(states) {
            let fd = failpoint::hit(ForkStep::RebirthVcpu)
                .map_err(kvm_ioctls::Error::new)
                .and_then(|()| new_vm.create_vcpu(u64::from(v.id())))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            failpoint::hit(ForkStep::RebirthLoad).map_err(|e| VcpuError::Kvm {
                op: "KVM_SET_SREGS",
                source: failpoint::io(e),
            })?;
            v.prepare_fd(&fd, &hv.cpuid, st)?;
            fds.push(fd);
        }
        // Everything that can fail is done: check that every vCPU is paused (its thread
        // parked or idle, out of KVM_RUN, and held there by the pause count), then
        // commit. Nothing after this point can fail, so no vCPU is ever left on the old
        // memslot while its range is retired.
        for v in &self.vcpus {
            if !v.is_stopped() {
                return Err(VmError::Vcpu(VcpuError::NotPaused(v.id())));
            }
            v.quiescent()?;
        }
        let (old_addr, len) = self.window.commit_fresh(fresh, &new_vm, 0);
        let old_vm = std::mem::replace(
            &mut *self.vm_fd.lock().unwrap_or_else(|e| e.into_inner()),
            new_vm,
        );
        let old_fds: Vec<_> = self
            .vcpus
            .iter()
            .zip(fds)
            .map(|(v, fd)| v.install_fd(fd))
            .collect();
        // vCPU fds first, then the VM (its last reference), then the range it mapped.
        Ok(crate::window::Retiree::new(
            old_addr,
            len,
            Box::new((old_fds, old_vm)),
        ))
    }

    /// Reads the word at `gpa` (rounded down to 8) from the host side, through the
    /// vm-memory view (faults a hole in, counted).
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, VmError> {
        Ok(self.guest_memory().read_u64(gpa)?)
    }

    /// The VM's guest RAM as a vm-memory `GuestMemoryBackend`, pinned at its current host
    /// range while the view lives ([`Window::guest_memory`]; see [`crate::memory`] for the
    /// rules).
    pub fn guest_memory(&self) -> crate::memory::GuestRam<'_> {
        self.window.guest_memory()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kick.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // All vCPUs at once, then each joined.
        self.stop();
        self.vcpus.clear();
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        for h in self.handlers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Every vCPU of a VM held out of `KVM_RUN` ([`Vm::hold`]); dropping it lets them run
/// (unless paused).
#[derive(Debug)]
pub struct Hold<'a> {
    vm: &'a Vm,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.vm.vcpus.iter().for_each(Vcpu::unhold);
    }
}

fn write_boot_region(
    window: &Window,
    resolver: &dyn FaultResolver,
    ram: u64,
) -> Result<(), VmError> {
    let program = guest::program();
    let mut chunks: Vec<(u64, Vec<u8>)> = guest::page_tables(ram)
        .into_iter()
        .map(|(gpa, words)| (gpa, words.iter().flat_map(|w| w.to_le_bytes()).collect()))
        .collect();
    chunks.push((
        guest::GDT_GPA,
        guest::gdt().iter().flat_map(|w| w.to_le_bytes()).collect(),
    ));
    chunks.push((guest::CODE_GPA, program));
    // Page 0 too: KVM reads it when the vCPU first enters (descriptor tables based at 0).
    chunks.push((0, vec![0; 8]));
    // One view for the whole region (this is not the fault-handler thread; resolving under
    // it takes the mmap_lock below the view's pin, in lock order).
    let mem = window.guest_memory();
    for (gpa, bytes) in chunks {
        let first = gpa / PAGE;
        let last = (gpa + bytes.len().max(1) as u64 - 1) / PAGE;
        for g in first..=last {
            resolver.resolve(Gfn(g), FaultKind::Missing { write: true })?;
        }
        mem.write_bytes(Gpa(gpa), &bytes)?;
    }
    Ok(())
}

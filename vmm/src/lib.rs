//! KVM guests on managed memory: VMs whose guest RAM is a host window mirrored from the
//! memory manager ([`window::Window`] implements guestmem's `HostMmu`), guest faults
//! delivered by userfaultfd to a per-VM handler thread ([`fault`]), vCPU threads with pause,
//! resume and state save/restore ([`vcpu`]), and the built-in ring-3 test guest ([`guest`]).
//!
//! On top: [`ManagedVm`] (a VM with its guestmem `AddressSpace`) and its snapshot-fork,
//! [`ManagedVm::fork`] / [`ManagedVm::fork_with`] (see [`managed`]): a running VM
//! continues as N copy-on-write clones, the parent moved to a fresh KVM VM and window
//! ([`Vm::rebirth`]) instead of write-protecting its pages, the clones' VMs optionally
//! taken from pre-created shells ([`ShellPool`]). [`workload`] is the `vmm` program's
//! workload language.
//!
//! rust-vmm interop: [`Window::guest_memory`] (and [`Vm::guest_memory`]) give a VM's RAM
//! as a `vm-memory` `GuestMemoryBackend` ([`memory::GuestRam`]), pinned at the window's
//! current host range while it lives, so crates such as `linux-loader` can write into it;
//! the VMM's own host-side accesses go through the same view. [`vm_memory`] is re-exported
//! so that callers name the same version.
//!
//! Layering: [`sys`] is the only place with raw host syscalls (userfaultfd, mmap, memfd);
//! KVM goes through kvm-ioctls. See docs/ARCHITECTURE.md for how the pieces fit.
//!
//! A guest on guestmem-managed memory, filling and verifying 1000 pages:
//!
//! ```no_run
//! use std::sync::Arc;
//! use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig, RegionSpec};
//! use guestmem::types::Gfn;
//! use vmm::{Command, FaultError, FaultResolver, Hypervisor, Op, SpaceResolver, Vm, VmConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hv = Hypervisor::new()?;
//! let pool = Arc::new(Pool::new(&PoolConfig::uniform(64 << 20, 1, AllocatorKind::Magazine))?);
//! let mm = Manager::new(pool, ManagerConfig::default());
//! let mem = 32 << 20;
//! let vm = Vm::new(&hv, &VmConfig::new(mem, 1), |window| {
//!     let regions = [RegionSpec { start: Gfn(0), pages: mem / 4096 }];
//!     let space = mm.create(&regions, window.clone()).map_err(FaultError::Space)?;
//!     Ok(Arc::new(SpaceResolver::new(space)) as Arc<dyn FaultResolver>)
//! })?;
//! let data = Gfn(vmm::guest::DATA_START / 4096);
//! vm.run(0, Command::new(Op::Fill, data, 1000, 7))?;
//! assert_eq!(vm.run(0, Command::new(Op::Verify, data, 1000, 7))?.mismatches(), 0);
//! println!("{:?}", vm.fault_counts());
//! # Ok(())
//! # }
//! ```

pub mod asm;
pub mod failpoint;
pub mod fault;
pub mod guest;
pub mod managed;
pub mod memory;
pub mod numa;
pub mod sys;
pub mod vcpu;
pub mod vm;
pub mod window;
pub mod worker;
pub mod workload;

/// [`guestmem::types::PAGE_SIZE`] as a u64.
pub(crate) const PAGE_SIZE_U64: u64 = guestmem::types::PAGE_SIZE as u64;

pub use fault::{FaultCounts, FaultError, FaultKind, FaultResolver, HostBacked, ScaffoldResolver};
pub use guest::{CmdResult, Command, Op};
pub use managed::{ForkError, ForkOptions, ForkTiming, ManagedVm, ParentMode, SpaceResolver};
pub use memory::{GuestRam, RamRegion};
pub use vcpu::{RegsDump, Vcpu, VcpuError, VcpuState};
pub use vm::{
    BareVm, Hold, Hypervisor, ShellPool, VcpuHome, Vm, VmConfig, VmError, open_fds,
    raise_nofile_limit,
};
pub use vm_memory;
pub use window::{Window, WindowError};

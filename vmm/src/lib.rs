//! KVM guests on managed memory: VMs whose guest RAM is a host window mirrored from the
//! memory manager ([`window::Window`] implements guestmem's `HostMmu`), guest faults
//! delivered by userfaultfd to a per-VM handler thread ([`fault`]), vCPU threads with pause,
//! resume and state save/restore ([`vcpu`]), and the built-in ring-3 test guest ([`guest`]).
//!
//! Layering: [`sys`] is the only place with raw host syscalls (userfaultfd, mmap, memfd);
//! KVM goes through kvm-ioctls. See issue 5 for the plan and docs/ARCHITECTURE.md.

pub mod asm;
pub mod fault;
pub mod guest;
pub mod managed;
pub mod sys;
pub mod vcpu;
pub mod vm;
pub mod window;

/// [`guestmem::types::PAGE_SIZE`] as a u64.
pub(crate) const PAGE_SIZE_U64: u64 = guestmem::types::PAGE_SIZE as u64;

pub use fault::{FaultCounts, FaultError, FaultKind, FaultResolver, HostBacked, ScaffoldResolver};
pub use guest::{CmdResult, Command, Op};
pub use managed::SpaceResolver;
pub use vcpu::{RegsDump, Vcpu, VcpuError, VcpuState};
pub use vm::{Hypervisor, Vm, VmConfig, VmError};
pub use window::{Window, WindowError};

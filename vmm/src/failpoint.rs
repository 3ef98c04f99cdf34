//! Failure injection on the snapshot-fork path, for tests of its rollback.
//!
//! Each fallible step of a fork (making a VM shell, saving the parent's vCPU state,
//! moving the parent into a fresh VM, forking the address space, restoring a clone's
//! vCPUs) asks `hit` first whether to fail, naming itself by a [`ForkStep`]. An armed
//! step fails with an errno, turned by the caller into exactly the typed error the real
//! call would have returned, so a test sees what a user would.
//!
//! The points are the `fail` crate's (process-wide, named by [`ForkStep::name`]), compiled
//! in only with the `failpoints` feature, which only the test builds turn on. Without it
//! `hit` is an inline `Ok(())`: no lookup, no branch, no dependency.

/// A fallible step of snapshot-fork that a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForkStep {
    /// `Vm::shell`: the VM's userfaultfd.
    ShellUffd,
    /// `Vm::shell`: `KVM_CREATE_VM`.
    ShellVm,
    /// `Vm::shell`: the memslot over the window.
    ShellMemslot,
    /// `Vm::shell`: the fault handler thread.
    ShellHandler,
    /// `Vm::shell`: `KVM_CREATE_VCPU` (once per vCPU).
    ShellVcpu,
    /// Saving a parent vCPU's state (once per vCPU).
    SaveState,
    /// `Vm::rebirth`: the fresh window range.
    RebirthFresh,
    /// `Vm::rebirth`: `KVM_CREATE_VM`.
    RebirthVm,
    /// `Vm::rebirth`: the new VM's memslot.
    RebirthMemslot,
    /// `Vm::rebirth`: `KVM_CREATE_VCPU` (once per vCPU).
    RebirthVcpu,
    /// `Vm::rebirth`: loading a saved state into a new vCPU fd (once per vCPU).
    RebirthLoad,
    /// The clone's `AddressSpace::fork`, before it links anything.
    SpaceFork,
    /// Inside `AddressSpace::fork`: write-protecting the parent's view
    /// (`HostMmu::protect_for_fork`), after the child's space is built.
    ProtectForFork,
    /// Restoring a clone vCPU's state (once per vCPU).
    RestoreState,
}

impl ForkStep {
    /// Every step, in the order a fork meets them.
    pub const ALL: [ForkStep; 14] = [
        ForkStep::ShellUffd,
        ForkStep::ShellVm,
        ForkStep::ShellMemslot,
        ForkStep::ShellHandler,
        ForkStep::ShellVcpu,
        ForkStep::SaveState,
        ForkStep::RebirthFresh,
        ForkStep::RebirthVm,
        ForkStep::RebirthMemslot,
        ForkStep::RebirthVcpu,
        ForkStep::RebirthLoad,
        ForkStep::SpaceFork,
        ForkStep::ProtectForFork,
        ForkStep::RestoreState,
    ];

    /// The `fail` point's name.
    pub fn name(self) -> &'static str {
        match self {
            ForkStep::ShellUffd => "vmm::shell::uffd",
            ForkStep::ShellVm => "vmm::shell::create_vm",
            ForkStep::ShellMemslot => "vmm::shell::memslot",
            ForkStep::ShellHandler => "vmm::shell::handler",
            ForkStep::ShellVcpu => "vmm::shell::create_vcpu",
            ForkStep::SaveState => "vmm::fork::save_state",
            ForkStep::RebirthFresh => "vmm::rebirth::fresh_range",
            ForkStep::RebirthVm => "vmm::rebirth::create_vm",
            ForkStep::RebirthMemslot => "vmm::rebirth::memslot",
            ForkStep::RebirthVcpu => "vmm::rebirth::create_vcpu",
            ForkStep::RebirthLoad => "vmm::rebirth::load_state",
            ForkStep::SpaceFork => "vmm::fork::space_fork",
            ForkStep::ProtectForFork => "vmm::fork::protect_for_fork",
            ForkStep::RestoreState => "vmm::fork::restore_state",
        }
    }

    /// Whether a failure here is absorbed by the fork: the parent stays in its VM and is
    /// write-protected instead of reborn, and the fork succeeds.
    pub fn is_absorbed(self) -> bool {
        matches!(
            self,
            ForkStep::RebirthFresh
                | ForkStep::RebirthVm
                | ForkStep::RebirthMemslot
                | ForkStep::RebirthVcpu
                | ForkStep::RebirthLoad
        )
    }
}

/// The errno an armed step fails with unless the test gave one: the host is out of
/// memory, the likeliest real cause of each of these steps failing.
pub const DEFAULT_ERRNO: i32 = libc::ENOMEM;

/// `Err(errno)` if `step` is armed, else `Ok(())`.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(step: ForkStep) -> Result<(), i32> {
    match fail::eval(step.name(), |arg| {
        arg.and_then(|a| a.parse().ok()).unwrap_or(DEFAULT_ERRNO)
    }) {
        Some(errno) => Err(errno),
        None => Ok(()),
    }
}

/// `Ok(())`: without the `failpoints` feature no step can be armed.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_step: ForkStep) -> Result<(), i32> {
    Ok(())
}

/// Arms `step`: its next `skip` calls pass, every later one fails with `errno`, until
/// [`disarm`]. Failpoints are process-wide: tests that arm them must not run beside other
/// forks.
#[cfg(feature = "failpoints")]
pub fn arm(step: ForkStep, skip: u32, errno: i32) {
    let actions = if skip == 0 {
        format!("return({errno})")
    } else {
        format!("{skip}*off->return({errno})")
    };
    // The action string is built here and always parses.
    if let Err(e) = fail::cfg(step.name(), &actions) {
        panic!("failpoint {}: bad actions {actions:?}: {e}", step.name());
    }
}

/// Disarms `step`.
#[cfg(feature = "failpoints")]
pub fn disarm(step: ForkStep) {
    fail::remove(step.name());
}

/// Disarms every step.
#[cfg(feature = "failpoints")]
pub fn disarm_all() {
    ForkStep::ALL.into_iter().for_each(disarm);
}

/// The errno as a host error.
pub(crate) fn io(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}
